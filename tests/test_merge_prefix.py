"""prefixattn.merge_prefix (token-major prefix fold) and token_prefix_index, against the float64 reference.

The property under test: folding the prefix into a sequence-only result (out, lse), token by token, gives exactly
the attention over [prefix; sequence] that prefix_attention_reference computes. Batches are ragged like a serving
engine's: decode tokens, prefill chunks over earlier context, sequences without a prefix, pool entries of length
0, and tokens with no sequence key at all (lse = -inf).
"""

from __future__ import annotations

import pytest
import torch
from helpers import TOLERANCE, rel_err

import prefixattn
from prefixattn import merge
from prefixattn.reference import prefix_attention_reference

BACKENDS = ["triton", "torch"]


def ragged_problem(seqs, heads_q=4, heads_kv=2, dim=16, pool=3, plen=5, lengths=(5, 0, 3), dtype=torch.float64, seed=0):
    """A token-major batch: seqs is a list of (query tokens, earlier context tokens, pool entry, empty) per
    sequence; empty = the sequence part has no key (lse -inf, out garbage). Returns the merge inputs and the
    expected (out, lse) over [prefix; sequence] from the reference."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    pk, pv = rnd(pool, heads_kv, plen, dim), rnd(pool, heads_kv, plen, dim)
    lens = torch.tensor(lengths, dtype=torch.int32) if lengths is not None else None
    qs, outs, lses, exp_out, exp_lse, index = [], [], [], [], [], []
    for n, ctx, entry, empty in seqs:
        q, k, v = rnd(1, heads_q, n, dim), rnd(1, heads_kv, ctx + n, dim), rnd(1, heads_kv, ctx + n, dim)
        kw = dict(causal=not empty, return_lse=True)
        if empty:  # every sequence key masked: the reference's sequence part is empty
            kw["key_padding_mask"] = torch.zeros(1, ctx + n, dtype=torch.bool)
        o_seq, l_seq = prefix_attention_reference(q, k, v, **kw)
        if empty:
            o_seq = torch.full_like(o_seq, float("nan"))  # whatever a kernel leaves there must not leak
        o_ref, l_ref = prefix_attention_reference(
            q, k, v, pk, pv, prefix_index=torch.tensor([entry]), prefix_lengths=lens, **kw
        )
        qs.append(q[0].transpose(0, 1))
        outs.append(o_seq[0].transpose(0, 1))
        lses.append(l_seq[0].transpose(0, 1))
        exp_out.append(o_ref[0].transpose(0, 1))
        exp_lse.append(l_ref[0].transpose(0, 1))
        index += [entry] * n
    cat = lambda xs: torch.cat(xs).to(dtype).contiguous()  # noqa: E731
    return dict(
        q=cat(qs),
        out=cat(outs),
        lse=torch.cat(lses).contiguous(),
        prefix_k=pk.to(dtype),
        prefix_v=pv.to(dtype),
        token_prefix_index=torch.tensor(index, dtype=torch.int32),
        prefix_lengths=lens,
    ), (torch.cat(exp_out), torch.cat(exp_lse))


# (query tokens, context, entry, empty): decode rows, prefill chunks over context, no prefix (-1), an entry of
# length 0 (entry 1), a short entry (entry 2, 3 of 5 keys), and a token with no sequence key.
MIXED = [(1, 7, 0, False), (4, 0, -1, False), (3, 5, 2, False), (1, 2, 1, False), (5, 9, 0, False), (1, 0, 2, True)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("heads_q,heads_kv", [(4, 4), (4, 2), (6, 2), (8, 1)])
def test_fold_equals_attention_over_prefix_and_sequence(backend, heads_q, heads_kv):
    args, (ref_out, ref_lse) = ragged_problem(MIXED, heads_q=heads_q, heads_kv=heads_kv)
    out = args["out"]
    got_out, got_lse = prefixattn.merge_prefix(**args, backend=backend)
    assert got_out is out  # written in place
    assert got_lse.shape == (out.shape[0], heads_q) and got_lse.dtype == torch.float64
    assert rel_err(got_out, ref_out) < TOLERANCE[torch.float64]
    assert rel_err(got_lse, ref_lse) < TOLERANCE[torch.float64]


@pytest.mark.parametrize("backend", BACKENDS)
def test_lse_heads_first_is_read_through_strides(backend):
    """FlashAttention's varlen lse is [Hq, T]; its transpose is accepted as is (no copy needed)."""
    args, (ref_out, ref_lse) = ragged_problem(MIXED)
    heads_first = args["lse"].t().contiguous()  # [Hq, T] storage
    args["lse"] = heads_first.t()
    assert not args["lse"].is_contiguous()
    got_out, got_lse = prefixattn.merge_prefix(**args, backend=backend)
    assert rel_err(got_out, ref_out) < TOLERANCE[torch.float64]
    assert rel_err(got_lse, ref_lse) < TOLERANCE[torch.float64]


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_with_padded_token_stride(backend):
    """vLLM's output buffer is [T_padded, Hq, D]; a strided view of it (heads not dense) is written in place."""
    args, (ref_out, _) = ragged_problem(MIXED)
    tokens, heads, dim = args["out"].shape
    storage = torch.full((tokens, heads, dim + 8), 7.0, dtype=torch.float64)
    storage[..., :dim] = args["out"]
    args["out"] = storage[..., :dim]
    prefixattn.merge_prefix(**args, backend=backend)
    assert rel_err(storage[..., :dim], ref_out) < TOLERANCE[torch.float64]
    assert torch.all(storage[..., dim:] == 7.0)  # nothing written outside the view


