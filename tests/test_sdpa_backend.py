"""The "sdpa" backend (fused vendor attention on the sequence keys + Triton prefix merge) against the reference.

On the CPU the sequence part runs PyTorch's flash CPU kernel (float64 works) and the prefix part Triton's
interpreter, so the composition itself - the merge of the forward states and the vendor backward fed the final
(out, lse) - is checked exactly in float64. The cuDNN and flash CUDA kernels are checked in the GPU tests.
"""

from __future__ import annotations

import pytest
import torch
from helpers import TOLERANCE, Case, grads_of, rel_err
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prefixattn import prefix_attention
from prefixattn.reference import prefix_attention_reference

NAMES = ("out", "lse", "dq", "dk", "dv", "dprefix_k", "dprefix_v")


def run_both(case: Case, dtype, device="cpu", *, grad_lse=False, generator=None, **kwargs):
    """(sdpa backend results, float64 reference results) for one random case, forward and gradients."""
    tensors, args = case.make(dtype=dtype, device=device, generator=generator)
    out, lse = prefix_attention(*tensors, **args, backend="sdpa", deterministic=False, return_lse=True, **kwargs)
    g = torch.Generator().manual_seed(3)
    dout = torch.randn(out.shape, generator=g, dtype=torch.float64)
    dlse = torch.randn(lse.shape, generator=g, dtype=torch.float64)
    outs, gouts = [out], [dout.to(device, dtype)]
    if grad_lse:
        outs.append(lse)
        gouts.append(dlse.to(device, lse.dtype))
    got = [out, lse, *grads_of(outs, tensors, gouts)]

    ref_in = [t.detach().double().cpu().requires_grad_() if t is not None else None for t in tensors]
    ref_args = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    ref_out, ref_lse = prefix_attention_reference(*ref_in, **ref_args, return_lse=True)
    routs, rgouts = [ref_out], [dout]
    if grad_lse:
        routs.append(ref_lse)
        rgouts.append(dlse)
    ref = [ref_out, ref_lse, *grads_of(routs, ref_in, rgouts)]
    return got, ref


def check(got, ref, dtype):
    for name, a, b in zip(NAMES, got, ref):
        if b is None:
            assert a is None, name
            continue
        assert a.shape == b.shape, (name, a.shape, b.shape)
        err = rel_err(a.cpu(), b)
        assert err <= TOLERANCE[dtype], f"{name}: rel err {err:.3g} > {TOLERANCE[dtype]:g}"


# What test_conformance.py's shared matrix does not cover for this backend (causal Sq=Sk, Sq=1 causal, pools
# with lengths, the HF layout, no prefix and prefix only are there): long prefix tails, cross-attention with a
# prefix longer than a tile, non-causal decode.
CASES = {
    "causal-gqa-tail": dict(heads_q=4, heads_kv=1, seqlen_q=40, seqlen_k=40, prefix_len=19, head_dim=24),
    "noncausal-cross": dict(heads_q=4, heads_kv=2, seqlen_q=13, seqlen_k=50, prefix_len=20, causal=False),
    "decode-like": dict(heads_q=8, heads_kv=2, seqlen_q=1, seqlen_k=33, prefix_len=16, causal=False),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference_float64(name):
    got, ref = run_both(Case(**CASES[name]), torch.float64)
    check(got, ref, torch.float64)


def test_matches_reference_float32():
    got, ref = run_both(Case(batch=2, heads_q=4, heads_kv=2, seqlen_q=33, seqlen_k=33, prefix_len=20), torch.float32)
    check(got, ref, torch.float32)


@pytest.mark.parametrize("noncontiguous", [False, True], ids=["bhsd", "bshd"])
def test_output_and_gradient_layouts(noncontiguous):
    """out follows q's layout (so the vendor backward's dO matches it without a copy), every gradient has its
    input's strides, and the custom op's fake implementations declare exactly these (opcheck)."""
    case = Case(heads_q=4, heads_kv=2, seqlen_q=21, seqlen_k=21, prefix_len=9, noncontiguous=noncontiguous)
    tensors, args = case.make()
    q = tensors[0]
    out = prefix_attention(*tensors, **args, backend="sdpa", deterministic=False)
    assert out.stride() == q.stride()
    grads = grads_of(out, tensors, torch.randn_like(out))
    for t, g in zip(tensors, grads):
        assert g.stride() == t.stride()
    out_np = prefix_attention(*tensors[:3], **args, backend="sdpa", deterministic=False)  # no prefix
    assert out_np.stride() == q.stride()
    fwd_args = (*tensors, None, None, None, None, True, 0.2, "sdpa", False)
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.prefixattn.attention_fwd.default, fwd_args, test_utils=checks)
    o, lse = torch.ops.prefixattn.attention_fwd.default(*fwd_args)
    bwd_args = (
        torch.randn_like(o),
        None,
        *[t.detach() for t in tensors],
        None,
        None,
        None,
        None,
        o.detach(),
        lse,
        True,
        0.2,
        "sdpa",
        False,
    )
    torch.library.opcheck(torch.ops.prefixattn.attention_bwd.default, bwd_args, test_utils=("test_faketensor",))


