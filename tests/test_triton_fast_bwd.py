"""The opt-in faster backward, prefix_attention(..., deterministic=False): dQ by fp32 atomics from the dK/dV kernels.

Same checks as tests/test_triton_training.py (float64 reference, same tolerances), on the same cases, plus what is
specific to the fused path: the dQ kernel is never launched, rows nothing reaches get dq exactly 0, every backend
accepts the flag. torch.compile and the GPU size/head-dim checks run both paths in tests/test_triton_training.py.
On the CPU the kernels run in Triton's interpreter (16 x 16 tiles);
bf16 at real sizes is in the @pytest.mark.gpu tests at the end.
"""

from __future__ import annotations

import zlib

import pytest
import torch
from helpers import TOLERANCE, Case, rel_err
from test_triton_training import CASES, NAMES, check, run_kernels, use_fused_backward

from prefixattn import prefix_attention
from prefixattn.reference import prefix_attention_reference


@pytest.fixture
def fused(monkeypatch):
    """Route run_kernels' triton_bwd.backward calls to deterministic=False, and fail if the dQ kernel runs."""
    return use_fused_backward(monkeypatch)


FAST_CASES = [
    "mha",
    "gqa2",
    "gqa4-d64",
    "d128",
    "no-prefix",
    "decode-3",
    "chunked-prefill",
    "noncausal",
    "noncausal-sq>sk",
    "pad-left",
    "pad-random-noncausal",
    "pool-lengths",
    "pool-noncontiguous-pad",
    "noncontiguous",
]