@pytest.mark.parametrize("backend", BACKENDS)
def test_tokens_without_prefix_are_unchanged(backend):
    """Index -1 and an entry of length 0 leave out bit for bit as it was; the lse too."""
    seqs = [(2, 3, -1, False), (1, 4, 1, False), (3, 0, 0, False)]
    args, _ = ragged_problem(seqs, dtype=torch.float32)
    before_out, before_lse = args["out"].clone(), args["lse"].clone()
    got_out, got_lse = prefixattn.merge_prefix(**args, backend=backend)
    untouched = slice(0, 3)  # the first two sequences' tokens
    assert torch.equal(got_out[untouched], before_out[untouched])
    assert torch.equal(got_lse[untouched], before_lse[untouched].float())
    assert not torch.allclose(got_out[3:], before_out[3:])  # the prefixed sequence did change


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_key_at_all_gives_zeros_and_minus_inf(backend):
    """A token with neither a sequence key nor a prefix: out 0, lse -inf (never NaN)."""
    args, _ = ragged_problem([(2, 0, -1, True), (1, 3, 0, False)])
    got_out, got_lse = prefixattn.merge_prefix(**args, backend=backend)
    assert torch.equal(got_out[:2], torch.zeros_like(got_out[:2]))
    assert torch.all(got_lse[:2] == float("-inf"))
    assert torch.isfinite(got_out[2:]).all() and torch.isfinite(got_lse[2:]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_shared_prefix_form(backend):
    """A [Hkv, P, D] prefix shared by every token equals pool entry 0 given to every token."""
    args, (ref_out, ref_lse) = ragged_problem([(s[0], s[1], 0, s[3]) for s in MIXED], lengths=None)
    args["prefix_k"], args["prefix_v"] = args["prefix_k"][0], args["prefix_v"][0]
    args["token_prefix_index"] = None
    got_out, got_lse = prefixattn.merge_prefix(**args, backend=backend)
    assert rel_err(got_out, ref_out) < TOLERANCE[torch.float64]
    assert rel_err(got_lse, ref_lse) < TOLERANCE[torch.float64]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("backend", BACKENDS)
def test_low_precision_against_float64_reference(backend, dtype):
    # bf16 is left out on purpose: the Triton interpreter's tl.dot on bf16 operands is wrong (CPU only).
    args, (ref_out, ref_lse) = ragged_problem(MIXED, heads_q=8, heads_kv=2, dim=32, dtype=dtype)
    got_out, got_lse = prefixattn.merge_prefix(**args, backend=backend)
    assert got_out.dtype == dtype and got_lse.dtype == torch.float32
    assert rel_err(got_out, ref_out) < TOLERANCE[dtype]
    assert rel_err(got_lse, ref_lse) < TOLERANCE[dtype]


def test_softmax_scale_is_applied_to_the_prefix():
    args, _ = ragged_problem([(3, 2, 0, False)], lengths=None)
    scale = 0.37
    q, pk, pv = args["q"], args["prefix_k"], args["prefix_v"]
    # Sequence part empty (lse -inf): the result is softmax(scale * q pk^T) pv alone.
    args["lse"] = torch.full_like(args["lse"], float("-inf"))
    for backend in BACKENDS:
        out = torch.zeros_like(q)
        got, _ = prefixattn.merge_prefix(
            q, out, args["lse"], pk, pv, args["token_prefix_index"], softmax_scale=scale, backend=backend
        )
        k = pk[0].repeat_interleave(2, dim=0)  # [Hq, P, D]
        v = pv[0].repeat_interleave(2, dim=0)
        want = torch.einsum("hts,hsd->thd", torch.softmax(torch.einsum("thd,hsd->hts", q, k) * scale, -1), v)
        assert rel_err(got, want) < TOLERANCE[torch.float64], backend


def test_backends_agree_on_float32():
    args, _ = ragged_problem(MIXED, heads_q=6, heads_kv=3, dim=24, dtype=torch.float32, seed=3)
    a = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    out_t, lse_t = prefixattn.merge_prefix(**args, backend="triton")
    out_p, lse_p = prefixattn.merge_prefix(**a, backend="torch")
    assert rel_err(out_t, out_p) < 1e-5 and rel_err(lse_t, lse_p) < 1e-6


def test_auto_uses_torch_on_the_cpu():
    assert merge._auto_backend(torch.device("cpu")) == "torch"


def test_no_tokens():
    args, _ = ragged_problem([(1, 1, 0, False)])
    empty = {k: (v[:0] if k in ("q", "out", "lse", "token_prefix_index") else v) for k, v in args.items()}
    for backend in BACKENDS:
        out, lse = prefixattn.merge_prefix(**empty, backend=backend)
        assert out.shape == (0, 4, 16) and lse.shape == (0, 4)


def _bad(**changes):
    args, _ = ragged_problem([(2, 1, 0, False), (1, 0, -1, False)], dtype=torch.float32)
    args.update(changes)
    return args


q32 = torch.zeros(3, 4, 16)
BAD = [
    ("q", dict(q=q32[0]), ValueError),
    ("q", dict(q=q32.long()), TypeError),
    ("out", dict(out=torch.zeros(3, 4, 8)), ValueError),
    ("out", dict(out=torch.zeros(3, 4, 16, dtype=torch.float64)), TypeError),
    ("out", dict(out=torch.zeros(3, 16, 4).transpose(1, 2)), ValueError),
    ("lse", dict(lse=torch.zeros(4, 3)), ValueError),
    ("lse", dict(lse=torch.zeros(3, 4, dtype=torch.int32)), TypeError),
    ("prefix_k", dict(prefix_k=torch.zeros(3, 2, 5, 8)), ValueError),
    ("prefix_k", dict(prefix_k=torch.zeros(3, 3, 5, 16), prefix_v=torch.zeros(3, 3, 5, 16)), ValueError),
    ("prefix_k", dict(prefix_k=torch.zeros(2, 5, 16, dtype=torch.float64)), ValueError),
    ("prefix_v", dict(prefix_v=torch.zeros(3, 2, 4, 16)), ValueError),
    ("prefix_v", dict(prefix_v=torch.zeros(3, 2, 5, 16, dtype=torch.float16)), TypeError),
    ("prefix_k", dict(prefix_k=torch.zeros(3, 2, 5, 16, device="meta")), ValueError),
    ("token_prefix_index", dict(token_prefix_index=None), ValueError),
    ("token_prefix_index", dict(token_prefix_index=torch.zeros(2, dtype=torch.int32)), ValueError),
    ("token_prefix_index", dict(token_prefix_index=torch.zeros(3)), TypeError),
    ("token_prefix_index", dict(token_prefix_index=torch.tensor([0, 3, -1])), ValueError),
    ("token_prefix_index", dict(token_prefix_index=torch.tensor([0, -2, -1])), ValueError),
    ("prefix_lengths", dict(prefix_lengths=torch.zeros(2, dtype=torch.int32)), ValueError),
    ("prefix_lengths", dict(prefix_lengths=torch.tensor([0, 6, 1])), ValueError),
    ("softmax_scale", dict(softmax_scale=True), TypeError),
    ("softmax_scale", dict(softmax_scale=float("nan")), ValueError),
    ("softmax_scale", dict(softmax_scale=-1.0), ValueError),
    ("backend", dict(backend="cuda"), ValueError),
]


@pytest.mark.parametrize("name,changes,error", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_inputs_name_the_argument(name, changes, error):
    with pytest.raises(error, match=name):
        prefixattn.merge_prefix(**_bad(**changes))


def test_lse_heads_first_error_says_to_transpose():
    with pytest.raises(ValueError, match=r"lse\.t\(\)"):
        prefixattn.merge_prefix(**_bad(lse=torch.zeros(4, 3)))


# token_prefix_index: tokens -> their row's pool entry, from cu_seqlens.


def loop_token_index(row_index, qsl, num_tokens):
    out = [-1] * num_tokens
    for r in range(len(row_index)):
        for t in range(int(qsl[r]), min(int(qsl[r + 1]), num_tokens)):
            out[t] = int(row_index[r])
    return out


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_token_prefix_index_matches_a_loop(dtype):
    row_index = torch.tensor([2, -1, 0, 1, 0], dtype=torch.int32)
    qsl = torch.tensor([0, 1, 5, 5, 8, 9], dtype=dtype)  # row 2 is empty
    for num_tokens in (9, 12, 4):  # exact, padded for a CUDA graph, and fewer (a prefix of the batch)
        got = prefixattn.token_prefix_index(row_index, qsl, num_tokens)
        assert got.dtype == torch.int32 and got.shape == (num_tokens,)
        assert got.tolist() == loop_token_index(row_index, qsl, num_tokens)


def test_token_prefix_index_random_batches():
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        rows = int(torch.randint(1, 9, (1,), generator=g))
        counts = torch.randint(0, 5, (rows,), generator=g)
        qsl = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]).to(torch.int32)
        row_index = torch.randint(-1, 4, (rows,), generator=g, dtype=torch.int32)
        num_tokens = int(qsl[-1]) + int(torch.randint(0, 3, (1,), generator=g))
        got = prefixattn.token_prefix_index(row_index, qsl, num_tokens)
        assert got.tolist() == loop_token_index(row_index, qsl, num_tokens)


