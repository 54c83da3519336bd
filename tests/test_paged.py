"""prefix_attention_paged: the paged reference, the Triton kernels against it, and every validation error.

CPU: the kernels run in Triton's interpreter in fp32/fp16 with explicit plans (small blocks, forced splits).
GPU tests (marked) cover bf16 at realistic shapes, bad tables that were not range-checked, and CUDA-graph
replay. The paged entry of every backend against the reference on a shared case list is in test_conformance.py.
"""

from __future__ import annotations

import pytest
import torch
from helpers import TOLERANCE, make_paged, rel_err

from prefixattn import prefix_attention_paged, prefix_attention_reference
from prefixattn.kernels import triton_decode as td
from prefixattn.paged import _paged_decode, paged_reference


def _paged_triton(q, kc, vc, bt, sl, pk, pv, *, prefix_index=None, prefix_lengths=None, **force):
    """The Triton paged kernels with a plan made with `force` (prefix path, splits, key block)."""
    plan = td.plan_for_paged(q, kc, bt, pk, **force)
    scale = q.shape[-1] ** -0.5
    return td.paged_forward(q, kc, vc, bt, sl, pk, pv, prefix_index, prefix_lengths, scale, plan=plan)


def _check(inputs, kw, dtype, *, backend="triton", **force):
    """Against paged_reference: through prefix_attention_paged, or with `force` the Triton kernels with that plan."""
    q, kc, vc, bt, sl, pk, pv = inputs
    ref, ref_lse = paged_reference(q, kc, vc, bt, sl, pk, pv, return_lse=True, **kw)
    cast = lambda t: None if t is None else t.to(dtype)
    if force:
        assert backend == "triton"
        out, lse = _paged_triton(cast(q), cast(kc), cast(vc), bt, sl, cast(pk), cast(pv), **kw, **force)
    else:
        out, lse = prefix_attention_paged(
            cast(q), cast(kc), cast(vc), bt, sl, cast(pk), cast(pv), return_lse=True, backend=backend, **kw
        )
    assert out.shape == q.shape and out.dtype == dtype and out.transpose(1, 2).is_contiguous()
    err, lse_err = rel_err(out, ref), rel_err(lse, ref_lse)
    assert err <= TOLERANCE[dtype], f"out rel err {err}"
    assert lse_err <= TOLERANCE[dtype], f"lse rel err {lse_err}"
    return out, lse


# --- the reference itself ----------------------------------------------------------------------------


