"""Every registered backend against the float64 reference on one shared case matrix, both entry points.

Driven by prefixattn.kernels.REGISTRY: a backend is checked by being registered (CHECKED says in which dtype
it is checked and whether it needs a GPU; a registered backend missing there fails the suite). For each
backend x case: if the backend's unsupported_reason refuses the problem, prefix_attention must refuse it
with that reason as a clean ValueError naming `backend` (and the refusal must be one EXPECTED_REFUSALS
lists, so a backend cannot pass by refusing everything); otherwise out, lse and, for trainable backends,
the gradients of q, k, v and the prefix must match prefixattn.reference within TOLERANCE (tests/helpers.py).
The paged entry (prefix_attention_paged) is checked the same way against paged_reference.

What is specific to one backend (forced decode plans, tile coverage, vendor-kernel routing, CUDA graphs,
compile checks) stays in that backend's test file.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

import pytest
import torch
from helpers import TOLERANCE, Case, grads_of, make_paged, rel_err

from prefixattn import kernels, prefix_attention, prefix_attention_paged, prefix_attention_reference
from prefixattn.paged import paged_reference, validate_paged
from prefixattn.validation import BACKENDS, validate


@dataclass(frozen=True)
class Checked:
    dtype: torch.dtype  # the inputs' dtype (the reference always runs in float64)
    gpu: bool = False  # its cases need a CUDA device (marked gpu)
    head_dim: int | None = None  # replaces the cases' head dim where the kernels take only a few
    deterministic: bool = True  # what the calls pass (sdpa trains only with deterministic=False)
    gpu_dtype: torch.dtype | None = None  # the dtype where the tests run on a GPU, if not `dtype`


# triton in float32: its decode kernels (Sq <= 16) take no float64, and float32 runs both of its routes.
# On a machine with a GPU every case runs there (conftest only sets TRITON_INTERPRET without one).
CHECKED = {
    "torch": Checked(torch.float64),
    "triton": Checked(torch.float32),
    "sdpa": Checked(torch.float64, deterministic=False, gpu_dtype=torch.float16),
    "cuda": Checked(torch.float16, gpu=True, head_dim=64),
}

# The shared matrix: tiny odd shapes (the Triton interpreter is slow), every feature of the op.
CASES = {
    "gqa": Case(batch=2, heads_q=4, heads_kv=2, seqlen_q=13, seqlen_k=13, head_dim=16, prefix_len=5),
    "mha-hf-layout": Case(
        batch=2, heads_q=2, heads_kv=2, seqlen_q=11, seqlen_k=11, head_dim=24, prefix_len=7, noncontiguous=True
    ),
    "sq<sk-causal": Case(batch=2, heads_q=4, heads_kv=1, seqlen_q=5, seqlen_k=19, head_dim=16, prefix_len=3),
    "sq=1": Case(batch=3, heads_q=8, heads_kv=2, seqlen_q=1, seqlen_k=23, head_dim=16, prefix_len=6),
    "sq=17": Case(batch=1, heads_q=2, heads_kv=1, seqlen_q=17, seqlen_k=17, head_dim=16, prefix_len=4),
    "pool-lengths": Case(
        batch=4, heads_q=2, heads_kv=1, seqlen_q=9, seqlen_k=9, head_dim=16, prefix_len=6, pool=3, lengths=True
    ),
    "pool-decode-padding": Case(
        batch=3,
        heads_q=4,
        heads_kv=2,
        seqlen_q=2,
        seqlen_k=17,
        head_dim=16,
        prefix_len=5,
        pool=2,
        lengths=True,
        padding="left",
    ),
    "padding-right": Case(batch=2, heads_q=2, heads_kv=1, seqlen_q=12, seqlen_k=12, head_dim=16, padding="right"),
    "padding-random-cross": Case(
        batch=2,
        heads_q=2,
        heads_kv=2,
        seqlen_q=7,
        seqlen_k=20,
        head_dim=16,
        prefix_len=4,
        padding="random",
        causal=False,
    ),
    "cross-noncausal": Case(batch=2, heads_q=4, heads_kv=2, seqlen_q=7, seqlen_k=20, head_dim=16, causal=False),
    "sq>sk-noncausal": Case(batch=2, heads_q=2, heads_kv=1, seqlen_q=9, seqlen_k=4, head_dim=16, causal=False),
    "no-prefix": Case(batch=2, heads_q=4, heads_kv=2, seqlen_q=10, seqlen_k=10, head_dim=16, prefix_len=0),
    "prefix-only": Case(
        batch=3, heads_q=2, heads_kv=1, seqlen_q=4, seqlen_k=0, head_dim=16, prefix_len=6, pool=2, causal=False
    ),
}
LSE_GRAD = {"pool-lengths", "sq=1", "gqa"}  # cases whose loss also flows through lse

# (backend, case) pairs its unsupported_reason must refuse; every other pair must run and match.
_SDPA_REFUSES = {"sq<sk-causal", "pool-decode-padding", "padding-right", "padding-random-cross"}
_CUDA_REFUSES = {"sq=17"}  # decode kernels: Sq <= 16 (and inference only: run without gradients)
EXPECTED_REFUSALS = {("sdpa", c) for c in _SDPA_REFUSES} | {("cuda", c) for c in _CUDA_REFUSES}


def _backend_params(kind: str):
    """One pytest param per registered backend serving `kind`; GPU-only ones are marked gpu."""
    return [
        pytest.param(b.name, marks=[pytest.mark.gpu] if CHECKED[b.name].gpu else [], id=b.name)
        for b in kernels.REGISTRY
        if kind in b.kinds and b.name in CHECKED
    ]


def test_every_registered_backend_is_checked():
    names = [b.name for b in kernels.REGISTRY]
    assert set(names) == set(CHECKED), "a registered backend needs a CHECKED entry (or an unused one is left)"
    assert set(BACKENDS) == {"auto", *names}, "validation.BACKENDS must name exactly the registered backends"
    for b in kernels.REGISTRY:
        assert set(b.kinds) <= set(kernels.KINDS) and b.kinds
        if b.load is not None:
            module = kernels.get_backend(b.name)
            need = ["new_out", "unsupported_reason", "forward"] + (["backward"] if b.trainable else [])
            need += ["unsupported_reason_paged", "paged_forward"] if "paged" in b.kinds else []
            assert all(callable(getattr(module, n, None)) for n in need), (b.name, need)


def _device_and_dtype(checked: Checked) -> tuple[torch.device, torch.dtype]:
    if checked.gpu or torch.cuda.is_available():
        return torch.device("cuda"), checked.gpu_dtype or checked.dtype
    return torch.device("cpu"), checked.dtype


def _case(name: str, checked: Checked) -> Case:
    case = CASES[name]
    if checked.head_dim is not None:
        case = Case(**{**case.__dict__, "head_dim": checked.head_dim})
    return case


def _refusal(name: str, reason: str):
    return pytest.raises(ValueError, match="^" + re.escape(f"backend: {name!r} cannot run this call: {reason}"))


@pytest.mark.parametrize("case_name", list(CASES))
@pytest.mark.parametrize("name", _backend_params("dense"))
def test_dense_entry(name, case_name):
    checked, rec = CHECKED[name], kernels.record(name)
    device, dtype = _device_and_dtype(checked)
    case = _case(case_name, checked)
    g = torch.Generator().manual_seed(zlib.crc32(case_name.encode()))
    tensors, args = case.make(dtype=torch.float64, requires_grad=False, generator=g)
    tensors = [None if t is None else t.to(device=device, dtype=dtype) for t in tensors]
    args = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    needs_grad = rec.trainable
    if needs_grad:
        for t in tensors:
            if t is not None:
                t.requires_grad_(True)
    call = dict(args, return_lse=True, backend=name, deterministic=checked.deterministic)

    problem = validate(*tensors, **args)
    reason = kernels.unsupported_reason(
        name, problem, "dense", needs_grad=needs_grad, deterministic=checked.deterministic
    )
    assert (reason is not None) == ((name, case_name) in EXPECTED_REFUSALS), reason
    if reason is not None:
        with _refusal(name, reason):
            prefix_attention(*tensors, **call)
        return
    if not rec.trainable:  # an inference-only backend refuses a call that needs gradients, and runs without
        with pytest.raises(ValueError, match=f"^backend: {name!r} cannot run this call: "):
            prefix_attention(*[None if t is None else t.detach().requires_grad_() for t in tensors], **call)

    out, lse = prefix_attention(*tensors, **call)
    ref_in = [None if t is None else t.detach().double().cpu().requires_grad_() for t in tensors]
    ref_args = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    ref_out, ref_lse = prefix_attention_reference(*ref_in, **ref_args, return_lse=True)
    tol = TOLERANCE[dtype]
    assert out.shape == ref_out.shape and out.dtype == dtype and lse.shape == ref_lse.shape
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    if rec.load is not None:  # the layout the backend declares to the custom op's fake implementation
        assert out.stride() == kernels.get_backend(name).new_out(tensors[0]).stride()
    assert rel_err(out.cpu(), ref_out) <= tol, f"out rel err {rel_err(out.cpu(), ref_out):.3g}"
    assert rel_err(lse.cpu(), ref_lse) <= tol, f"lse rel err {rel_err(lse.cpu(), ref_lse):.3g}"
    if not needs_grad:
        return

    gen = torch.Generator().manual_seed(1)
    g_out = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    g_lse = torch.randn(lse.shape, generator=gen, dtype=torch.float64) if case_name in LSE_GRAD else None

    def loss(o, l, like):
        total = (o * g_out.to(like.device, o.dtype)).sum()
        if g_lse is not None:  # rows with nothing to attend (lse = -inf) carry no gradient
            total = total + (torch.where(torch.isinf(l), 0, l) * g_lse.to(like.device, l.dtype)).sum()
        return total

    got = grads_of(loss(out, lse, out), tensors, None)
    want = grads_of(loss(ref_out, ref_lse, ref_out), ref_in, None)
    for what, a, b in zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v"), got, want):
        if b is None:
            assert a is None, what
            continue
        assert a.shape == b.shape and not torch.isnan(a).any(), what
        assert rel_err(a.cpu(), b) <= tol, f"{what}: rel err {rel_err(a.cpu(), b):.3g}"


# --- the paged entry ------------------------------------------------------------------------------------

PAGED_CASES = {
    "decode-shared": dict(batch=3, heads_q=4, heads_kv=2, seqlen_q=1, page_size=5, max_pages=6, prefix_len=6),
    "gqa8-sq3-pool-lengths": dict(
        batch=4, heads_q=8, heads_kv=1, seqlen_q=3, page_size=4, max_pages=5, prefix_len=7, pool=3, lengths=True
    ),
    "page1-no-prefix": dict(batch=2, heads_q=4, heads_kv=2, seqlen_q=2, page_size=1, max_pages=19),
    "short-and-empty": dict(
        batch=3, heads_q=4, heads_kv=2, seqlen_q=2, page_size=4, max_pages=5, seq_lens=[0, 1, 17], prefix_len=3
    ),
    "strided": dict(
        batch=2,
        heads_q=4,
        heads_kv=2,
        seqlen_q=3,
        head_dim=32,
        page_size=8,
        max_pages=3,
        prefix_len=5,
        interleaved=True,
        noncontiguous_q=True,
    ),
}


@pytest.mark.parametrize("case_name", list(PAGED_CASES))
@pytest.mark.parametrize("name", _backend_params("paged"))
def test_paged_entry(name, case_name):
    checked = CHECKED[name]
    device, dtype = _device_and_dtype(checked)
    params = dict(PAGED_CASES[case_name], seed=zlib.crc32(case_name.encode()))
    if checked.head_dim is not None:
        params["head_dim"] = checked.head_dim
    (q, kc, vc, bt, sl, pk, pv), kw = make_paged(**params)
    ref, ref_lse = paged_reference(q, kc, vc, bt, sl, pk, pv, return_lse=True, **kw)

    def cast(t):  # .to keeps the strides (interleaved caches, [B, S, H, D] queries)
        return None if t is None else t.to(device=device, dtype=dtype)

    inputs = (cast(q), cast(kc), cast(vc), bt.to(device), sl.to(device), cast(pk), cast(pv))
    kw = {k: v.to(device) for k, v in kw.items()}
    problem = validate_paged(*inputs, **kw)
    reason = kernels.unsupported_reason(name, problem, "paged", needs_grad=False)
    assert reason is None, reason  # the matrix holds only calls every paged backend serves
    out, lse = prefix_attention_paged(*inputs, return_lse=True, backend=name, **kw)
    tol = TOLERANCE[dtype]
    assert out.shape == q.shape and out.dtype == dtype
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    if kernels.record(name).load is not None:
        assert out.stride() == kernels.get_backend(name).new_out(inputs[0]).stride()
    assert rel_err(out.cpu(), ref) <= tol and rel_err(lse.cpu(), ref_lse) <= tol


@pytest.mark.parametrize(
    "name, dtype, reason",
    [
        ("sdpa", torch.float32, "it has no paged entry (it serves dense calls)"),
        ("triton", torch.float64, "float64 runs on backend 'torch' only"),
        ("cuda", torch.float32, None),  # on the CPU: the extension or the device, whichever it names first
    ],
)
def test_paged_refusals_are_clean(name, dtype, reason):
    (q, kc, vc, bt, sl, pk, pv), kw = make_paged(prefix_len=3)
    inputs = (q.to(dtype), kc.to(dtype), vc.to(dtype), bt, sl, pk.to(dtype), pv.to(dtype))
    if reason is None:
        reason = kernels.unsupported_reason(name, validate_paged(*inputs, **kw), "paged", needs_grad=False)
        assert reason
    with _refusal(name, reason):
        prefix_attention_paged(*inputs, backend=name, **kw)


# --- choosing ---------------------------------------------------------------------------------------------


def test_auto_follows_the_table_in_order():
    """On a GPU "auto" takes the first backend whose auto entry covers the call and that can run it; on the
    CPU, dropout or an attn_bias that needs a gradient, the reference."""
    (q, k, v, pk, pv), args = CASES["sq=1"].make(dtype=torch.float32, requires_grad=False)
    problem = validate(q, k, v, pk, pv, **args)
    assert kernels.choose("auto", problem) == "torch"  # CPU
    on_gpu = type(problem)(**{**problem.__dict__, "device": torch.device("cuda")})
    expect = next(
        b.name
        for b in kernels.REGISTRY
        if kernels.preferred(b.name, on_gpu) and kernels.unsupported_reason(b.name, on_gpu, needs_grad=False) is None
    )
    assert kernels.choose("auto", on_gpu) == expect
    assert kernels.choose("auto", on_gpu, dropout_p=0.1) == "torch"
    assert kernels.choose("auto", on_gpu, bias_needs_grad=True) == "torch"
    assert kernels.choose("torch", on_gpu) == "torch"
    with pytest.raises(ValueError, match="^kind: expected one of"):
        kernels.choose("auto", problem, "ragged")
