"""Bring a tensor to the layout a kernel assumes, copying only when it does not have it already.

The kernels take a stride for every dimension but the last (the innermost one is read as contiguous rows),
and read 1-d index tensors (prefix_index, prefix_lengths, seq_lens) as dense vectors. Autograd and users hand
over other layouts too: `out.sum().backward()` gives an expanded dout whose strides are all 0, and a column of
a table (`table[:, 0]`) is a vector with a stride > 1. Dense tensors pass through untouched (no copy on the hot
path); anything else becomes a contiguous copy before the launch.
"""

from __future__ import annotations

from torch import Tensor


def unit_stride_last(t: Tensor | None) -> Tensor | None:
    """t when its last dimension is contiguous (stride 1, or at most one element), else a contiguous copy."""
    if t is None or t.dim() == 0 or t.shape[-1] <= 1 or t.stride(-1) == 1:
        return t
    return t.contiguous()
