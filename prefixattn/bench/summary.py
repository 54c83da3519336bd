"""`prefixattn bench summary [DIR] [--brief]`: the tables and targets from saved results (see report.py)."""

import sys

from .report import render_dir  # noqa: F401
from .report import summary_main as main

if __name__ == "__main__":
    sys.exit(main())
