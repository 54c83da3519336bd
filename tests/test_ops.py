"""The op layer: backend choice, the custom-op plumbing (autograd, lse gradient, torch.compile).

The plumbing is tested with a stand-in backend built on the reference, so a failure here points at
ops.py and not at a kernel.
"""

import types

import pytest
import torch
from helpers import Case, grads_of, rel_err

import prefixattn
import prefixattn.kernels as kernels
from prefixattn import prefix_attention, prefix_attention_reference


def _reference_backend():
    """A backend module with the kernel interface, computed by the reference (float64 inside)."""

    def forward(q, k, v, pk, pv, pidx, plen, kpm, bias, causal, scale):
        out, lse = prefix_attention_reference(
            q,
            k,
            v,
            pk,
            pv,
            prefix_index=pidx,
            prefix_lengths=plen,
            causal=causal,
            key_padding_mask=kpm,
            softmax_scale=scale,
            attn_bias=bias,
            return_lse=True,
        )
        b, h, s, d = q.shape
        mem = torch.empty(b, s, h, d, dtype=out.dtype)
        mem.copy_(out.transpose(1, 2))
        return mem.transpose(1, 2), lse.float()

    def backward(dout, dlse, q, k, v, pk, pv, pidx, plen, kpm, bias, out, lse, causal, scale, *, deterministic=True):
        # Custom-op implementations run below autograd, so this is the analytic backward, written
        # independently of the kernels: P = exp(S - lse), dS = P * (dP - delta), delta = rowsum(dO*O) - dlse.
        from prefixattn.reference import gather_prefix, prefix_valid_mask, sequence_visible_mask

        f = lambda t: t.double()  # noqa: E731
        B, Hq, Sq, D = q.shape
        Hkv, Sk, G = k.shape[1], k.shape[2], q.shape[1] // k.shape[1]
        rep = lambda t: t.repeat_interleave(G, dim=1)  # noqa: E731
        keys, vals = rep(f(k)), rep(f(v))
        s = torch.matmul(f(q), keys.transpose(-1, -2)) * scale + (f(bias) if bias is not None else 0)
        s = s.masked_fill(~sequence_visible_mask(B, Sq, Sk, q.device, causal, kpm), float("-inf"))
        P_len = 0
        if pk is not None:
            P_len = pk.shape[-2]
            pkb, pvb = rep(f(gather_prefix(pk, B, pidx))), rep(f(gather_prefix(pv, B, pidx)))
            valid = prefix_valid_mask(B, P_len, q.device, 1 if pk.dim() == 3 else pk.shape[0], pidx, plen)
            sp = (torch.matmul(f(q), pkb.transpose(-1, -2)) * scale).masked_fill(~valid[:, None, None], float("-inf"))
            s = torch.cat([sp, s], -1)
            keys, vals = torch.cat([pkb, keys], -2), torch.cat([pvb, vals], -2)
        L = f(lse)[..., None]
        prob = torch.where(torch.isinf(L), torch.zeros_like(s), torch.exp(s - torch.where(torch.isinf(L), 0, L)))
        delta = (f(dout) * f(out)).sum(-1, keepdim=True) - (f(dlse)[..., None] if dlse is not None else 0)
        dp = torch.matmul(f(dout), vals.transpose(-1, -2))
        ds = prob * (dp - delta)
        dq = torch.matmul(ds, keys) * scale
        dkeys = torch.matmul(ds.transpose(-1, -2), f(q)) * scale
        dvals = torch.matmul(prob.transpose(-1, -2), f(dout))
        unrep = lambda t: t.view(B, Hkv, G, *t.shape[2:]).sum(2)  # noqa: E731
        dkeys, dvals = unrep(dkeys), unrep(dvals)
        dk, dv = dkeys[:, :, P_len:], dvals[:, :, P_len:]
        dpk = dpv = None
        if pk is not None:
            if pk.dim() == 3:
                dpk, dpv = dkeys[:, :, :P_len].sum(0), dvals[:, :, :P_len].sum(0)
            else:
                dpk, dpv = torch.zeros_like(f(pk)), torch.zeros_like(f(pv))
                for b in range(B):
                    if int(pidx[b]) >= 0:
                        dpk[int(pidx[b])] += dkeys[b, :, :P_len]
                        dpv[int(pidx[b])] += dvals[b, :, :P_len]
            dpk, dpv = dpk.to(pk.dtype), dpv.to(pv.dtype)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dpk, dpv

    return types.SimpleNamespace(
        forward=forward,
        backward=backward,
        new_out=kernels.bshd_empty,
        unsupported_reason=lambda problem, needs_grad, deterministic=True: None,
    )


@pytest.fixture
def fake_triton(monkeypatch):
    fake = _reference_backend()
    real = kernels.get_backend
    monkeypatch.setattr(kernels, "get_backend", lambda name: fake if name == "triton" else real(name))
    monkeypatch.setattr(
        kernels, "unsupported_reason", lambda name, problem, kind="dense", *, needs_grad, deterministic=True: None
    )
    return fake