def test_token_prefix_index_no_rows_and_bad_inputs():
    assert prefixattn.token_prefix_index(torch.zeros(0, dtype=torch.int32), torch.zeros(1), 3).tolist() == [-1] * 3
    with pytest.raises(ValueError, match="query_start_loc"):
        prefixattn.token_prefix_index(torch.zeros(2, dtype=torch.int32), torch.zeros(2, dtype=torch.int32), 3)
    with pytest.raises(ValueError, match="num_tokens"):
        prefixattn.token_prefix_index(torch.zeros(1, dtype=torch.int32), torch.zeros(2, dtype=torch.int32), -1)
    with pytest.raises(ValueError, match="row_index"):
        prefixattn.token_prefix_index(torch.zeros(1, 1), torch.zeros(2, dtype=torch.int32), 1)


def test_token_index_feeds_merge_prefix():
    """The two together, as the vLLM backend uses them: rows -> tokens -> fold."""
    args, (ref_out, ref_lse) = ragged_problem(MIXED)
    counts = [s[0] for s in MIXED]
    qsl = torch.tensor([0] + torch.tensor(counts).cumsum(0).tolist(), dtype=torch.int32)
    rows = torch.tensor([s[2] for s in MIXED], dtype=torch.int32)
    args["token_prefix_index"] = prefixattn.token_prefix_index(rows, qsl, int(qsl[-1]))
    got_out, got_lse = prefixattn.merge_prefix(**args, backend="torch")
    assert rel_err(got_out, ref_out) < TOLERANCE[torch.float64]
    assert rel_err(got_lse, ref_lse) < TOLERANCE[torch.float64]