@pytest.mark.parametrize("name", FAST_CASES)
def test_float64_matches_reference(name, fused):
    case = CASES[name]
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    tensors, args = case.make(dtype=torch.float64, requires_grad=False, generator=g)
    got, ref = run_kernels(tensors, args, dtype=torch.float64, chunks=3)
    check(got, ref, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("name", ["gqa2", "noncausal-sq>sk", "pool-noncontiguous-pad", "d128"])
def test_low_precision(name, dtype, fused):
    case = CASES[name]
    g = torch.Generator().manual_seed(7)
    tensors, args = case.make(dtype=dtype, requires_grad=False, generator=g)
    got, ref = run_kernels(tensors, args, dtype=dtype)
    check(got, ref, dtype)


@pytest.mark.parametrize("chunks", [1, 5])
def test_pool_with_unused_entries_and_no_prefix_rows(chunks, fused):
    """Pool with -1 entries and lengths, chunks crossing entries: each row's prefix share is added exactly once."""
    case = Case(
        batch=5,
        heads_q=4,
        heads_kv=2,
        seqlen_q=20,
        seqlen_k=20,
        head_dim=32,
        prefix_len=19,
        pool=3,
        lengths=True,
        padding="random",
    )
    g = torch.Generator().manual_seed(11)
    tensors, args = case.make(dtype=torch.float64, requires_grad=False, generator=g)
    args["prefix_index"] = torch.tensor([2, 0, -1, 2, 0])
    got, ref = run_kernels(tensors, args, dtype=torch.float64, chunks=chunks)
    check(got, ref, torch.float64)


def test_attn_bias_with_neg_inf(fused):
    from test_triton_training import make_bias

    case = Case(
        batch=2,
        heads_q=4,
        heads_kv=2,
        seqlen_q=19,
        seqlen_k=27,
        head_dim=32,
        prefix_len=6,
        causal=False,
        padding="random",
    )
    g = torch.Generator().manual_seed(3)
    tensors, args = case.make(dtype=torch.float64, requires_grad=False, generator=g)
    got, ref = run_kernels(tensors, args, dtype=torch.float64, bias=make_bias(case, "full", torch.float64, generator=g))
    check(got, ref, torch.float64)


def test_rows_with_nothing_to_attend_get_exact_zero(fused):
    """No prefix (index -1, or valid length 0) and every key padded: dq is exactly 0 there, finite elsewhere."""
    case = Case(batch=3, heads_q=2, heads_kv=1, seqlen_q=18, seqlen_k=18, head_dim=32, prefix_len=7, pool=2)
    (q, k, v, pk, pv), args = case.make(dtype=torch.float64, requires_grad=False)
    args["prefix_index"] = torch.tensor([-1, 1, 0])
    args["prefix_lengths"] = torch.tensor([7, 0])
    mask = torch.ones(3, 18, dtype=torch.bool)
    mask[0] = False
    mask[1] = False
    mask[2, :5] = False
    args["key_padding_mask"] = mask
    got, ref = run_kernels([q, k, v, pk, pv], args, dtype=torch.float64)
    check(got, ref, torch.float64)
    assert torch.equal(got[2][:2], torch.zeros_like(got[2][:2]))
    assert all(torch.isfinite(grad).all() for grad in got[2:])


def test_padded_keys_with_huge_scores_add_nothing(fused):
    """A padded key whose score would dominate must not leak into dq (its p is masked, not just its dK rows)."""
    case = Case(
        batch=2,
        heads_q=2,
        heads_kv=2,
        seqlen_q=20,
        seqlen_k=20,
        head_dim=32,
        prefix_len=3,
        causal=False,
        padding="random",
    )
    g = torch.Generator().manual_seed(9)
    (q, k, v, pk, pv), args = case.make(dtype=torch.float64, requires_grad=False, generator=g)
    k = k.clone()
    k[~args["key_padding_mask"][:, None, :, None].expand_as(k)] = 50.0  # huge q.k on padded keys only
    got, ref = run_kernels([q, k, v, pk, pv], args, dtype=torch.float64)
    check(got, ref, torch.float64)


def test_matches_deterministic_backward():
    """Same gradients as the default path up to dq's summation order; dk/dv/dprefix come from the same kernels
    (same interpreter tiles) and must be bitwise equal."""
    from prefixattn.kernels import triton_bwd, triton_fwd

    case = CASES["pool-noncontiguous-pad"]
    (q, k, v, pk, pv), args = case.make(dtype=torch.float32, requires_grad=False)
    extra = (args["prefix_index"], None, args["key_padding_mask"], None)
    out, lse = triton_fwd.forward(q, k, v, pk, pv, *extra, True, 0.2)
    dout = torch.randn_like(out)
    det = triton_bwd.backward(dout, None, q, k, v, pk, pv, *extra, out, lse, True, 0.2, prefix_chunks=4)
    fast = triton_bwd.backward(
        dout, None, q, k, v, pk, pv, *extra, out, lse, True, 0.2, prefix_chunks=4, deterministic=False
    )
    for name, a, b in zip(NAMES[2:], det, fast):
        assert a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype, name
    assert rel_err(fast[0], det[0]) <= 1e-5
    for name, a, b in zip(NAMES[3:], det[1:], fast[1:]):
        assert torch.equal(a, b), name


# ----------------------------------------------------------------------------------------- the op layer
def _op_grads(tensors, args, **kw):
    out, lse = prefix_attention(*tensors, return_lse=True, **args, **kw)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=out.dtype)
    loss = (out * weights).sum() + lse.masked_fill(torch.isinf(lse), 0).sum()
    return torch.autograd.grad(loss, tensors), weights


def test_through_op_and_autograd():
    case = Case(
        batch=2,
        heads_q=4,
        heads_kv=2,
        seqlen_q=21,
        seqlen_k=21,
        head_dim=32,
        prefix_len=9,
        pool=2,
        lengths=True,
        padding="right",
        noncontiguous=True,
    )
    tensors, args = case.make(dtype=torch.float32)
    grads, weights = _op_grads(tensors, args, backend="triton", deterministic=False)
    ref_in = [t.detach().double().requires_grad_() for t in tensors]
    ref_out, ref_lse = prefix_attention_reference(*ref_in, return_lse=True, **args)
    ref_loss = (ref_out * weights.double()).sum() + ref_lse.masked_fill(torch.isinf(ref_lse), 0).sum()
    for name, a, b in zip(NAMES[2:], grads, torch.autograd.grad(ref_loss, ref_in)):
        assert rel_err(a, b) <= TOLERANCE[torch.float32], name


def test_op_reaches_the_fused_path(monkeypatch):
    """deterministic=False travels through the custom ops to triton_bwd.backward; the default stays True."""
    from prefixattn.kernels import triton_bwd

    seen = []
    real = triton_bwd.backward

    def spy(*args, **kwargs):
        seen.append(kwargs.get("deterministic"))
        return real(*args, **kwargs)

    monkeypatch.setattr(triton_bwd, "backward", spy)
    case = Case(batch=1, heads_q=2, heads_kv=1, seqlen_q=16, seqlen_k=16, head_dim=16, prefix_len=4)
    tensors, args = case.make(dtype=torch.float32)
    for flag in (False, True):
        prefix_attention(*tensors, backend="triton", deterministic=flag, **args).sum().backward()
    prefix_attention(*tensors, backend="triton", **args).sum().backward()
    assert seen == [False, True, True]