def test_auto_picks_reference_on_cpu():
    (q, k, v, pk, pv), args = Case().make(requires_grad=False)
    out = prefix_attention(q, k, v, pk, pv, **args)
    assert out.is_contiguous()  # the reference's layout; kernel outputs are [B, Sq, Hq, D] memory
    assert rel_err(out, prefix_attention_reference(q, k, v, pk, pv, **args)) == 0


@pytest.mark.parametrize(
    "case",
    [Case(), Case(pool=3, lengths=True, batch=3, padding="left"), Case(prefix_len=0)],
    ids=["shared", "pool", "noprefix"],
)
def test_custom_op_autograd_matches_reference(fake_triton, case):
    (q, k, v, pk, pv), args = case.make()
    g_out = torch.randn(q.shape, dtype=torch.float64)
    g_lse = torch.randn(q.shape[:3], dtype=torch.float64)

    def loss(fn, backend):
        out, lse = fn(q, k, v, pk, pv, return_lse=True, backend=backend, **args)
        assert out.shape == q.shape and lse.shape == q.shape[:3]
        return (out * g_out).sum() + (torch.where(torch.isinf(lse), 0, lse) * g_lse).sum()

    want = grads_of(loss(prefix_attention, "torch"), [q, k, v, pk, pv], None)
    got = grads_of(loss(prefix_attention, "triton"), [q, k, v, pk, pv], None)
    for name, g, w in zip("q k v prefix_k prefix_v".split(), got, want):
        if w is None or (pk is not None and pk.shape[-2] == 0 and name.startswith("prefix")):
            continue
        assert rel_err(g, w) < 1e-6, name  # lse travels as float32 through the custom op


def test_torch_compile_fullgraph_through_custom_op(fake_triton):
    (q, k, v, pk, pv), args = Case(padding="right").make(dtype=torch.float32)

    def f(q, k, v, pk, pv, mask):
        return prefix_attention(q, k, v, pk, pv, key_padding_mask=mask, backend="triton").sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(q, k, v, pk, pv, args["key_padding_mask"])
    got = torch.autograd.grad(loss, [q, pk])
    want = torch.autograd.grad(f(q, k, v, pk, pv, args["key_padding_mask"]), [q, pk])
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-5


def test_torch_compile_fullgraph_reference_path():
    (q, k, v, pk, pv), args = Case().make(dtype=torch.float32)
    f = lambda *t: prefix_attention(*t, backend="torch")  # noqa: E731
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v, pk, pv)
    assert rel_err(out, f(q, k, v, pk, pv)) < 1e-6


def test_custom_ops_are_registered():
    assert hasattr(torch.ops.prefixattn, "attention_fwd")
    assert hasattr(torch.ops.prefixattn, "attention_bwd")


def test_auto_uses_reference_for_dropout_and_explicit_backend_does_not(fake_triton):
    (q, k, v, pk, pv), args = Case().make(dtype=torch.float32)
    torch.manual_seed(1)
    out = prefix_attention(q, k, v, pk, pv, dropout_p=0.5, **args)
    torch.manual_seed(1)
    same = prefix_attention_reference(q, k, v, pk, pv, dropout_p=0.5, **args)
    assert torch.equal(out, same)
    with pytest.raises(ValueError, match="^dropout_p"):
        prefix_attention(q, k, v, pk, pv, dropout_p=0.5, backend="triton", **args)


def test_public_api():
    assert callable(prefixattn.prefix_attention)
    assert prefixattn.__version__


@pytest.mark.parametrize(
    "case",
    [
        Case(heads_q=4, heads_kv=2, seqlen_q=21, seqlen_k=21, prefix_len=9),
        Case(heads_q=4, heads_kv=2, seqlen_q=21, seqlen_k=21, prefix_len=9, noncontiguous=True),
        Case(heads_q=8, heads_kv=2, seqlen_q=1, seqlen_k=40, prefix_len=9),  # the decode kernels' route
        Case(heads_q=4, heads_kv=2, seqlen_q=3, seqlen_k=30, prefix_len=0, noncontiguous=True),
    ],
    ids=["train", "hf-layout", "decode", "short-noprefix"],
)
def test_triton_custom_ops_declare_their_real_layouts(case):
    """opcheck: the fake implementations (what torch.compile plans with) give the real outputs' shapes,
    dtypes and strides, forward and backward, on both the training and the decode kernels."""
    (q, k, v, pk, pv), args = case.make(requires_grad=False)
    fwd_args = (q, k, v, pk, pv, None, None, None, None, args["causal"], 0.2, "triton", True)
    torch.library.opcheck(
        torch.ops.prefixattn.attention_fwd.default, fwd_args, test_utils=("test_schema", "test_faketensor")
    )
    o, lse = torch.ops.prefixattn.attention_fwd.default(*fwd_args)
    bwd_args = (
        torch.randn_like(o),
        None,
        q,
        k,
        v,
        pk,
        pv,
        None,
        None,
        None,
        None,
        o,
        lse,
        args["causal"],
        0.2,
        "triton",
        True,
    )
    torch.library.opcheck(torch.ops.prefixattn.attention_bwd.default, bwd_args, test_utils=("test_faketensor",))
