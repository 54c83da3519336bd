"""Calls at the edges of the value ranges: no keys at all, and softmax_scale values that are not a scale.

Regression tests: backend "torch" (what "auto" runs on the CPU) raised IndexError from amax on a call with no
keys, where README promises zeros and lse = -inf; softmax_scale accepted NaN and inf (NaN output) and True.
"""

from __future__ import annotations

import math

import pytest
import torch

from prefixattn import prefix_attention, prefix_attention_paged

B, HQ, HKV, SQ, D = 2, 4, 2, 3, 16


def _no_key_inputs(prefix: str):
    q = torch.randn(B, HQ, SQ, D, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, HKV, 0, D, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, HKV, 0, D, dtype=torch.float64, requires_grad=True)
    if prefix == "none":
        return q, k, v, None, None
    pk = torch.randn(HKV, 0, D, dtype=torch.float64, requires_grad=True)  # P = 0
    return q, k, v, pk, torch.randn(HKV, 0, D, dtype=torch.float64, requires_grad=True)


@pytest.mark.parametrize("prefix", ["none", "empty"])
@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
def test_no_keys_gives_zeros_and_minus_inf_lse(backend, prefix):
    q, k, v, pk, pv = _no_key_inputs(prefix)
    out, lse = prefix_attention(q, k, v, pk, pv, causal=False, backend=backend, return_lse=True)
    assert out.shape == (B, HQ, SQ, D) and lse.shape == (B, HQ, SQ)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.isneginf(lse).all()
    leaves = [t for t in (q, k, v, pk, pv) if t is not None]
    grads = torch.autograd.grad(out.sum(), leaves, allow_unused=True)
    for t, g in zip(leaves, grads):
        assert g is None or (g.shape == t.shape and torch.equal(g, torch.zeros_like(g)))


def test_paged_reference_with_no_cache_tokens_and_no_prefix():
    q = torch.randn(B, HQ, 1, D)
    k_cache = v_cache = torch.randn(3, 4, HKV, D)
    block_table = torch.zeros(B, 2, dtype=torch.int32)
    seq_lens = torch.zeros(B, dtype=torch.int32)
    out, lse = prefix_attention_paged(q, k_cache, v_cache, block_table, seq_lens, backend="torch", return_lse=True)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()


BAD_SCALES = [float("nan"), float("inf"), -float("inf"), 0.0, -0.5, True, False]


@pytest.mark.parametrize("scale", BAD_SCALES, ids=repr)
def test_softmax_scale_must_be_a_finite_positive_number(scale):
    q = k = v = torch.randn(1, 1, 2, D)
    with pytest.raises((ValueError, TypeError), match="softmax_scale"):
        prefix_attention(q, k, v, softmax_scale=scale)
    with pytest.raises((ValueError, TypeError), match="softmax_scale"):
        prefix_attention_paged(
            q[:, :, :1],
            torch.randn(2, 4, 1, D),
            torch.randn(2, 4, 1, D),
            torch.zeros(1, 1, dtype=torch.int32),
            torch.ones(1, dtype=torch.int32),
            softmax_scale=scale,
        )


@pytest.mark.parametrize("scale", [0.125, 2, 1e-3])
def test_softmax_scale_accepts_finite_positive_reals(scale):
    q, k, v = torch.randn(3, 1, 1, 2, D, dtype=torch.float64)
    out = prefix_attention(q, k, v, softmax_scale=scale, causal=False)
    ref = prefix_attention(q * math.sqrt(D) * scale, k, v, causal=False)  # default scale is 1/sqrt(D)
    torch.testing.assert_close(out, ref)
