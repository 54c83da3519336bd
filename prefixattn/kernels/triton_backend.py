"""The "triton" backend: routes each call to the prefill/training kernels or the short-query decode kernels.

Both paths compute the same function and return (out, lse), so the backward (which recomputes from
q, k, v, out and lse) does not care which forward ran. The paged entry always runs the decode kernels.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from . import bshd_empty, triton_unavailable_reason
from ._triton_config import MAX_HEAD_DIM

if TYPE_CHECKING:
    from ..paged import PagedProblem
    from ..validation import Problem

new_out = bshd_empty  # the output layout of both routes and of the paged entry (the custom ops' fakes use it)


def unsupported_reason(problem: Problem, *, needs_grad: bool, deterministic: bool = True) -> str | None:
    reason = triton_unavailable_reason(problem.device)
    if reason is not None:
        return reason
    if problem.head_dim > MAX_HEAD_DIM:
        return f"head dim {problem.head_dim} is above the Triton kernels' limit of {MAX_HEAD_DIM}"
    return None


def unsupported_reason_paged(problem: PagedProblem, *, needs_grad: bool) -> str | None:
    """Why the decode kernels cannot run this paged call (they have no backward; the paged entry is inference
    only, so needs_grad does not refuse them)."""
    if problem.dtype == torch.float64:
        return "float64 runs on backend 'torch' only"
    reason = triton_unavailable_reason(problem.device)
    if reason is not None:
        return reason
    from . import triton_decode

    return triton_decode.unsupported_reason(problem.dtype, problem.head_dim, problem.seqlen_q)


def pool_args_in_range(prefix_k, prefix_index, prefix_lengths):
    """Pool indices outside [0, N) -> -1 (no prefix) and lengths clamped to [0, P], as the decode kernels treat
    them: on the GPU these values are not range-checked (that would sync), and the training kernels index the
    pool and the prefix-gradient partials with them unchecked. Two tiny device ops, no sync."""
    if prefix_index is not None:
        prefix_index = torch.where((prefix_index >= 0) & (prefix_index < prefix_k.shape[0]), prefix_index, -1)
    if prefix_lengths is not None:
        prefix_lengths = prefix_lengths.clamp(0, prefix_k.shape[-2])
    return prefix_index, prefix_lengths


def forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prefix_k,
    prefix_v,
    prefix_index,
    prefix_lengths,
    key_padding_mask,
    attn_bias,
    causal: bool,
    scale: float,
):
    from . import triton_decode

    if triton_decode.handles(q, k, prefix_k, key_padding_mask, attn_bias, causal):
        return triton_decode.forward(
            q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask, causal, scale
        )
    from . import triton_fwd

    prefix_index, prefix_lengths = pool_args_in_range(prefix_k, prefix_index, prefix_lengths)

    return triton_fwd.forward(
        q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask, attn_bias, causal, scale
    )


def backward(
    dout,
    dlse,
    q,
    k,
    v,
    prefix_k,
    prefix_v,
    prefix_index,
    prefix_lengths,
    key_padding_mask,
    attn_bias,
    out,
    lse,
    causal: bool,
    scale: float,
    *,
    deterministic: bool = True,
):
    from . import triton_bwd

    prefix_index, prefix_lengths = pool_args_in_range(prefix_k, prefix_index, prefix_lengths)
    return triton_bwd.backward(
        dout,
        dlse,
        q,
        k,
        v,
        prefix_k,
        prefix_v,
        prefix_index,
        prefix_lengths,
        key_padding_mask,
        attn_bias,
        out,
        lse,
        causal,
        scale,
        deterministic=deterministic,
    )


def paged_forward(
    q, k_cache, v_cache, block_table, seq_lens, prefix_k, prefix_v, prefix_index, prefix_lengths, scale: float
):
    from . import triton_decode

    return triton_decode.paged_forward(
        q, k_cache, v_cache, block_table, seq_lens, prefix_k, prefix_v, prefix_index, prefix_lengths, scale
    )
