"""Kernels honour (or first establish) the layout of every tensor they read.

Regression tests: the Triton backward read dout as if its last dimension were contiguous (the all-zero-stride
dout of `out.sum().backward()` gave gradient errors of 1e30), and the Triton decode kernels read prefix_index,
prefix_lengths, seq_lens and block-table rows as dense vectors (a column of a table gave a wrong answer).
Each case is compared against the float64 reference on the same inputs made dense.
"""

from __future__ import annotations

import pytest
import torch
from helpers import TOLERANCE, rel_err

from prefixattn import prefix_attention
from prefixattn.paged import paged_reference
from prefixattn.reference import prefix_attention_reference

B, HQ, HKV, D, P, POOL = 3, 4, 2, 16, 5, 3


def _leaves(dtype, sq=6, sk=7):
    def rnd(*shape):
        return torch.randn(*shape, dtype=dtype).requires_grad_()

    return rnd(B, HQ, sq, D), rnd(B, HKV, sk, D), rnd(B, HKV, sk, D), rnd(POOL, HKV, P, D), rnd(POOL, HKV, P, D)


def _grads(backend, leaves, index, lengths, reduction, **kw):
    out, lse = prefix_attention(
        *leaves, prefix_index=index, prefix_lengths=lengths, backend=backend, return_lse=True, **kw
    )
    if reduction == "sum":  # autograd expands the scalar's gradient: dout has all-zero strides
        return torch.autograd.grad(out.sum(), leaves)
    if reduction == "sum_with_lse":  # and so has dlse
        return torch.autograd.grad(out.sum() + lse.sum(), leaves)
    # "strided": gradients that are views with a last-dim stride of 2 (every other element of a wider buffer).
    g = torch.Generator().manual_seed(1)
    dout = torch.randn(*out.shape[:-1], 2 * D, generator=g, dtype=torch.float64)[..., ::2]
    dlse = torch.randn(*lse.shape[:-1], 2 * lse.shape[-1], generator=g, dtype=torch.float64)[..., ::2]
    return torch.autograd.grad((out, lse), leaves, (dout.to(out.dtype), dlse.to(lse.dtype)))


@pytest.mark.parametrize("reduction", ["sum", "sum_with_lse", "strided"])
@pytest.mark.parametrize(
    "backend, extra", [("triton", {}), ("triton", {"deterministic": False}), ("sdpa", {"deterministic": False})]
)
def test_gradients_for_any_dout_layout(backend, extra, reduction):
    leaves = _leaves(torch.float64 if backend == "triton" else torch.float32)
    index, lengths = torch.tensor([2, -1, 0]), torch.tensor([5, 2, 4])
    causal = backend == "triton"  # sdpa: causal needs Sq == Sk
    got = _grads(backend, leaves, index, lengths, reduction, causal=causal, **extra)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref = _grads("torch", ref_leaves, index, lengths, reduction, causal=causal)
    tol = TOLERANCE[leaves[0].dtype]
    for name, g, r in zip(("q", "k", "v", "prefix_k", "prefix_v"), got, ref):
        assert rel_err(g, r) < tol, name


def _strided_vector(values, stride=3, fill=99):
    """values as a view with the given element stride (a column of a [n, stride] table)."""
    table = torch.full((len(values), stride), fill, dtype=values.dtype)
    table[:, 0] = values
    return table[:, 0]


@pytest.mark.parametrize("pooled_lengths", [False, True])
def test_decode_reads_strided_index_vectors(pooled_lengths):
    """Sq = 1 goes to the decode kernels; prefix_index / prefix_lengths given as columns of a table."""
    q, k, v, pk, pv = (t.detach() for t in _leaves(torch.float32, sq=1, sk=9))
    index = _strided_vector(torch.tensor([1, 2, 0]))
    lengths = _strided_vector(torch.tensor([5, 1, 3])) if pooled_lengths else None
    assert index.stride(0) != 1
    out, lse = prefix_attention(
        q, k, v, pk, pv, prefix_index=index, prefix_lengths=lengths, backend="triton", return_lse=True
    )
    dense = lengths.contiguous() if lengths is not None else None
    ref_out, ref_lse = prefix_attention_reference(
        *(t.double() for t in (q, k, v, pk, pv)),
        prefix_index=index.contiguous(),
        prefix_lengths=dense,
        return_lse=True,
    )
    assert rel_err(out, ref_out) < TOLERANCE[torch.float32]
    assert rel_err(lse, ref_lse) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("path", ["fused", "cascade"])
