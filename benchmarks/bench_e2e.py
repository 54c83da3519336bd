"""End-to-end benchmark: training step and generation of a 1.1B Llama-shaped model.

The code lives in prefixattn/bench/e2e.py."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's prefixattn, installed or not

from prefixattn.bench.e2e import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
