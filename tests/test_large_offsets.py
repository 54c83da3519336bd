"""GPU tests at sizes where an element offset passes 2^31: every such offset must be computed in 64 bits.

One test per limit, each sized to cross it and to fit an 80 GB card (peak ~35 GB), checked exactly:
- attention bias, Sq * Sk >= 2^31 (a dense [Sq, Sk] bias at ~46K tokens);
- query rows, Sq * Hq * D >= 2^31 (q, out, dout, dq in the [B, Sq, Hq, D] layout transformers uses);
- key rows, Sk * Hkv * D >= 2^31 (k, v, dk, dv in that layout);
- the prefix-gradient store, N * Hkv * P * D >= 2^31 (a large pool).
Where the answer has a cheap exact form it is the reference on a slice of the problem (the last query rows see
the same keys in a slice as in the whole problem, and a dout that is zero elsewhere gives the same dk, dv and
dprefix); for the key rows it is the same kernels on a [B, Hkv, Sk, D] copy, whose offsets stay far below 2^31
(the kernels' arithmetic does not depend on strides).
"""

from __future__ import annotations

import gc
import math

import pytest
import torch
from helpers import TOLERANCE, rel_err

from prefixattn import prefix_attention
from prefixattn.reference import prefix_attention_reference

pytestmark = pytest.mark.gpu

LIMIT = 2**31
DEVICE = "cuda"  # LIMIT, DEVICE and DT are module constants so that the checks themselves can be smoke-run small
ROWS = 32  # query rows checked against the reference
DT = torch.bfloat16


@pytest.fixture(autouse=True)
def _free_memory():
    yield
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _rnd(*shape, requires_grad=True):
    return torch.randn(*shape, device=DEVICE, dtype=DT).requires_grad_(requires_grad)


def _dout_on_last_rows(out):
    """A dout that is random on the last ROWS query rows and 0 elsewhere, in out's layout."""
    dout = torch.zeros_like(out)
    dout[:, :, -ROWS:] = torch.randn_like(out[:, :, -ROWS:])
    return dout


def _reference_on_last_rows(q, k, v, pk, pv, dout, *, attn_bias=None, **kw):
    """(out, grads) of the reference for the last ROWS query rows only, in float32, with dout's matching rows."""
    leaves = [t.detach()[:, :, -ROWS:] if t is q else t.detach() for t in (q, k, v, pk, pv) if t is not None]
    leaves = [t.clone().requires_grad_() for t in leaves]
    if attn_bias is not None:
        attn_bias = attn_bias[:, :, -ROWS:]
    args = leaves + [None] * (5 - len(leaves))
    out = prefix_attention_reference(*args, attn_bias=attn_bias, **kw)
    grads = torch.autograd.grad(out, leaves, dout[:, :, -ROWS:])
    return out, grads


def _check_last_rows(out, grads, ref_out, ref_grads):
    assert rel_err(out[:, :, -ROWS:], ref_out) < TOLERANCE[DT]
    assert rel_err(grads[0][:, :, -ROWS:], ref_grads[0]) < TOLERANCE[DT], "dq"
    for name, g, r in zip(("dk", "dv", "dprefix_k", "dprefix_v"), grads[1:], ref_grads[1:]):
        assert rel_err(g, r) < TOLERANCE[DT], name


