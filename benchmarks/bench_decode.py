"""Decode attention benchmark (prefixattn vs concat + SDPA). The code lives in prefixattn/bench/decode.py."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's prefixattn, installed or not

from prefixattn.bench.decode import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
