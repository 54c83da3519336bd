"""Triton training kernels (triton_fwd.forward / triton_bwd.backward) against the float64 reference.

On the CPU the kernels run in Triton's interpreter with 16 x 16 tiles, so the tiny shapes here still cover
several tiles per loop: prefix tail tiles, the causal band, ragged sequence ends, multi-chunk prefix gradients.
float64 runs are exact (the interpreter keeps fp64 end to end), fp32/fp16 check the low-precision paths.
bf16 numerics need a GPU (the interpreter's bf16 tl.dot is wrong), see the @pytest.mark.gpu tests at the end.
"""

from __future__ import annotations

import zlib

import pytest
import torch
from helpers import TOLERANCE, Case, rel_err
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prefixattn import prefix_attention
from prefixattn.reference import prefix_attention_reference

NAMES = ("out", "lse", "dq", "dk", "dv", "dprefix_k", "dprefix_v")


def _kernels():
    from prefixattn.kernels import triton_bwd, triton_fwd

    return triton_fwd, triton_bwd


def make_bias(case: Case, shape: str, dtype, device="cpu", neg_inf: float = 0.15, generator=None):
    """attn_bias broadcast over the batch ([1, Hq, Sq, Sk], an expanded view) or full, with some -inf."""
    b = case.batch if shape == "full" else 1
    bias = torch.randn(b, case.heads_q, case.seqlen_q, case.seqlen_k, generator=generator, dtype=torch.float64)
    bias = bias.masked_fill(torch.rand(bias.shape, generator=generator) < neg_inf, float("-inf"))
    return bias.to(device=device, dtype=dtype)


def run_kernels(tensors, args, *, dtype, bias=None, grad_lse=True, chunks=None, seed=1):
    """Kernel outputs and gradients for random dout (and dlse), plus the same from the float64 reference."""
    triton_fwd, triton_bwd = _kernels()
    q, k, v, pk, pv = [t.detach() if t is not None else None for t in tensors]
    scale = q.shape[-1] ** -0.5
    extra = (args.get("prefix_index"), args.get("prefix_lengths"), args.get("key_padding_mask"), bias)
    out, lse = triton_fwd.forward(q, k, v, pk, pv, *extra, args["causal"], scale)
    g = torch.Generator().manual_seed(seed)
    dout = torch.randn(out.shape, generator=g, dtype=torch.float64).to(device=q.device, dtype=q.dtype)
    dlse = torch.randn(lse.shape, generator=g, dtype=torch.float64).to(q.device, lse.dtype) if grad_lse else None
    grads = triton_bwd.backward(
        dout, dlse, q, k, v, pk, pv, *extra, out, lse, args["causal"], scale, prefix_chunks=chunks
    )

    ref_in = [t.double().requires_grad_() if t is not None else None for t in (q, k, v, pk, pv)]
    ref_out, ref_lse = prefix_attention_reference(
        *ref_in,
        prefix_index=args.get("prefix_index"),
        prefix_lengths=args.get("prefix_lengths"),
        causal=args["causal"],
        key_padding_mask=args.get("key_padding_mask"),
        softmax_scale=scale,
        attn_bias=bias.double() if bias is not None else None,
        return_lse=True,
    )
    live = [t for t in ref_in if t is not None]
    outs, gouts = [ref_out], [dout.double()]
    if grad_lse:
        outs.append(ref_lse)
        gouts.append(dlse.double())
    ref_grads = list(torch.autograd.grad(outs, live, gouts, allow_unused=True))
    ref_grads = [ref_grads.pop(0) if t is not None else None for t in ref_in]
    return (out, lse, *grads), (ref_out, ref_lse, *ref_grads)


def check(got, ref, dtype, *, skip=()):
    tol = TOLERANCE[dtype]
    for name, a, b in zip(NAMES, got, ref):
        if name in skip:
            continue
        if b is None:  # no prefix, or an empty one: the kernel returns None or an empty tensor
            assert a is None or a.numel() == 0, name
            continue
        assert a.shape == b.shape, (name, a.shape, b.shape)
        assert not torch.isnan(a).any(), f"{name} has NaN"
        err = rel_err(a, b)
        assert err <= tol, f"{name}: rel err {err:.3g} > {tol:g}"


