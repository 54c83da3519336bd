"""Training-shape attention benchmark (the baselines of docs/design.md).
The code lives in prefixattn/bench/attention.py."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's prefixattn, installed or not

from prefixattn.bench.attention import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
