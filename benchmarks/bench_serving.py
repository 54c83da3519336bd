"""Serving benchmark: vLLM + prefixattn against plain vLLM, the prefix pasted into the prompt, HF generate().

The code lives in prefixattn/bench/serving.py (also `prefixattn bench serving`)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's prefixattn, installed or not

from prefixattn.bench.serving import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
