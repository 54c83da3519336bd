"""Print the benchmark tables from saved JSON: python benchmarks/summarize.py [DIR] [--brief].

Loads prefixattn/bench/report.py by path, so it needs neither torch nor an installed package and runs in
a fraction of a second (gpu_check.sh calls it after every step).
"""

import importlib.util
import sys
from pathlib import Path

REPORT = Path(__file__).resolve().parents[1] / "prefixattn" / "bench" / "report.py"

if __name__ == "__main__":
    spec = importlib.util.spec_from_file_location("prefixattn_bench_report", REPORT)
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    sys.exit(report.summary_main())