# GPU: serving sizes in 16-bit, against the float64 fold of the same inputs, and inside a CUDA graph.


def serving_inputs(tokens, plen, dtype, device="cuda", heads_q=32, heads_kv=8, dim=64, pool=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    return dict(
        q=rnd(tokens, heads_q, dim),
        out=rnd(tokens, heads_q, dim),
        lse=torch.randn(heads_q, tokens, generator=g).to(device).t(),  # FlashAttention's [Hq, T]
        prefix_k=rnd(pool, heads_kv, plen, dim),
        prefix_v=rnd(pool, heads_kv, plen, dim),
        token_prefix_index=torch.randint(-1, pool, (tokens,), generator=g, dtype=torch.int32).to(device),
        prefix_lengths=torch.randint(0, plen + 1, (pool,), generator=g, dtype=torch.int32).to(device),
    )


@pytest.mark.gpu
@pytest.mark.parametrize(
    "dtype,tokens,plen",
    [(torch.bfloat16, 256, 16), (torch.bfloat16, 4096, 128), (torch.bfloat16, 300, 5), (torch.float16, 256, 128)],
)
def test_gpu_serving_sizes_against_float64(dtype, tokens, plen):
    args = serving_inputs(tokens, plen, dtype)
    exact = {k: (v.double() if k in ("q", "out", "prefix_k", "prefix_v") else v) for k, v in args.items()}
    exact = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in exact.items()}
    want_out, want_lse = prefixattn.merge_prefix(**exact, backend="torch")
    got_out, got_lse = prefixattn.merge_prefix(**args)  # auto: triton on CUDA
    assert rel_err(got_out.cpu(), want_out) < TOLERANCE[dtype]
    assert rel_err(got_lse.cpu(), want_lse) < TOLERANCE[torch.float32]