def test_reference_matches_a_per_sequence_construction():
    """paged_reference (left-padded gather + causal mask) against gathering each sequence by hand."""
    (q, kc, vc, bt, sl, pk, pv), kw = make_paged(
        batch=4, seqlen_q=3, page_size=4, max_pages=5, prefix_len=3, pool=2, seq_lens=[1, 3, 11, 20]
    )
    out, lse = paged_reference(q, kc, vc, bt, sl, pk, pv, return_lse=True, **kw)
    for b in range(q.shape[0]):
        n = int(sl[b])
        pages = [int(bt[b, j // 4]) for j in range(n)]
        k = torch.stack([kc[pages[j], j % 4] for j in range(n)], 1)[None]  # [1, Hkv, n, D]
        v = torch.stack([vc[pages[j], j % 4] for j in range(n)], 1)[None]
        e = int(kw["prefix_index"][b])
        pkb = pk[e] if e >= 0 else pk[0][:, :0]
        pvb = pv[e] if e >= 0 else pv[0][:, :0]
        # Query i of 3 sees tokens j <= n - 3 + i: causal bottom-right over the sequence's own n keys,
        # which needs Sq <= n; for the short sequences compare the rows that are defined that way.
        rows = range(max(0, 3 - n), 3)
        for i in rows:
            ref_i, lse_i = prefix_attention_reference(
                q[b : b + 1, :, i : i + 1],
                k[:, :, : n - 3 + i + 1],
                v[:, :, : n - 3 + i + 1],
                pkb,
                pvb,
                causal=False,
                return_lse=True,
            )
            assert torch.allclose(out[b, :, i], ref_i[0, :, 0]) and torch.allclose(lse[b, :, i], lse_i[0, :, 0])
        for i in range(0, max(0, 3 - n)):  # no cache token visible: prefix only (or nothing)
            ref_i, lse_i = prefix_attention_reference(
                q[b : b + 1, :, i : i + 1], k[:, :, :0], v[:, :, :0], pkb, pvb, causal=False, return_lse=True
            )
            assert torch.allclose(out[b, :, i], ref_i[0, :, 0]) and torch.equal(lse[b, :, i], lse_i[0, :, 0])


def test_auto_on_cpu_is_the_reference():
    inputs, kw = make_paged(prefix_len=4)
    ref = paged_reference(*inputs, **kw)
    assert torch.equal(prefix_attention_paged(*inputs, **kw), ref)
    assert torch.equal(prefix_attention_paged(*inputs, backend="torch", **kw), ref)


# --- Triton kernels against the reference ------------------------------------------------------------


@pytest.mark.parametrize("sq", [1, 2, 5, 16])
@pytest.mark.parametrize("group", [1, 4, 8])
def test_query_len_and_gqa(sq, group, device):
    hkv = 2 if group < 8 else 1
    inputs, kw = make_paged(
        batch=3,
        heads_q=group * hkv,
        heads_kv=hkv,
        seqlen_q=sq,
        page_size=5,
        max_pages=6,
        seq_lens=[sq, 23, 30],
        prefix_len=6,
        device=device,
    )
    _check(inputs, kw, torch.float32, path="fused", block_n=16, splits=2)


@pytest.mark.parametrize("path", ["fused", "cascade"])
@pytest.mark.parametrize("page_size", [1, 5, 16])
def test_page_sizes_and_prefix_paths(path, page_size, device):
    inputs, kw = make_paged(
        batch=3,
        heads_q=8,
        heads_kv=2,
        seqlen_q=2,
        page_size=page_size,
        max_pages=40 // page_size,
        seq_lens=[1, 17, 40 // page_size * page_size],
        prefix_len=7,
        device=device,
    )
    _check(inputs, kw, torch.float32, path=path, block_n=16, splits=3)


@pytest.mark.parametrize("path", ["fused", "cascade"])
@pytest.mark.parametrize("sq", [1, 4])
def test_pool_prefixes(path, sq, device):
    inputs, kw = make_paged(
        batch=5,
        heads_q=8,
        heads_kv=2,
        seqlen_q=sq,
        page_size=4,
        max_pages=5,
        prefix_len=9,
        pool=3,
        lengths=True,
        device=device,
    )
    _check(inputs, kw, torch.float32, path=path, block_n=16, splits=2)


@pytest.mark.parametrize("seq_lens", [[1, 1], [0, 7], [2, 30]])
def test_short_and_empty_sequences(seq_lens, device):
    """Sequences shorter than Sq (and empty slots, as CUDA-graph batches pad with) see the prefix only."""
    inputs, kw = make_paged(
        batch=2, seqlen_q=2, page_size=5, max_pages=6, seq_lens=seq_lens, prefix_len=3, device=device
    )
    _check(inputs, kw, torch.float32, block_n=16)


def test_no_prefix_and_empty_rows(device):
    inputs, kw = make_paged(batch=2, seqlen_q=3, page_size=4, max_pages=3, seq_lens=[0, 9], device=device)
    out, lse = _check(inputs, kw, torch.float32, block_n=16, splits=2)
    assert torch.all(out[0].cpu() == 0) and torch.all(torch.isneginf(lse[0].cpu()))


def test_strided_caches_and_queries(device):
    inputs, kw = make_paged(
        batch=3,
        heads_q=4,
        heads_kv=2,
        seqlen_q=3,
        head_dim=32,
        page_size=8,
        max_pages=4,
        prefix_len=5,
        interleaved=True,
        noncontiguous_q=True,
        device=device,
    )
    assert not inputs[1].is_contiguous() and not inputs[0].is_contiguous()
    _check(inputs, kw, torch.float32, path="cascade", block_n=16)


def test_float16(device):
    inputs, kw = make_paged(
        batch=3,
        heads_q=8,
        heads_kv=2,
        seqlen_q=2,
        head_dim=32,
        page_size=16,
        max_pages=3,
        prefix_len=12,
        pool=2,
        device=device,
    )
    _check(inputs, kw, torch.float16, block_n=16, splits=2)


@pytest.mark.parametrize("path", ["fused", "cascade"])
def test_unchecked_bad_tables_mask_instead_of_reading_out_of_bounds(path, device):
    """validate_values=False (the GPU default): page ids outside [0, num_pages) mask their tokens and
    lengths beyond the table are clamped, exactly as paged_reference documents."""
    inputs, kw = make_paged(
        batch=3, seqlen_q=2, page_size=4, max_pages=4, num_pages=20, prefix_len=3, seq_lens=[16, 9, 5], device=device
    )
    q, kc, vc, bt, sl, pk, pv = inputs
    bt = bt.clone()
    bt[0, 1], bt[1, 0], bt[2, 1] = 20, -7, 2**30
    sl = torch.tensor([16, 999, -5], dtype=torch.int32, device=device)
    ref, ref_lse = paged_reference(q, kc, vc, bt, sl, pk, pv, return_lse=True)
    out, lse = _paged_triton(
        q.float(), kc.float(), vc.float(), bt, sl, pk.float(), pv.float(), path=path, block_n=16, splits=2
    )
    assert rel_err(out, ref) <= TOLERANCE[torch.float32] and rel_err(lse, ref_lse) <= TOLERANCE[torch.float32]
    if path == "fused":  # and through the public entry, which lets such tables through when told not to check
        f32 = (t.float() for t in (q, kc, vc, pk, pv))
        q32, kc32, vc32, pk32, pv32 = f32
        out, lse = prefix_attention_paged(
            q32, kc32, vc32, bt, sl, pk32, pv32, return_lse=True, backend="triton", validate_values=False
        )
        assert rel_err(out, ref) <= TOLERANCE[torch.float32] and rel_err(lse, ref_lse) <= TOLERANCE[torch.float32]


def test_custom_op_schema_and_fake():
    inputs, kw = make_paged(batch=2, seqlen_q=2, page_size=4, max_pages=3, prefix_len=3)
    q, kc, vc, bt, sl, pk, pv = (t.float() if t.is_floating_point() else t for t in inputs)
    torch.library.opcheck(
        _paged_decode,
        (q, kc, vc, bt, sl, pk, pv, None, None, 0.25, "triton"),
        test_utils=("test_schema", "test_faketensor"),
    )


# --- bad input: every validation error, before any launch -----------------------------------------------


def _good(**over):
    (q, kc, vc, bt, sl, pk, pv), kw = make_paged(batch=2, seqlen_q=2, page_size=4, max_pages=3, prefix_len=3)
    args = dict(
        q=q.float(),
        k_cache=kc.float(),
        v_cache=vc.float(),
        block_table=bt,
        seq_lens=sl,
        prefix_k=pk.float(),
        prefix_v=pv.float(),
    )
    args.update(over)
    return args


def _call(**over):
    a = _good(**over)
    extra = {
        k: a.pop(k)
        for k in list(a)
        if k not in ("q", "k_cache", "v_cache", "block_table", "seq_lens", "prefix_k", "prefix_v")
    }
    extra.setdefault("backend", "triton")
    return prefix_attention_paged(
        a["q"], a["k_cache"], a["v_cache"], a["block_table"], a["seq_lens"], a["prefix_k"], a["prefix_v"], **extra
    )


@pytest.mark.parametrize(
    "over,exc,match",
    [
        (dict(q=torch.randn(2, 4, 17, 16)), ValueError, r"q: the paged path serves 1 to 16 query tokens.*Sq=17"),
        (dict(q=torch.randn(2, 4, 0, 16)), ValueError, r"q: .*Sq=0"),
        (dict(q=torch.randn(2, 4, 16)), ValueError, r"q: expected a 4-d tensor"),
        (dict(q=torch.randn(2, 4, 2, 16).int()), TypeError, r"q: expected dtype float16"),
        (dict(k_cache=torch.randn(11, 4, 2, 16).half()), TypeError, r"k_cache: expected dtype torch.float32"),
        (dict(v_cache=torch.randn(11, 4, 2, 8)), ValueError, r"v_cache: expected the shape of k_cache"),
        (
            dict(k_cache=torch.randn(11, 4, 2, 8), v_cache=torch.randn(11, 4, 2, 8)),
            ValueError,
            r"k_cache: expected \[num_pages, page_size, Hkv, D\] with D=16",
        ),
        (
            dict(k_cache=torch.randn(11, 4, 3, 16), v_cache=torch.randn(11, 4, 3, 16)),
            ValueError,
            r"q: number of query heads must be a multiple of the KV heads",
        ),
        (
            dict(k_cache=torch.randn(0, 4, 2, 16), v_cache=torch.randn(0, 4, 2, 16)),
            ValueError,
            r"k_cache: expected at least one page",
        ),
        (
            dict(k_cache=torch.randn(11, 4, 2, 32)[..., ::2], v_cache=torch.randn(11, 4, 2, 16)),
            ValueError,
            r"k_cache: last dimension must be contiguous",
        ),
        (dict(block_table=torch.zeros(2, 3, dtype=torch.int64)), TypeError, r"block_table: expected dtype torch.int32"),
        (
            dict(block_table=torch.zeros(3, 3, dtype=torch.int32)),
            ValueError,
            r"block_table: expected shape \[2, max_pages\]",
        ),
        (dict(block_table=torch.zeros(2, dtype=torch.int32)), ValueError, r"block_table: expected a 2-d tensor"),
        (dict(seq_lens=torch.ones(3, dtype=torch.int32)), ValueError, r"seq_lens: expected shape \[2\]"),
        (dict(seq_lens=torch.ones(2)), TypeError, r"seq_lens: expected dtype torch.int32"),
        (
            dict(seq_lens=torch.tensor([3, 13], dtype=torch.int32)),
            ValueError,
            r"seq_lens: expected values in \[0, 12\] \(max_pages=3 x page_size=4\), got min 3, max 13",
        ),
        (
            dict(seq_lens=torch.tensor([-1, 3], dtype=torch.int32)),
            ValueError,
            r"seq_lens: expected values in \[0, 12\]",
        ),
        (
            dict(prefix_k=torch.randn(3, 3, 16), prefix_v=torch.randn(3, 3, 16)),
            ValueError,
            r"prefix_k: expected \[Hkv, P, D\] with Hkv=2",
        ),
        (dict(prefix_v=None), ValueError, r"prefix_v: expected a tensor because prefix_k was given"),
        (
            dict(
                prefix_k=torch.randn(2, 2, 3, 16), prefix_v=torch.randn(2, 2, 3, 16), prefix_index=torch.tensor([0, 2])
            ),
            ValueError,
            r"prefix_index: expected values in \[-1, 1\]",
        ),
        (dict(backend="bogus"), ValueError, r"backend: expected one of"),
        (dict(softmax_scale="x"), TypeError, r"softmax_scale: expected a float"),
    ],
)
def test_bad_input(over, exc, match):
    with pytest.raises(exc, match=match):
        _call(**over)


def test_block_table_entry_outside_the_pool_is_named():
    bt = torch.tensor([[0, 1, 2], [3, 11, -1]], dtype=torch.int32)  # 11 pages: ids 0..10
    with pytest.raises(ValueError, match=r"block_table: expected page ids in \[0, 10\].*block_table\[1, 1\] = 11"):
        _call(
            block_table=bt,
            seq_lens=torch.tensor([12, 8], dtype=torch.int32),
            k_cache=torch.randn(11, 4, 2, 16),
            v_cache=torch.randn(11, 4, 2, 16),
        )


def test_unused_table_slots_may_hold_anything():
    bt = torch.tensor([[0, 1, 2], [3, 99, -1]], dtype=torch.int32)
    _call(
        block_table=bt,
        seq_lens=torch.tensor([12, 4], dtype=torch.int32),
        k_cache=torch.randn(11, 4, 2, 16),
        v_cache=torch.randn(11, 4, 2, 16),
        backend="torch",
    )


def test_device_mismatch_is_named():
    with pytest.raises(ValueError, match=r"seq_lens: expected device cpu"):
        _call(seq_lens=torch.ones(2, dtype=torch.int32, device="meta"))


def test_unsupported_head_dim_for_kernels():
    """(float64 and the other refusals every backend shares are in test_conformance.py.)"""
    small = dict(
        q=torch.randn(2, 4, 2, 8),
        k_cache=torch.randn(11, 4, 2, 8),
        v_cache=torch.randn(11, 4, 2, 8),
        prefix_k=None,
        prefix_v=None,
    )
    with pytest.raises(ValueError, match=r"backend: 'triton' cannot run this call: .*head dims 16..256, got 8"):
        _call(**small)


def test_backend_hooks_use_the_protocol_signatures(monkeypatch):
    """backend="cuda" goes through the registry: unsupported_reason_paged(problem, needs_grad=...) of its module,
    then paged_forward(q, k_cache, v_cache, block_table, seq_lens, prefix_k, prefix_v, prefix_index,
    prefix_lengths, scale); "auto" on a GPU asks the same refusal hook once the table's auto rule covers the
    problem. A stand-in module checks the arguments."""
    import types

    import prefixattn.kernels as kernels
    import prefixattn.paged as paged

    calls = []

    def paged_forward(
        q, k_cache, v_cache, block_table, seq_lens, prefix_k, prefix_v, prefix_index, prefix_lengths, scale
    ):
        calls.append(("paged_forward", scale))
        out, lse = paged_reference(
            q,
            k_cache,
            v_cache,
            block_table,
            seq_lens,
            prefix_k,
            prefix_v,
            prefix_index=prefix_index,
            prefix_lengths=prefix_lengths,
            softmax_scale=scale,
            return_lse=True,
        )
        return out.transpose(1, 2).contiguous().transpose(1, 2), lse

    def unsupported_reason_paged(problem, *, needs_grad):
        calls.append(("unsupported_reason_paged", problem.batch, problem.max_pages, problem.prefix_len, needs_grad))
        return None

    fake = types.SimpleNamespace(
        paged_forward=paged_forward, unsupported_reason_paged=unsupported_reason_paged, new_out=kernels.bshd_empty
    )
    real = kernels.get_backend
    monkeypatch.setattr(kernels, "get_backend", lambda name: fake if name == "cuda" else real(name))
    inputs, kw = make_paged(batch=2, seqlen_q=2, page_size=4, max_pages=3, prefix_len=3, pool=2)
    q, kc, vc, bt, sl, pk, pv = (t.float() if t.is_floating_point() else t for t in inputs)
    out = prefix_attention_paged(q, kc, vc, bt, sl, pk, pv, softmax_scale=0.3, backend="cuda", **kw)
    ref = paged_reference(
        q.double(), kc.double(), vc.double(), bt, sl, pk.double(), pv.double(), softmax_scale=0.3, **kw
    )
    assert rel_err(out, ref) <= TOLERANCE[torch.float32]
    assert calls == [("unsupported_reason_paged", 2, 3, 3, False), ("paged_forward", 0.3)]
    problem = paged.validate_paged(q, kc, vc, bt, sl, pk, pv, **kw)
    on_gpu = paged.PagedProblem(**{**problem.__dict__, "device": torch.device("cuda")})
    calls.clear()
    assert kernels.choose("auto", on_gpu, "paged") == "triton"  # outside the measured region: cuda not asked
    assert calls == []
    monkeypatch.setattr(kernels, "preferred", lambda name, problem, kind="dense": True)
    assert kernels.choose("auto", on_gpu, "paged") == "cuda"
    assert [c[0] for c in calls] == ["unsupported_reason_paged"]


# --- GPU ------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("batch,capacity", [(1, 300), (7, 4099), (64, 300), (64, 4099)])
@pytest.mark.parametrize("prefix_len,pool", [(0, 0), (16, 0), (512, 0), (512, 3)])
@pytest.mark.parametrize("path", ["fused", "cascade", None])
def test_gpu_against_reference(batch, capacity, prefix_len, pool, path):
    page_size = 16
    max_pages = -(-capacity // page_size)
    lens = torch.randint(1, capacity + 1, (batch,))
    lens[0] = capacity
    inputs, kw = make_paged(
        batch=batch,
        heads_q=8,
        heads_kv=2,
        seqlen_q=1,
        head_dim=128,
        page_size=page_size,
        max_pages=max_pages,
        seq_lens=lens,
        prefix_len=prefix_len,
        pool=pool,
        lengths=pool > 0,
        device="cuda",
    )
    _check(inputs, kw, torch.bfloat16, path=path)


@pytest.mark.gpu
def test_gpu_bad_tables_never_fault():
    """Garbage page ids and lengths on the GPU (no value checks): no illegal access, the documented result."""
    inputs, kw = make_paged(
        batch=64,
        heads_q=32,
        heads_kv=8,
        seqlen_q=4,
        head_dim=128,
        page_size=16,
        max_pages=64,
        prefix_len=16,
        device="cuda",
    )
    q, kc, vc, bt, sl, pk, pv = inputs
    bt = torch.randint(-(2**31), 2**31 - 1, bt.shape, dtype=torch.int32, device="cuda")
    bt[:, ::2] = torch.randint(0, kc.shape[0], bt[:, ::2].shape, dtype=torch.int32, device="cuda")
    sl = torch.randint(-5000, 5000, sl.shape, dtype=torch.int32, device="cuda")
    ref, ref_lse = paged_reference(q, kc, vc, bt, sl, pk, pv, return_lse=True)
    for path in ("fused", "cascade"):
        out, lse = _paged_triton(
            q.bfloat16(), kc.bfloat16(), vc.bfloat16(), bt, sl, pk.bfloat16(), pv.bfloat16(), path=path
        )
        torch.cuda.synchronize()
        assert rel_err(out, ref) <= TOLERANCE[torch.bfloat16] and rel_err(lse, ref_lse) <= TOLERANCE[torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["fused", "cascade"])
def test_gpu_cuda_graph_replay_with_new_lengths_and_pages(path):
    """Capture one paged decode step; replay with new q, cache contents, block table and seq_lens."""
    shape = dict(
        batch=24,
        heads_q=32,
        heads_kv=8,
        seqlen_q=1,
        head_dim=128,
        page_size=16,
        max_pages=40,
        prefix_len=128,
        pool=2,
        device="cuda",
    )
    inputs, kw = make_paged(seed=1, **shape)
    static = [t.bfloat16() if t.is_floating_point() else t.clone() for t in inputs]

    def step():
        return _paged_triton(*static, **kw, path=path)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = step()
    for seed in (2, 3):
        fresh, _ = make_paged(seed=seed, **shape)
        for dst, src in zip(static, fresh):
            dst.copy_(src)
        kw["prefix_index"].copy_(torch.randint(-1, 2, kw["prefix_index"].shape, device="cuda"))
        graph.replay()
        ref, ref_lse = paged_reference(
            *(t.double() if t.is_floating_point() else t for t in static), return_lse=True, **kw
        )
        assert rel_err(out, ref) <= TOLERANCE[torch.bfloat16] and rel_err(lse, ref_lse) <= TOLERANCE[torch.bfloat16]
