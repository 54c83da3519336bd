"""`prefixattn bench summary [DIR] [--brief]`: the tables and targets from saved results (see report.py)."""

import sys

from .report import render_dir, summary_main as main  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