def test_gpu_attention_bias_past_2_31_elements():
    s = math.isqrt(LIMIT) + 64  # 46,405: Sq * Sk = 2.15e9
    assert s * s >= LIMIT
    q, k, v = _rnd(1, 1, s, 64), _rnd(1, 1, s, 64), _rnd(1, 1, s, 64)
    bias = torch.randn(1, 1, s, s, device=DEVICE, dtype=DT) * 2  # 4.3 GB
    out = prefix_attention(q, k, v, attn_bias=bias, causal=True, backend="triton")
    dout = _dout_on_last_rows(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_out, ref_grads = _reference_on_last_rows(q, k, v, None, None, dout, attn_bias=bias, causal=True)
    _check_last_rows(out, grads, ref_out, ref_grads)


@pytest.mark.parametrize(
    "backend, deterministic", [("triton", True), ("triton", False), ("sdpa", False)], ids=["triton", "atomic", "sdpa"]
)
def test_gpu_query_rows_past_2_31_elements(backend, deterministic):
    hq, d = 16, 128
    sq = LIMIT // (hq * d) + 64  # q in [B, Sq, Hq, D] memory: row Sq-1 starts past 2^31
    q = torch.randn(1, sq, hq, d, device=DEVICE, dtype=DT).transpose(1, 2).requires_grad_()
    k, v = _rnd(1, 1, 128, d), _rnd(1, 1, 128, d)
    pk, pv = _rnd(1, 16, d), _rnd(1, 16, d)
    out = prefix_attention(q, k, v, pk, pv, causal=False, backend=backend, deterministic=deterministic)
    assert out.stride(2) == hq * d
    dout = _dout_on_last_rows(out)
    grads = torch.autograd.grad(out, (q, k, v, pk, pv), dout)
    ref_out, ref_grads = _reference_on_last_rows(q, k, v, pk, pv, dout, causal=False)
    _check_last_rows(out, grads, ref_out, ref_grads)


@pytest.mark.parametrize("sq", [64, 1], ids=["prefill", "decode"])
def test_gpu_key_rows_past_2_31_elements(sq):
    hkv, d = 16, 128
    sk = LIMIT // (hkv * d) + 64  # k, v in [B, Sk, Hkv, D] memory: key Sk-1 starts past 2^31
    k = torch.randn(1, sk, hkv, d, device=DEVICE, dtype=DT).transpose(1, 2)
    v = torch.randn(1, sk, hkv, d, device=DEVICE, dtype=DT).transpose(1, 2)
    q = _rnd(1, hkv, sq, d)
    pk, pv = _rnd(hkv, 16, d), _rnd(hkv, 16, d)

    def run(k, v):
        k, v = k.requires_grad_(sq > 1), v.requires_grad_(sq > 1)
        out = prefix_attention(q, k, v, pk, pv, causal=True, backend="triton")
        if sq == 1:  # the decode kernels: inference only
            return out, ()
        return out, torch.autograd.grad(out, (q, k, v, pk, pv), torch.ones_like(out))

    out, grads = run(k, v)
    dense_k, dense_v = k.detach().contiguous(), v.detach().contiguous()  # [B, Hkv, Sk, D]: offsets < 2^28
    del k, v
    ref_out, ref_grads = run(dense_k, dense_v)
    # Same kernels, same order of sums: equal up to (at most) rounding; a wrapped offset reads other rows (O(1)).
    assert rel_err(out, ref_out) < TOLERANCE[DT] / 10
    for name, g, r in zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v"), grads, ref_grads):
        assert rel_err(g, r) < TOLERANCE[DT] / 10, name


def test_gpu_prefix_gradient_store_past_2_31_elements():
    hkv, p, d = 8, 128, 128
    n = LIMIT // (hkv * p * d) + 1  # dprefix entry N-1 starts past 2^31
    pk, pv = _rnd(n, hkv, p, d), _rnd(n, hkv, p, d)  # 4.3 GB each
    q, k, v = _rnd(4, 8, 32, d), _rnd(4, hkv, 32, d), _rnd(4, hkv, 32, d)
    index = torch.tensor([n - 1, n - 2, -1, n - 1], device=DEVICE)
    out = prefix_attention(q, k, v, pk, pv, prefix_index=index, causal=True, backend="triton")
    dout = torch.randn_like(out)
    dq, dk, dv, dpk, dpv = torch.autograd.grad(out, (q, k, v, pk, pv), dout)
    assert torch.count_nonzero(dpk[: n - 2]) == 0 and torch.count_nonzero(dpv[: n - 2]) == 0

    used_k, used_v = pk.detach()[n - 2 :].clone().requires_grad_(), pv.detach()[n - 2 :].clone().requires_grad_()
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)] + [used_k, used_v]
    ref = prefix_attention_reference(*leaves, prefix_index=torch.tensor([1, 0, -1, 1], device=DEVICE), causal=True)
    ref_grads = torch.autograd.grad(ref, leaves, dout)
    assert rel_err(out, ref) < TOLERANCE[DT]
    for name, g, r in zip(
        ("dq", "dk", "dv", "dprefix_k", "dprefix_v"), (dq, dk, dv, dpk[n - 2 :], dpv[n - 2 :]), ref_grads
    ):
        assert rel_err(g, r) < TOLERANCE[DT], name