def test_paged_reads_strided_tables(path):
    """block_table[:, ::2] (column stride 2), seq_lens and the pool arguments as columns of tables."""
    from prefixattn.kernels import triton_decode

    num_pages, page_size, max_pages, sq = 12, 4, 3, 2
    q = torch.randn(B, HQ, sq, D)
    k_cache, v_cache = torch.randn(2, num_pages, page_size, HKV, D)
    pages = torch.randperm(num_pages)[: B * max_pages].view(B, max_pages).int()
    wide = torch.full((B, 2 * max_pages), num_pages + 7, dtype=torch.int32)  # odd columns: invalid ids
    wide[:, ::2] = pages
    block_table = wide[:, ::2]
    seq_lens = _strided_vector(torch.tensor([12, 5, 9], dtype=torch.int32))
    pk, pv = torch.randn(2, POOL, HKV, P, D)
    index = _strided_vector(torch.tensor([2, 0, 1]))
    lengths = _strided_vector(torch.tensor([3, 5, 1]))
    assert block_table.stride(1) == 2 and seq_lens.stride(0) == 3
    # The launcher itself, with a plan that forces the path: the op's dispatch adds nothing to what is tested here.
    plan = triton_decode.plan_for_paged(q, k_cache, block_table, pk, path=path, block_n=16, splits=2)
    out, lse = triton_decode.paged_forward(
        q, k_cache, v_cache, block_table, seq_lens, pk, pv, index, lengths, D**-0.5, plan=plan
    )
    ref_out, ref_lse = paged_reference(
        q.double(),
        k_cache.double(),
        v_cache.double(),
        block_table.contiguous(),
        seq_lens.contiguous(),
        pk.double(),
        pv.double(),
        prefix_index=index.contiguous(),
        prefix_lengths=lengths.contiguous(),
        return_lse=True,
    )
    assert rel_err(out, ref_out) < TOLERANCE[torch.float32]
    assert rel_err(lse, ref_lse) < TOLERANCE[torch.float32]


@pytest.mark.parametrize(
    "backend, extra", [("triton", {}), ("triton", {"deterministic": False}), ("sdpa", {"deterministic": False})]
)
def test_64bit_offset_variants_match_the_reference(monkeypatch, backend, extra):
    """The kernels' 64-bit offset variants (WIDE, and HAS_BIAS=2), chosen only past 2^31 elements, compute the same
    function: forced here on small inputs by lowering the limit (tests/test_large_offsets.py crosses it on a GPU)."""
    from prefixattn.kernels import _triton_common

    monkeypatch.setattr(_triton_common, "INT32_LIMIT", 1)
    assert _triton_common.offsets_need_64bit(torch.zeros(2))
    dtype = torch.float64 if backend == "triton" else torch.float32
    leaves = _leaves(dtype)
    index, lengths = torch.tensor([2, -1, 0]), torch.tensor([5, 2, 4])
    kw = dict(prefix_index=index, prefix_lengths=lengths, causal=backend == "triton", return_lse=True)
    if backend == "triton":
        kw["attn_bias"] = torch.randn(B, 1, 6, 7, dtype=dtype)
        kw["key_padding_mask"] = torch.rand(B, 7) > 0.3
    out, lse = prefix_attention(*leaves, backend=backend, **kw, **extra)
    got = torch.autograd.grad((out, lse), leaves, (torch.ones_like(out), torch.ones_like(lse)))
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref_kw = {k: (v.double() if k == "attn_bias" else v) for k, v in kw.items()}
    ref_out, ref_lse = prefix_attention(*ref_leaves, backend="torch", **ref_kw)
    ref = torch.autograd.grad((ref_out, ref_lse), ref_leaves, (torch.ones_like(ref_out), torch.ones_like(ref_lse)))
    tol = TOLERANCE[dtype]
    assert rel_err(out, ref_out) < tol and rel_err(lse, ref_lse) < tol
    for name, g, r in zip(("q", "k", "v", "prefix_k", "prefix_v"), got, ref):
        assert rel_err(g, r) < tol, name
