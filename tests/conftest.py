"""Test setup: without a GPU, Triton kernels run in its interpreter on CPU tensors.

TRITON_INTERPRET must be set before any @triton.jit function is defined; prefixattn imports its kernel
modules lazily, so setting it here (before the first test imports them) is enough.
"""

import collections
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # Import Triton now, while TRITON_INTERPRET is set: its standard library (tl.zeros, ...) is built for the
    # interpreter only if the first import sees the variable, and a test that sets it to 0 (to check that the
    # backend is refused) may otherwise be the first to import it, breaking every later kernel in the process.
    try:
        import triton  # noqa: F401
    except ImportError:
        pass


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="GPU tests: they need a CUDA device and there is none here")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture
def device():
    return torch.device("cuda" if HAS_CUDA else "cpu")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Say why tests were skipped, grouped by reason: `pytest -q` alone only counts them (-rs lists each)."""
    reasons = collections.Counter()
    for report in terminalreporter.stats.get("skipped", []):
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
        reasons[reason.removeprefix("Skipped: ")] += 1
    for reason, n in reasons.most_common():
        terminalreporter.write_line(f"skipped {n} test{'s' if n > 1 else ''}: {reason}")