# ---------------------------------------------------------------------------------------------- coverage
CASES = {
    # MHA / GQA ratios 1, 2, 4 with odd lengths and a prefix that is not a multiple of the tile
    "mha": Case(batch=2, heads_q=2, heads_kv=2, seqlen_q=37, seqlen_k=37, head_dim=32, prefix_len=5),
    "gqa2": Case(batch=2, heads_q=4, heads_kv=2, seqlen_q=37, seqlen_k=37, head_dim=32, prefix_len=21),
    "gqa4-d64": Case(batch=1, heads_q=4, heads_kv=1, seqlen_q=33, seqlen_k=33, head_dim=64, prefix_len=16),
    "d128": Case(batch=1, heads_q=2, heads_kv=1, seqlen_q=20, seqlen_k=20, head_dim=128, prefix_len=17),
    "d96": Case(batch=1, heads_q=2, heads_kv=2, seqlen_q=19, seqlen_k=19, head_dim=96, prefix_len=3),
    "no-prefix": Case(batch=2, heads_q=2, heads_kv=1, seqlen_q=23, seqlen_k=23, head_dim=32, prefix_len=0),
    # short queries against a longer cache (decode-like) and chunked prefill, causal bottom-right
    "decode-1": Case(batch=2, heads_q=4, heads_kv=2, seqlen_q=1, seqlen_k=37, head_dim=32, prefix_len=6),
    "decode-3": Case(batch=2, heads_q=2, heads_kv=1, seqlen_q=3, seqlen_k=40, head_dim=32, prefix_len=5),
    "chunked-prefill": Case(batch=2, heads_q=2, heads_kv=2, seqlen_q=17, seqlen_k=40, head_dim=32, prefix_len=9),
    "noncausal": Case(
        batch=2, heads_q=2, heads_kv=1, seqlen_q=21, seqlen_k=30, head_dim=32, prefix_len=7, causal=False
    ),
    "noncausal-sq>sk": Case(
        batch=2, heads_q=2, heads_kv=2, seqlen_q=29, seqlen_k=11, head_dim=32, prefix_len=4, causal=False
    ),
    "pad-left": Case(
        batch=2, heads_q=2, heads_kv=1, seqlen_q=25, seqlen_k=25, head_dim=32, prefix_len=5, padding="left"
    ),
    "pad-right": Case(
        batch=2, heads_q=2, heads_kv=1, seqlen_q=25, seqlen_k=25, head_dim=32, prefix_len=5, padding="right"
    ),
    "pad-random-noncausal": Case(
        batch=2,
        heads_q=2,
        heads_kv=2,
        seqlen_q=18,
        seqlen_k=26,
        head_dim=32,
        prefix_len=5,
        padding="random",
        causal=False,
    ),
    "pool-lengths": Case(
        batch=4, heads_q=2, heads_kv=1, seqlen_q=19, seqlen_k=19, head_dim=32, prefix_len=20, pool=3, lengths=True
    ),
    "pool-noncontiguous-pad": Case(
        batch=3,
        heads_q=4,
        heads_kv=2,
        seqlen_q=21,
        seqlen_k=21,
        head_dim=32,
        prefix_len=11,
        pool=2,
        padding="random",
        noncontiguous=True,
    ),
    "noncontiguous": Case(
        batch=2, heads_q=4, heads_kv=2, seqlen_q=33, seqlen_k=33, head_dim=64, prefix_len=18, noncontiguous=True
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_float64_exact(name):
    case = CASES[name]
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    tensors, args = case.make(dtype=torch.float64, requires_grad=False, generator=g)
    got, ref = run_kernels(tensors, args, dtype=torch.float64, chunks=3)
    check(got, ref, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("name", ["gqa2", "decode-3", "noncausal-sq>sk", "pool-noncontiguous-pad", "d128"])
def test_low_precision(name, dtype):
    case = CASES[name]
    g = torch.Generator().manual_seed(7)
    tensors, args = case.make(dtype=dtype, requires_grad=False, generator=g)
    got, ref = run_kernels(tensors, args, dtype=dtype)
    check(got, ref, dtype)


@pytest.mark.parametrize("shape", ["broadcast", "full"])
@pytest.mark.parametrize("causal", [True, False])
def test_attn_bias(shape, causal):
    case = Case(
        batch=2,
        heads_q=4,
        heads_kv=2,
        seqlen_q=19,
        seqlen_k=27,
        head_dim=32,
        prefix_len=6,
        causal=causal,
        padding="random" if shape == "full" else None,
    )
    g = torch.Generator().manual_seed(3)
    tensors, args = case.make(dtype=torch.float64, requires_grad=False, generator=g)
    bias = make_bias(case, shape, torch.float64, generator=g)
    if shape == "broadcast":
        bias = bias.expand(case.batch, -1, -1, -1)  # stride 0 over the batch
    got, ref = run_kernels(tensors, args, dtype=torch.float64, bias=bias)
    check(got, ref, torch.float64)


def test_attn_bias_fp16_with_fp32_bias():
    case = Case(batch=1, heads_q=2, heads_kv=1, seqlen_q=20, seqlen_k=20, head_dim=32, prefix_len=5)
    g = torch.Generator().manual_seed(4)
    tensors, args = case.make(dtype=torch.float16, requires_grad=False, generator=g)
    bias = make_bias(case, "broadcast", torch.float32, generator=g)
    got, ref = run_kernels(tensors, args, dtype=torch.float16, bias=bias)
    check(got, ref, torch.float16)


def test_empty_prefix_tensor():
    """prefix_k of length 0 behaves as no prefix; its gradient is an empty tensor of the prefix's shape."""
    case = Case(batch=2, heads_q=2, heads_kv=1, seqlen_q=17, seqlen_k=17, head_dim=32, prefix_len=0)
    (q, k, v, _, _), args = case.make(dtype=torch.float64, requires_grad=False)
    pk = torch.randn(1, 0, 32, dtype=torch.float64)
    pv = torch.randn(1, 0, 32, dtype=torch.float64)
    got, ref = run_kernels([q, k, v, pk, pv], args, dtype=torch.float64)
    check(got, ref, torch.float64)
    assert got[5].shape == pk.shape and got[6].shape == pv.shape


def test_no_query_heads_gives_zero_gradients():
    """The op refuses Hq = 0; the backward kernel still returns zero (not uninitialised) k/v/prefix gradients
    for it, in case a caller reaches it directly."""
    from prefixattn.kernels import triton_bwd

    q = torch.randn(2, 0, 5, 16)
    k, v = torch.randn(2, 2, 5, 16), torch.randn(2, 2, 5, 16)
    pk, pv = torch.randn(2, 3, 16), torch.randn(2, 3, 16)
    with pytest.raises(ValueError, match="^q: expected at least one query head"):
        prefix_attention(q, k, v, pk, pv, backend="triton")
    out, lse = torch.empty_like(q), torch.empty(2, 0, 5)
    _, dk, dv, dpk, dpv = triton_bwd.backward(
        torch.empty_like(q), None, q, k, v, pk, pv, None, None, None, None, out, lse, True, 0.25
    )
    for g in (dk, dv, dpk, dpv):
        assert torch.equal(g, torch.zeros_like(g))


def test_rows_with_nothing_to_attend():
    """No prefix (index -1 or valid length 0) and every key padded: output 0, lse -inf, finite zero gradients."""
    case = Case(batch=3, heads_q=2, heads_kv=1, seqlen_q=18, seqlen_k=18, head_dim=32, prefix_len=7, pool=2)
    (q, k, v, pk, pv), args = case.make(dtype=torch.float64, requires_grad=False)
    args["prefix_index"] = torch.tensor([-1, 1, 0])
    args["prefix_lengths"] = torch.tensor([7, 0])  # sequence 1 uses an entry of length 0
    mask = torch.ones(3, 18, dtype=torch.bool)
    mask[0] = False
    mask[1] = False
    mask[2, :5] = False  # sequence 2: early causal rows see only the prefix
    args["key_padding_mask"] = mask
    got, ref = run_kernels([q, k, v, pk, pv], args, dtype=torch.float64)
    check(got, ref, torch.float64)
    out, lse = got[0], got[1]
    assert torch.equal(out[:2], torch.zeros_like(out[:2]))
    assert torch.isneginf(lse[:2]).all() and torch.isfinite(lse[2]).all()
    for grad in got[2:]:
        assert torch.isfinite(grad).all()
    assert torch.equal(got[2][:2], torch.zeros_like(got[2][:2]))  # dq of the empty rows

    # A non-finite lse gradient on an empty row (e.g. from a merge with another -inf state) must not leak NaN:
    # the reference's where() drops it, the kernel resets delta there.
    _, triton_bwd = _kernels()
    dlse = torch.randn_like(lse).masked_fill(torch.isinf(lse), float("nan"))
    extra = (args["prefix_index"], args["prefix_lengths"], mask, None)
    grads = triton_bwd.backward(torch.randn_like(out), dlse, q, k, v, pk, pv, *extra, out, lse, True, 32**-0.5)
    assert all(torch.isfinite(grad).all() for grad in grads)


def test_empty_rows_fp16_no_nan():
    case = Case(batch=2, heads_q=2, heads_kv=2, seqlen_q=20, seqlen_k=20, head_dim=32, prefix_len=0, causal=False)
    (q, k, v, _, _), args = case.make(dtype=torch.float16, requires_grad=False)
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[1] = False
    args["key_padding_mask"] = mask
    got, ref = run_kernels([q, k, v, None, None], args, dtype=torch.float16)
    check(got, ref, torch.float16)
    assert all(torch.isfinite(t).all() for t in got[2:5])


def test_loss_through_lse_only():
    """d(loss)/d(inputs) when the loss uses only lse: the dlse term folded into delta must match autograd."""
    triton_fwd, triton_bwd = _kernels()
    case = CASES["pool-lengths"]
    (q, k, v, pk, pv), args = case.make(dtype=torch.float64, requires_grad=False)
    extra = (args["prefix_index"], args["prefix_lengths"], None, None)
    out, lse = triton_fwd.forward(q, k, v, pk, pv, *extra, True, 0.3)
    dlse = torch.randn_like(lse)
    grads = triton_bwd.backward(torch.zeros_like(out), dlse, q, k, v, pk, pv, *extra, out, lse, True, 0.3)
    ref_in = [t.clone().requires_grad_() for t in (q, k, v, pk, pv)]
    _, ref_lse = prefix_attention_reference(
        *ref_in,
        prefix_index=args["prefix_index"],
        prefix_lengths=args["prefix_lengths"],
        softmax_scale=0.3,
        return_lse=True,
    )
    ref_grads = torch.autograd.grad(ref_lse, ref_in, dlse, allow_unused=True)
    for name, a, b in zip(NAMES[2:], grads, ref_grads):
        assert rel_err(a, b if b is not None else torch.zeros_like(a)) <= 1e-10, name


def test_unchecked_pool_indices_and_lengths_are_clamped():
    """On the GPU values are not range-checked: indices outside [0, N) mean no prefix and lengths clamp to
    [0, P] in the training kernels too (as in the decode kernels), instead of indexing out of bounds."""
    from prefixattn.kernels import triton_backend

    b, hq, hkv, sq, d, p, n = 4, 2, 1, 20, 16, 6, 2  # Sq > 16: the training kernels, not the decode path
    q, k, v = (torch.randn(b, h, sq, d, dtype=torch.float64) for h in (hq, hkv, hkv))
    pk, pv = torch.randn(n, hkv, p, d, dtype=torch.float64), torch.randn(n, hkv, p, d, dtype=torch.float64)
    bad_idx, bad_len = torch.tensor([5, -3, 0, 1]), torch.tensor([99, -4])
    good_idx, good_len = torch.tensor([-1, -1, 0, 1]), torch.tensor([p, 0])
    dout = torch.randn(b, hq, sq, d, dtype=torch.float64)
    out, lse = triton_backend.forward(q, k, v, pk, pv, bad_idx, bad_len, None, None, True, d**-0.5)
    grads = triton_backend.backward(dout, None, q, k, v, pk, pv, bad_idx, bad_len, None, None, out, lse, True, d**-0.5)
    ref_in = [t.clone().requires_grad_() for t in (q, k, v, pk, pv)]
    ref_out = prefix_attention_reference(*ref_in, prefix_index=good_idx, prefix_lengths=good_len)
    ref_grads = torch.autograd.grad(ref_out, ref_in, dout)
    assert rel_err(out, ref_out) <= 1e-10
    for name, a, r in zip(NAMES[2:], grads, ref_grads):
        assert rel_err(a, r) <= 1e-10, name


def use_fused_backward(monkeypatch):
    """Route run_kernels' triton_bwd.backward calls to deterministic=False (dQ by atomics from the dK/dV
    kernels), and fail if the separate dQ kernel runs."""
    from prefixattn.kernels import triton_bwd

    real = triton_bwd.backward

    def backward(*args, **kwargs):
        return real(*args, **kwargs, deterministic=False)

    class NoDq:
        def __getitem__(self, grid):
            raise AssertionError("deterministic=False must not launch the dQ kernel")

    monkeypatch.setattr(triton_bwd, "backward", backward)
    monkeypatch.setattr(triton_bwd, "_bwd_dq_kernel", NoDq())
    return real


@pytest.fixture(params=["deterministic", "fused"])
def bwd_path(request, monkeypatch):
    """Both backward paths: the default deterministic one and deterministic=False."""
    if request.param == "fused":
        use_fused_backward(monkeypatch)
    return request.param


@pytest.mark.parametrize("deterministic", [True, False])
def test_torch_compile_fullgraph(deterministic):
    case = Case(batch=2, heads_q=4, heads_kv=2, seqlen_q=17, seqlen_k=17, head_dim=32, prefix_len=6, padding="left")
    tensors, args = case.make(dtype=torch.float32)

    def step(q, k, v, pk, pv, mask):
        out = prefix_attention(q, k, v, pk, pv, key_padding_mask=mask, backend="triton", deterministic=deterministic)
        return (out.float() ** 2).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(*tensors, args["key_padding_mask"])
    grads = torch.autograd.grad(loss, tensors)
    ref_in = [t.detach().double().requires_grad_() for t in tensors]
    ref = (prefix_attention_reference(*ref_in, key_padding_mask=args["key_padding_mask"]) ** 2).sum()
    ref_grads = torch.autograd.grad(ref, ref_in)
    assert abs(loss.item() - ref.item()) <= 1e-4 * abs(ref.item())
    for name, a, b in zip(NAMES[2:], grads, ref_grads):
        assert rel_err(a, b) <= TOLERANCE[torch.float32], name


# ------------------------------------------------------------------------------ prefix gradient reduction
@pytest.mark.parametrize("chunks", [1, 2, 5, 64])
def test_prefix_gradient_any_chunking(chunks):
    """Chunks that split sequences, cross pool-entry boundaries or outnumber the work all give the exact sum."""
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
    args["prefix_index"] = torch.tensor([2, 0, -1, 2, 0])  # unsorted, with a -1 and an unused entry (1)
    got, ref = run_kernels(tensors, args, dtype=torch.float64, chunks=chunks)
    check(got, ref, torch.float64)
    assert torch.equal(got[5][1], torch.zeros_like(got[5][1]))  # entry 1: no sequence uses it


def test_backward_is_bitwise_deterministic():
    triton_fwd, triton_bwd = _kernels()
    case = CASES["pool-noncontiguous-pad"]
    (q, k, v, pk, pv), args = case.make(dtype=torch.float32, requires_grad=False)
    extra = (args["prefix_index"], None, args["key_padding_mask"], None)
    out, lse = triton_fwd.forward(q, k, v, pk, pv, *extra, True, 0.2)
    dout = torch.randn_like(out)
    first = triton_bwd.backward(dout, None, q, k, v, pk, pv, *extra, out, lse, True, 0.2, prefix_chunks=4)
    second = triton_bwd.backward(dout, None, q, k, v, pk, pv, *extra, out, lse, True, 0.2, prefix_chunks=4)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_prefix_partials_do_not_grow_with_batch(monkeypatch):
    """The fp32 temporary for the prefix gradient is sized by the plan, which caps chunks independently of B."""
    from prefixattn.kernels import _triton_prefix_bwd as pb

    common = dict(
        heads_q=32, heads_kv=8, seq_q=2048, prefix_len=128, pool_size=1, block_m=32, block_p=128, sm_count=132
    )
    slots = {pb.plan(batch=b, **common).slots for b in (4, 64, 4096, 10**6)}
    assert len(slots) == 1 and slots.pop() <= pb.MAX_CHUNKS
    pooled = pb.plan(batch=10**6, **{**common, "pool_size": 50})
    assert pooled.slots == pooled.chunks + 49

    # And the kernels allocate exactly that: run two batch sizes and watch the allocation.
    seen = []
    real = pb.allocate_partials

    def spy(plan_, *a, **kw):
        bufs = real(plan_, *a, **kw)
        seen.append(bufs[0].shape)
        return bufs

    monkeypatch.setattr(pb, "allocate_partials", spy)
    monkeypatch.setattr(pb, "_INTERPRETER_SMS", 2)
    triton_fwd, triton_bwd = _kernels()
    for batch in (4, 8):
        case = Case(batch=batch, heads_q=2, heads_kv=1, seqlen_q=16, seqlen_k=16, head_dim=32, prefix_len=16)
        (q, k, v, pk, pv), args = case.make(dtype=torch.float32, requires_grad=False)
        out, lse = triton_fwd.forward(q, k, v, pk, pv, None, None, None, None, True, 0.2)
        triton_bwd.backward(torch.randn_like(out), None, q, k, v, pk, pv, None, None, None, None, out, lse, True, 0.2)
    assert seen[0] == seen[1] == (4, 1, 16, 32)  # 2 waves x 2 SMs / (1 prefix block x 1 KV head) = 4 chunks


# ------------------------------------------------------------------------------------------ random shapes
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batch=st.integers(1, 2),
    heads_kv=st.integers(1, 2),
    group=st.sampled_from([1, 2, 4]),
    seq_q=st.integers(1, 24),
    extra_k=st.integers(0, 12),
    head_dim=st.sampled_from([16, 24, 32]),
    prefix_len=st.integers(0, 20),
    pool=st.integers(0, 2),
    causal=st.booleans(),
    padding=st.sampled_from([None, "left", "random"]),
    seed=st.integers(0, 2**16),
)
def test_random_shapes(batch, heads_kv, group, seq_q, extra_k, head_dim, prefix_len, pool, causal, padding, seed):
    seq_k = seq_q + extra_k if causal else max(1, seq_q + extra_k - 6)
    case = Case(
        batch=batch,
        heads_q=heads_kv * group,
        heads_kv=heads_kv,
        seqlen_q=seq_q,
        seqlen_k=seq_k,
        head_dim=head_dim,
        prefix_len=prefix_len,
        pool=pool if prefix_len else 0,
        lengths=pool > 0,
        causal=causal,
        padding=padding,
    )
    g = torch.Generator().manual_seed(seed)
    tensors, args = case.make(dtype=torch.float64, requires_grad=False, generator=g)
    got, ref = run_kernels(tensors, args, dtype=torch.float64, chunks=1 + seed % 4)
    check(got, ref, torch.float64)


# --------------------------------------------------------------------------------------------------- GPU
GPU_CASES = {
    "causal-shared": dict(heads_q=8, heads_kv=8, causal=True),
    "noncausal-gqa": dict(heads_q=8, heads_kv=2, causal=False),
    "causal-gqa-pool-pad": dict(heads_q=8, heads_kv=2, causal=True, pool=3, lengths=True, padding="left"),
    "causal-noncontiguous": dict(heads_q=8, heads_kv=4, causal=True, noncontiguous=True),
}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(GPU_CASES))
def test_gpu_real_sizes(name, dtype, bwd_path):
    case = Case(batch=2, seqlen_q=1024, seqlen_k=1024, head_dim=128, prefix_len=128, **GPU_CASES[name])
    g = torch.Generator().manual_seed(5)
    tensors, args = case.make(dtype=dtype, device="cuda", requires_grad=False, generator=g)
    got, ref = run_kernels(tensors, args, dtype=dtype)
    check(got, ref, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 96, 256])