def test_vendor_backward_gets_the_final_out_and_lse(monkeypatch):
    """Without dlse the sequence gradients come from the vendor backward, fed the merged (out, lse); with a
    gradient through lse the triton backward runs instead. Both match the reference."""
    from prefixattn.kernels import sdpa_backend

    calls = []
    real = sdpa_backend._sequence_backward

    def spy(dout, q, k, v, out, lse, causal, scale):
        calls.append((out.data_ptr(), lse.data_ptr()))
        return real(dout, q, k, v, out, lse, causal, scale)

    monkeypatch.setattr(sdpa_backend, "_sequence_backward", spy)
    case = Case(heads_q=4, heads_kv=2, seqlen_q=25, seqlen_k=25, prefix_len=7)
    got, ref = run_both(case, torch.float64)
    check(got, ref, torch.float64)
    assert len(calls) == 1 and calls[0] == (got[0].data_ptr(), got[1].data_ptr())
    got, ref = run_both(case, torch.float64, grad_lse=True)
    check(got, ref, torch.float64)
    assert len(calls) == 1


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batch=st.integers(1, 3),
    heads_kv=st.integers(1, 2),
    group=st.sampled_from([1, 2, 4]),
    seq=st.integers(1, 40),
    extra_k=st.integers(0, 20),
    head_dim=st.sampled_from([16, 24, 32]),
    prefix_len=st.integers(0, 40),
    pool=st.integers(0, 2),
    causal=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_shapes(batch, heads_kv, group, seq, extra_k, head_dim, prefix_len, pool, causal, seed):
    case = Case(
        batch=batch,
        heads_q=heads_kv * group,
        heads_kv=heads_kv,
        seqlen_q=seq,
        seqlen_k=seq if causal else seq + extra_k,
        head_dim=head_dim,
        prefix_len=prefix_len,
        pool=pool if prefix_len else 0,
        lengths=pool > 0,
        causal=causal,
    )
    got, ref = run_both(case, torch.float64, generator=torch.Generator().manual_seed(seed))
    check(got, ref, torch.float64)


def test_compiles_whole():
    case = Case(heads_q=4, heads_kv=2, seqlen_q=20, seqlen_k=20, prefix_len=6)
    (q, k, v, pk, pv), args = case.make()

    def f(q, pk):
        return prefix_attention(q, k, v, pk, pv, backend="sdpa", deterministic=False).square().sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(q, pk), (q, pk))
    want = torch.autograd.grad(f(q, pk), (q, pk))
    for a, b in zip(got, want):
        assert rel_err(a, b) <= 1e-12


# ----------------------------------------------------------------------------------------------- refusals
def _tensors(**kw):
    return Case(**kw).make()


def test_training_needs_deterministic_false():
    (q, k, v, pk, pv), _ = _tensors()
    with pytest.raises(ValueError, match="deterministic=False"):
        prefix_attention(q, k, v, pk, pv, backend="sdpa")
    with torch.no_grad():  # inference: the forward is deterministic, no opt-in needed
        prefix_attention(q, k, v, pk, pv, backend="sdpa")


@pytest.mark.parametrize("what", ["padding", "bias", "causal-nonsquare"])
def test_refuses_what_the_vendor_kernels_cannot_take(what):
    case = (
        Case(padding="right")
        if what == "padding"
        else Case(seqlen_q=5, seqlen_k=9)
        if what == "causal-nonsquare"
        else Case()
    )
    (q, k, v, pk, pv), args = case.make(requires_grad=False)
    if what == "bias":
        args["attn_bias"] = torch.zeros(1, 1, case.seqlen_q, case.seqlen_k, dtype=torch.float64)
    match = {"padding": "key_padding_mask", "bias": "attn_bias", "causal-nonsquare": "Sq == Sk"}[what]
    with pytest.raises(ValueError, match=match):
        prefix_attention(q, k, v, pk, pv, **args, backend="sdpa", deterministic=False)


def test_refuses_cpu_without_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    (q, k, v, pk, pv), args = Case().make(requires_grad=False)
    with pytest.raises(ValueError, match="Triton needs a CUDA device"):
        prefix_attention(q, k, v, pk, pv, **args, backend="sdpa")