def test_torch_backend_ignores_it():
    case = Case(batch=1, heads_q=2, heads_kv=1, seqlen_q=9, seqlen_k=9, head_dim=16, prefix_len=3)
    tensors, args = case.make(dtype=torch.float64)
    a = prefix_attention(*tensors, backend="torch", deterministic=False, **args)
    b = prefix_attention(*tensors, backend="torch", **args)
    assert torch.equal(a, b)


@pytest.mark.parametrize("bad", [0, 1, None, "False", 1.0])
def test_validation(bad):
    case = Case(batch=1, heads_q=2, heads_kv=1, seqlen_q=4, seqlen_k=4, head_dim=16, prefix_len=2)
    tensors, args = case.make(dtype=torch.float32)
    for backend in ("torch", "triton"):
        with pytest.raises(TypeError, match="deterministic"):
            prefix_attention(*tensors, backend=backend, deterministic=bad, **args)


def test_every_backend_accepts_the_flag():
    import inspect

    from prefixattn.kernels import cuda_backend, triton_backend, triton_bwd

    for module in (triton_backend, cuda_backend, triton_bwd):
        param = inspect.signature(module.backward).parameters["deterministic"]
        assert param.kind is inspect.Parameter.KEYWORD_ONLY and param.default is True, module.__name__


# --------------------------------------------------------------------------------------------------- GPU
# bf16/fp16 at real sizes, other head dims with bias, fp32 decode-like: test_triton_training's GPU tests run
# both backward paths (fixture bwd_path); torch.compile likewise (test_torch_compile_fullgraph).


@pytest.mark.gpu
def test_gpu_close_to_deterministic_and_empty_rows_zero():
    """bf16 at a real size: the fused dq agrees with the deterministic one to fp32-summation-order noise, dk/dv/dprefix
    likewise, and a sequence with every key padded and no prefix gets dq exactly 0."""
    from prefixattn.kernels import triton_bwd, triton_fwd

    case = Case(batch=4, heads_q=8, heads_kv=2, seqlen_q=512, seqlen_k=512, head_dim=128, prefix_len=96, pool=2)
    (q, k, v, pk, pv), args = case.make(dtype=torch.bfloat16, device="cuda", requires_grad=False)
    index = torch.tensor([0, 1, -1, 0], device="cuda")
    mask = torch.ones(4, 512, dtype=torch.bool, device="cuda")
    mask[2] = False
    extra = (index, None, mask, None)
    out, lse = triton_fwd.forward(q, k, v, pk, pv, *extra, True, 128**-0.5)
    dout = torch.randn_like(out)
    det = triton_bwd.backward(dout, None, q, k, v, pk, pv, *extra, out, lse, True, 128**-0.5)
    fast = triton_bwd.backward(dout, None, q, k, v, pk, pv, *extra, out, lse, True, 128**-0.5, deterministic=False)
    for name, a, b in zip(NAMES[2:], det, fast):
        assert rel_err(b.float(), a.float()) <= 1e-2, name
    assert torch.equal(fast[0][2], torch.zeros_like(fast[0][2]))


def test_bench_method_matches_the_deterministic_one():
    """The attention benchmark's prefixattn_fast row: fwd+bwd only, same outputs/gradients as prefixattn."""
    from prefixattn.bench import attention

    shape = attention.Shape("t", 1, 4, 2, 24, 16)
    sets = attention.make_sets(shape, 1, torch.device("cpu"), torch.float32)
    attention.set_prefix(sets, shape, 5, torch.device("cpu"), torch.float32)
    (fast,) = attention.build_prefixattn_fast("triton")
    (det,) = attention.build_prefixattn("triton")
    assert fast.name == "prefixattn_fast" and not fast.forward and fast.backward
    out_f, grads_f = attention.outputs(fast, sets[0], backward=True)
    out_d, grads_d = attention.outputs(det, sets[0], backward=True)
    assert torch.equal(out_f, out_d)
    for a, b in zip(grads_f, grads_d):
        assert rel_err(a, b) <= 1e-5
