"""Tests of the transformers integration run tiny models whose ops are far too small for intra-op threads:
on a loaded 2-core machine two threads made a training step ~100x slower than one. Use one thread here and
restore the setting afterwards."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