# --------------------------------------------------------------------------------------------------- GPU
GPU_CASES = {
    "causal-mha": dict(heads_q=8, heads_kv=8),
    "causal-gqa-pool": dict(heads_q=8, heads_kv=2, pool=3, lengths=True),
    "noncausal-cross": dict(heads_q=8, heads_kv=2, causal=False, seqlen_q=300, seqlen_k=777),
    "hf-layout": dict(heads_q=8, heads_kv=4, noncontiguous=True),
}


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["cudnn", "flash"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(GPU_CASES))
def test_gpu_against_reference(name, dtype, head_dim, kernel, monkeypatch):
    from prefixattn.kernels import sdpa_backend

    monkeypatch.setattr(sdpa_backend, "SEQUENCE_KERNEL", kernel)
    params = dict(batch=2, seqlen_q=1024, seqlen_k=1024, head_dim=head_dim, prefix_len=128)
    params.update(GPU_CASES[name])
    case = Case(**params)
    (q, k, v, _, _), _ = case.make(dtype=dtype, device="cuda", requires_grad=False)
    if sdpa_backend.sequence_kernel_for(q, k, v, case.causal, needs_grad=True) is None:
        pytest.skip(f"torch cannot run {kernel} for this shape")
    got, ref = run_both(case, dtype, device="cuda", generator=torch.Generator().manual_seed(7))
    check(got, ref, dtype)


@pytest.mark.gpu
def test_gpu_prefers_cudnn_on_hopper():
    """Unpinned, the H200 runs the sequence part on cuDNN (the fast one), in both layouts and with gradients;
    if this fails, "sdpa" is running flash and its timings say nothing about the design."""
    from prefixattn.kernels import sdpa_backend

    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the cuDNN preference is asserted for Hopper")
    for layout in ("bhsd", "bshd", "llama"):  # llama: q [B, S, H, D] memory, k and v contiguous (as in HF)
        case = Case(
            batch=2,
            heads_q=8,
            heads_kv=2,
            seqlen_q=512,
            seqlen_k=512,
            head_dim=128,
            prefix_len=64,
            noncontiguous=layout != "bhsd",
        )
        (q, k, v, _, _), _ = case.make(dtype=torch.bfloat16, device="cuda", requires_grad=False)
        if layout == "llama":
            k, v = k.contiguous(), v.contiguous()
        for grad in (False, True):
            assert sdpa_backend.sequence_kernel_for(q, k, v, True, needs_grad=grad) == "cudnn", (layout, grad)


@pytest.mark.gpu
def test_gpu_inference_without_opt_in():
    case = Case(batch=2, heads_q=8, heads_kv=2, seqlen_q=512, seqlen_k=512, head_dim=128, prefix_len=64)
    (q, k, v, pk, pv), args = case.make(dtype=torch.bfloat16, device="cuda", requires_grad=False)
    out = prefix_attention(q, k, v, pk, pv, **args, backend="sdpa")
    ref = prefix_attention_reference(q.double(), k.double(), v.double(), pk.double(), pv.double(), **args)
    assert rel_err(out, ref) <= TOLERANCE[torch.bfloat16]


def test_out_of_range_pool_index_means_no_prefix():
    """Unchecked (validate_values=False, the GPU default) an index outside the pool is "no prefix", as on the
    other backends: never an out-of-bounds read."""
    case = Case(batch=3, heads_q=4, heads_kv=2, seqlen_q=12, seqlen_k=12, prefix_len=6, pool=2)
    (q, k, v, pk, pv), args = case.make(requires_grad=False)
    bad = dict(args, prefix_index=torch.tensor([0, 7, -5]))
    out = prefix_attention(q, k, v, pk, pv, **bad, backend="sdpa", validate_values=False)
    want = prefix_attention_reference(q, k, v, pk, pv, **dict(args, prefix_index=torch.tensor([0, -1, -1])))
    assert rel_err(out, want) <= TOLERANCE[torch.float64]


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gpu_llama_layout_mix_against_reference(head_dim):
    """transformers' Llama hands over q as [B, S, H, D] memory but k and v contiguous: cuDNN must get this mix
    right, forward and backward (a hand-called cuDNN op is known to be layout-sensitive)."""
    g = torch.Generator(device="cuda").manual_seed(11)
    b, hq, hkv, s, p = 2, 8, 2, 640, 96

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device="cuda", dtype=torch.bfloat16)

    q = rnd(b, s, hq, head_dim).transpose(1, 2).requires_grad_()
    k, v = rnd(b, hkv, s, head_dim).requires_grad_(), rnd(b, hkv, s, head_dim).requires_grad_()
    pk, pv = rnd(hkv, p, head_dim).requires_grad_(), rnd(hkv, p, head_dim).requires_grad_()
    out = prefix_attention(q, k, v, pk, pv, backend="sdpa", deterministic=False)
    dout = rnd(b, s, hq, head_dim).transpose(1, 2)  # as the gradient of out.transpose(1, 2).reshape(...)
    grads = torch.autograd.grad(out, (q, k, v, pk, pv), dout)
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v, pk, pv)]
    ref = prefix_attention_reference(*ref_in)
    ref_grads = torch.autograd.grad(ref, ref_in, dout.double())
    assert rel_err(out, ref) <= TOLERANCE[torch.bfloat16]
    for name, a, r in zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v"), grads, ref_grads):
        assert rel_err(a, r) <= TOLERANCE[torch.bfloat16], name
