"""The reference is the spec: check it against an independent brute-force construction (explicit
concatenation + explicit mask + softmax), and its gradients with gradcheck in float64."""

import math

import pytest
import torch
from helpers import Case, rel_err

from prefixattn import prefix_attention_reference as ref


def brute_force(
    q,
    k,
    v,
    pk,
    pv,
    *,
    prefix_index=None,
    prefix_lengths=None,
    causal=True,
    key_padding_mask=None,
    softmax_scale=None,
    attn_bias=None,
):
    """Loop over (batch, head, query): concatenate this sequence's valid prefix keys, mask by hand."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1 / math.sqrt(D)
    out = torch.zeros(B, Hq, Sq, D, dtype=torch.float64)
    lse = torch.full((B, Hq, Sq), float("-inf"), dtype=torch.float64)
    for b in range(B):
        if pk is None:
            keys_p = torch.zeros(Hkv, 0, D, dtype=torch.float64)
            vals_p = keys_p
        elif pk.dim() == 3:
            keys_p, vals_p = pk.double(), pv.double()
        else:
            e = int(prefix_index[b])
            n = 0 if e < 0 else (pk.shape[2] if prefix_lengths is None else int(prefix_lengths[e]))
            keys_p = pk[max(e, 0), :, :n].double()
            vals_p = pv[max(e, 0), :, :n].double()
        for h in range(Hq):
            g = h // (Hq // Hkv)
            for i in range(Sq):
                keys, vals, bias = [keys_p[g]], [vals_p[g]], [torch.zeros(keys_p.shape[1], dtype=torch.float64)]
                for j in range(Sk):
                    if causal and j > i + Sk - Sq:
                        continue
                    if key_padding_mask is not None and not key_padding_mask[b, j]:
                        continue
                    keys.append(k[b, g, j : j + 1].double())
                    vals.append(v[b, g, j : j + 1].double())
                    extra = 0.0 if attn_bias is None else float(attn_bias.expand(B, Hq, Sq, Sk)[b, h, i, j])
                    bias.append(torch.tensor([extra], dtype=torch.float64))
                K, V, Bs = torch.cat(keys), torch.cat(vals), torch.cat(bias)
                if K.shape[0] == 0:
                    continue
                s = K @ q[b, h, i].double() * scale + Bs
                if torch.isinf(s).all():
                    continue
                lse[b, h, i] = torch.logsumexp(s, 0)
                out[b, h, i] = torch.softmax(s, 0) @ V
    return out, lse


CASES = [
    Case(),
    Case(causal=False),
    Case(seqlen_q=3, seqlen_k=8),  # chunked prefill / decode against a cache
    Case(seqlen_q=1, seqlen_k=6, heads_q=4, heads_kv=1),  # decode, MQA
    Case(prefix_len=0),
    Case(padding="left"),
    Case(padding="right", causal=False),
    Case(pool=3, lengths=True, batch=4),
    Case(noncontiguous=True, heads_kv=4),
    Case(causal=False, seqlen_q=7, seqlen_k=3),  # cross-attention with a short memory
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: repr(c)[5:60])
def test_reference_matches_brute_force(case):
    (q, k, v, pk, pv), args = case.make(requires_grad=False)
    out, lse = ref(q, k, v, pk, pv, return_lse=True, **args)
    bout, blse = brute_force(q, k, v, pk, pv, **args)
    assert rel_err(out, bout) < 1e-12
    assert rel_err(lse, blse) < 1e-12


def test_attn_bias_applies_to_sequence_keys_only():
    (q, k, v, pk, pv), args = Case().make(requires_grad=False)
    bias = torch.randn(1, q.shape[1], q.shape[2], k.shape[2], dtype=torch.float64)
    bias[..., 2] = float("-inf")
    out, lse = ref(q, k, v, pk, pv, attn_bias=bias, return_lse=True, **args)
    bout, blse = brute_force(q, k, v, pk, pv, attn_bias=bias, **args)
    assert rel_err(out, bout) < 1e-12 and rel_err(lse, blse) < 1e-12


def test_empty_rows_are_zero_with_finite_gradients():
    (q, k, v, pk, pv), args = Case(pool=2, batch=3).make()
    args["prefix_index"] = torch.tensor([-1, 0, -1])
    mask = torch.ones(3, k.shape[2], dtype=torch.bool)
    mask[0] = False  # sequence 0: no prefix and no keys at all
    out, lse = ref(q, k, v, pk, pv, key_padding_mask=mask, return_lse=True, **args)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.isneginf(lse[0]).all() and torch.isfinite(lse[1:]).all()
    (out.sum() + lse[1:].sum()).backward()
    for t in (q, k, v, pk, pv):
        assert torch.isfinite(t.grad).all()
    assert torch.equal(q.grad[0], torch.zeros_like(q.grad[0]))


@pytest.mark.parametrize(
    "case",
    [
        Case(batch=2, heads_q=2, heads_kv=1, seqlen_q=4, seqlen_k=5, head_dim=4, prefix_len=2, padding="random"),
        Case(
            batch=3,
            heads_q=2,
            heads_kv=2,
            seqlen_q=3,
            seqlen_k=3,
            head_dim=4,
            prefix_len=3,
            pool=2,
            lengths=True,
            causal=False,
        ),
    ],
    ids=["shared", "pool"],
)
def test_gradcheck_float64(case):
    (q, k, v, pk, pv), args = case.make()

    def f(*t):
        out, lse = ref(*t, return_lse=True, **args)
        lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
        return out, lse

    assert torch.autograd.gradcheck(f, (q, k, v, pk, pv))


def test_prefix_gradient_is_sum_over_batch():
    """A shared prefix's gradient equals the sum of the per-sequence gradients of the same prefix."""
    (q, k, v, pk, pv), args = Case(batch=3).make()
    g = torch.randn(q.shape, dtype=torch.float64)
    ref(q, k, v, pk, pv, **args).backward(g)
    total = torch.zeros_like(pk)
    for b in range(3):
        pkb = pk.detach().clone().requires_grad_(True)
        ref(q[b : b + 1].detach(), k[b : b + 1].detach(), v[b : b + 1].detach(), pkb, pv.detach(), **args).backward(
            g[b : b + 1]
        )
        total += pkb.grad
    assert rel_err(pk.grad, total) < 1e-12