@pytest.mark.gpu
def test_gpu_graph_capture_and_replay_with_new_indices():
    """merge_prefix inside a CUDA graph: no host sync (capture would fail), and a replay after the index buffer
    is rewritten in place uses the new entries (nothing value-dependent was baked in)."""
    args = serving_inputs(256, 64, torch.bfloat16)
    out0 = args["out"].clone()
    prefixattn.merge_prefix(**args)  # compile outside the capture
    args["out"].copy_(out0)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _, lse_graph = prefixattn.merge_prefix(**args)
    for seed in (1, 2):
        g = torch.Generator().manual_seed(seed)
        args["token_prefix_index"].copy_(torch.randint(-1, 64, (256,), generator=g, dtype=torch.int32))
        args["out"].copy_(out0)
        graph.replay()
        torch.cuda.synchronize()
        eager = dict(args, out=out0.clone())
        want_out, want_lse = prefixattn.merge_prefix(**eager)
        assert torch.equal(args["out"], want_out) and torch.equal(lse_graph, want_lse)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fold_unchecked_is_merge_prefix_without_checks(backend):
    args, (ref_out, _) = ragged_problem(MIXED)
    pos = [args[k] for k in ("q", "out", "lse", "prefix_k", "prefix_v", "token_prefix_index", "prefix_lengths")]
    out, _ = merge.fold_unchecked(*pos, 0.25, backend)  # the scale ragged_problem's reference used: 1/sqrt(16)
    assert rel_err(out, ref_out) < TOLERANCE[torch.float64]
