"""Every bad input raises ValueError/TypeError naming the argument, before any kernel runs."""

import pytest
import torch
from helpers import Case

import prefixattn


def good(**over):
    (q, k, v, pk, pv), args = Case().make(dtype=torch.float32, requires_grad=False)
    kw = dict(q=q, k=k, v=v, prefix_k=pk, prefix_v=pv, **args)
    kw.update(over)
    return kw


def call(kw):
    kw = dict(kw)
    return prefixattn.prefix_attention(
        kw.pop("q"), kw.pop("k"), kw.pop("v"), kw.pop("prefix_k"), kw.pop("prefix_v"), **kw
    )


def pool(n=3, p=5):
    return torch.randn(n, 2, p, 32), torch.randn(n, 2, p, 32)


B, HQ, HKV, S, D = 2, 4, 2, 9, 32
BAD = {
    "q rank": (dict(q=torch.randn(HQ, S, D)), ValueError, "q"),
    "q dtype int": (dict(q=torch.ones(B, HQ, S, D, dtype=torch.int32)), TypeError, "q"),
    "k dtype": (dict(k=torch.randn(B, HKV, S, D, dtype=torch.float64)), TypeError, "k"),
    "v shape": (dict(v=torch.randn(B, HKV, S + 1, D)), ValueError, "v"),
    "k batch": (dict(k=torch.randn(B + 1, HKV, S, D), v=torch.randn(B + 1, HKV, S, D)), ValueError, "k"),
    "head dim mismatch": (dict(k=torch.randn(B, HKV, S, 16), v=torch.randn(B, HKV, S, 16)), ValueError, "k"),
    "hq not multiple": (
        dict(
            k=torch.randn(B, 3, S, D),
            v=torch.randn(B, 3, S, D),
            prefix_k=torch.randn(3, 5, D),
            prefix_v=torch.randn(3, 5, D),
        ),
        ValueError,
        "q",
    ),
    "last dim strided": (dict(q=torch.randn(B, HQ, D, S).transpose(2, 3)), ValueError, "q"),
    "causal sq > sk": (dict(q=torch.randn(B, HQ, S + 2, D)), ValueError, "q"),
    "prefix_k only": (dict(prefix_v=None), ValueError, "prefix_v"),
    "prefix_v only": (dict(prefix_k=None), ValueError, "prefix_k"),
    "prefix rank": (dict(prefix_k=torch.randn(5, D), prefix_v=torch.randn(5, D)), ValueError, "prefix_k"),
    "prefix heads": (dict(prefix_k=torch.randn(3, 5, D), prefix_v=torch.randn(3, 5, D)), ValueError, "prefix_k"),
    "prefix dim": (dict(prefix_k=torch.randn(HKV, 5, 16), prefix_v=torch.randn(HKV, 5, 16)), ValueError, "prefix_k"),
    "prefix_v shape": (dict(prefix_v=torch.randn(HKV, 6, D)), ValueError, "prefix_v"),
    "prefix dtype": (
        dict(
            prefix_k=torch.randn(HKV, 5, D, dtype=torch.float64), prefix_v=torch.randn(HKV, 5, D, dtype=torch.float64)
        ),
        TypeError,
        "prefix_k",
    ),
    "index without pool": (dict(prefix_index=torch.zeros(B, dtype=torch.long)), ValueError, "prefix_index"),
    "pool without index": (dict(zip(("prefix_k", "prefix_v"), pool())), ValueError, "prefix_index"),
    "index out of range": (
        dict(zip(("prefix_k", "prefix_v"), pool()), prefix_index=torch.tensor([0, 3])),
        ValueError,
        "prefix_index",
    ),
    "index below -1": (
        dict(zip(("prefix_k", "prefix_v"), pool()), prefix_index=torch.tensor([0, -2])),
        ValueError,
        "prefix_index",
    ),
    "index shape": (
        dict(zip(("prefix_k", "prefix_v"), pool()), prefix_index=torch.tensor([0, 1, 2])),
        ValueError,
        "prefix_index",
    ),
    "index dtype": (
        dict(zip(("prefix_k", "prefix_v"), pool()), prefix_index=torch.tensor([0.0, 1.0])),
        TypeError,
        "prefix_index",
    ),
    "lengths > P": (
        dict(
            zip(("prefix_k", "prefix_v"), pool()),
            prefix_index=torch.tensor([0, 1]),
            prefix_lengths=torch.tensor([5, 6, 1]),
        ),
        ValueError,
        "prefix_lengths",
    ),
    "lengths shape": (
        dict(
            zip(("prefix_k", "prefix_v"), pool()),
            prefix_index=torch.tensor([0, 1]),
            prefix_lengths=torch.tensor([5, 5]),
        ),
        ValueError,
        "prefix_lengths",
    ),
    "lengths no prefix": (
        dict(prefix_k=None, prefix_v=None, prefix_lengths=torch.tensor([1])),
        ValueError,
        "prefix_lengths",
    ),
    "mask dtype": (dict(key_padding_mask=torch.ones(B, S)), TypeError, "key_padding_mask"),
    "mask shape": (dict(key_padding_mask=torch.ones(B, S + 1, dtype=torch.bool)), ValueError, "key_padding_mask"),
    "mask rank": (dict(key_padding_mask=torch.ones(B, 1, 1, S, dtype=torch.bool)), ValueError, "key_padding_mask"),
    "bias shape": (dict(attn_bias=torch.zeros(1, HQ, S, S + 1)), ValueError, "attn_bias"),
    "bias dtype": (dict(attn_bias=torch.zeros(1, HQ, S, S, dtype=torch.bool)), TypeError, "attn_bias"),
    "backend name": (dict(backend="cudnn"), ValueError, "backend"),
    "causal type": (dict(causal="yes"), TypeError, "causal"),
    "scale type": (dict(softmax_scale="0.1"), TypeError, "softmax_scale"),
    "dropout range": (dict(dropout_p=1.5), ValueError, "dropout_p"),
    "q not tensor": (dict(q=[1.0]), TypeError, "q"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_names_the_argument(name):
    over, exc, arg = BAD[name]
    with pytest.raises(exc) as info:
        call(good(**over))
    msg = str(info.value)
    assert msg.startswith(arg + ":"), msg
    assert "expected" in msg or "required" in msg or "only valid" in msg or "must" in msg, msg


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"^backend: 'triton' cannot run this call: .*TRITON_INTERPRET"):
        call(good(backend="triton"))


def test_cuda_backend_on_cpu_is_refused():
    with pytest.raises(ValueError, match=r"^backend: 'cuda' cannot run this call"):
        call(good(backend="cuda"))


def test_explicit_backend_refuses_dropout():
    with pytest.raises(ValueError, match=r"^dropout_p: backend 'triton'"):
        call(good(backend="triton", dropout_p=0.1))


def test_validation_runs_before_any_kernel(monkeypatch):
    """A bad call must fail in validation: make any backend lookup explode to prove none is reached."""
    import prefixattn.kernels as kernels

    def boom(*a, **k):
        raise AssertionError("a backend was reached before validation failed")

    monkeypatch.setattr(kernels, "get_backend", boom)
    with pytest.raises(ValueError, match="^prefix_index"):
        call(good(**dict(zip(("prefix_k", "prefix_v"), pool())), prefix_index=torch.tensor([0, 7]), backend="triton"))


def test_value_checks_can_be_switched():
    """validate_values=False skips the (host-syncing) range checks; the default checks CPU tensors."""
    kw = good(**dict(zip(("prefix_k", "prefix_v"), pool())), prefix_index=torch.tensor([0, 7]))
    with pytest.raises(ValueError, match=r"^prefix_index: expected values in \[-1, 2\]"):
        call(kw)
    with pytest.raises(ValueError, match=r"^prefix_index: expected values"):
        call(dict(kw, validate_values=True))
    # Unchecked, an out-of-range entry means "no prefix" (as in the kernels), a length above P means P.
    out = call(dict(kw, validate_values=False, backend="torch"))
    same = call(dict(kw, backend="torch", prefix_index=torch.tensor([0, -1])))
    assert torch.equal(out, same)
    over = call(dict(kw, validate_values=False, backend="torch", prefix_lengths=torch.tensor([9, 9, 9])))
    full = call(dict(kw, backend="torch", prefix_index=torch.tensor([0, -1]), prefix_lengths=torch.tensor([5, 5, 5])))
    assert torch.equal(over, full)


def test_zero_query_heads_refused():
    with pytest.raises(ValueError, match=r"^q: expected at least one query head"):
        call(good(q=torch.randn(B, 0, S, D)))