def test_gpu_head_dims_and_bias(head_dim, bwd_path):
    case = Case(
        batch=2, heads_q=4, heads_kv=2, seqlen_q=300, seqlen_k=333, head_dim=head_dim, prefix_len=77, padding="random"
    )
    g = torch.Generator().manual_seed(6)
    tensors, args = case.make(dtype=torch.bfloat16, device="cuda", requires_grad=False, generator=g)
    bias = make_bias(case, "broadcast", torch.float32, device="cuda", neg_inf=0.05, generator=g)
    got, ref = run_kernels(tensors, args, dtype=torch.bfloat16, bias=bias)
    check(got, ref, torch.bfloat16)


@pytest.mark.gpu
def test_gpu_fp32_decode_like(bwd_path):
    case = Case(batch=3, heads_q=8, heads_kv=2, seqlen_q=3, seqlen_k=515, head_dim=128, prefix_len=64, pool=2)
    tensors, args = case.make(dtype=torch.float32, device="cuda", requires_grad=False)
    got, ref = run_kernels(tensors, args, dtype=torch.float32)
    check(got, ref, torch.float32)


@pytest.mark.gpu
def test_gpu_backward_deterministic():
    triton_fwd, triton_bwd = _kernels()
    case = Case(batch=4, heads_q=8, heads_kv=2, seqlen_q=512, seqlen_k=512, head_dim=128, prefix_len=96, pool=2)
    (q, k, v, pk, pv), args = case.make(dtype=torch.bfloat16, device="cuda", requires_grad=False)
    extra = (args["prefix_index"], None, None, None)
    out, lse = triton_fwd.forward(q, k, v, pk, pv, *extra, True, 128**-0.5)
    dout = torch.randn_like(out)
    first = triton_bwd.backward(dout, None, q, k, v, pk, pv, *extra, out, lse, True, 128**-0.5)
    second = triton_bwd.backward(dout, None, q, k, v, pk, pv, *extra, out, lse, True, 128**-0.5)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
