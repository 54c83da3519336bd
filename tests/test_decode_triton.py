"""The Triton decode path (Sq <= 16) of prefix_attention against the float64 reference.

On the CPU the kernels run in Triton's interpreter (fp32 / fp16; bf16 dots are wrong there), with small
key blocks and forced split counts so every code path (fused and cascade prefix, several splits, empty
splits, M tiles, pools) runs on tiny shapes. GPU tests (marked) add bf16, realistic shapes and a CUDA graph.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import TOLERANCE, Case, rel_err

import prefixattn
from prefixattn.kernels import triton_decode as td


@pytest.fixture
def plans(monkeypatch):
    """Records the plan of every decode launch, so a test can assert which path actually ran."""
    seen = []
    original = td.make_plan

    def spy(**kw):
        plan = original(**kw)
        seen.append(plan)
        return plan

    monkeypatch.setattr(td, "make_plan", spy)
    return seen


def _run(case: Case, dtype, device, *, return_inputs=False, **force):
    (q, k, v, pk, pv), args = case.make(dtype=torch.float64, device=device, requires_grad=False)
    ref, ref_lse = prefixattn.prefix_attention_reference(q, k, v, pk, pv, return_lse=True, **args)

    def cast(t):  # .to keeps the strides, so noncontiguous cases stay [B, S, H, D] memory
        return None if t is None else t.to(dtype)

    if case.noncontiguous:
        assert not cast(q).is_contiguous() and not cast(k).is_contiguous()
    with td.force(**force):
        out, lse = prefixattn.prefix_attention(
            cast(q), cast(k), cast(v), cast(pk), cast(pv), return_lse=True, backend="triton", **args
        )
    assert out.shape == ref.shape and out.dtype == dtype
    assert out.transpose(1, 2).is_contiguous(), "out must be [B, Sq, Hq, D] memory viewed as [B, Hq, Sq, D]"
    assert lse.dtype == torch.float32 and lse.shape == ref_lse.shape
    err, lse_err = rel_err(out, ref), rel_err(lse, ref_lse)
    assert err <= TOLERANCE[dtype], f"out rel err {err}"
    assert lse_err <= TOLERANCE[dtype], f"lse rel err {lse_err}"
    return (out, lse, ref, ref_lse) if return_inputs else None


# --- query length x GQA ratio, shared prefix, both prefix paths --------------------------------------


@pytest.mark.parametrize("sq", [1, 2, 5, 16])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("path", ["fused", "cascade"])
def test_query_len_and_gqa(sq, group, path, device, plans):
    hkv = 2 if group < 8 else 1
    case = Case(batch=3, heads_q=group * hkv, heads_kv=hkv, seqlen_q=sq, seqlen_k=37, head_dim=16, prefix_len=7)
    _run(case, torch.float32, device, path=path, block_n=16)
    plan = plans[-1]
    assert plan.cascade == (path == "cascade")
    assert plan.m_tiles == math.ceil(group * sq / 64)


# --- pools ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["fused", "cascade"])
@pytest.mark.parametrize("sq", [1, 3])
def test_pool_mixed_lengths_and_missing_entries(path, sq, device, plans):
    case = Case(
        batch=5, heads_q=8, heads_kv=2, seqlen_q=sq, seqlen_k=23, head_dim=16, prefix_len=9, pool=3, lengths=True
    )
    _run(case, torch.float32, device, path=path, splits=2, block_n=16)
    assert plans[-1].cascade == (path == "cascade") and plans[-1].num_splits == 2


def test_pool_cascade_groups_span_several_tiles(device, plans):
    """Enough rows per entry that a group needs two cascade tiles (64 rows each)."""
    case = Case(batch=6, heads_q=8, heads_kv=1, seqlen_q=3, seqlen_k=5, head_dim=16, prefix_len=20, pool=2)
    _run(case, torch.float32, device, path="cascade", block_n=16)
    assert plans[-1].cascade_groups == 2 and plans[-1].cascade_tiles == math.ceil(6 * 24 / 64)


# --- masking, lengths, layouts -----------------------------------------------------------------------


@pytest.mark.parametrize("path", ["fused", "cascade"])
@pytest.mark.parametrize("padding", ["left", "random"])
def test_key_padding_mask(path, padding, device):
    case = Case(batch=4, heads_q=4, heads_kv=2, seqlen_q=2, seqlen_k=29, head_dim=16, prefix_len=3, padding=padding)
    _run(case, torch.float32, device, path=path, splits=2, block_n=16)


@pytest.mark.parametrize("sk,sq,prefix_len", [(1, 1, 4), (1, 1, 0), (37, 3, 0), (16, 16, 0), (33, 4, 1)])
def test_lengths_off_the_block_grid(sk, sq, prefix_len, device):
    case = Case(batch=2, heads_q=4, heads_kv=1, seqlen_q=sq, seqlen_k=sk, head_dim=16, prefix_len=prefix_len)
    _run(case, torch.float32, device, block_n=16)


def test_noncausal_short_queries_longer_than_keys(device):
    case = Case(batch=2, heads_q=4, heads_kv=2, seqlen_q=5, seqlen_k=3, head_dim=16, prefix_len=6, causal=False)
    _run(case, torch.float32, device, block_n=16)


@pytest.mark.parametrize("path", ["fused", "cascade"])
def test_noncontiguous_inputs(path, device):
    case = Case(batch=2, heads_q=8, heads_kv=2, seqlen_q=3, seqlen_k=21, head_dim=32, prefix_len=5, noncontiguous=True)
    _run(case, torch.float32, device, path=path, block_n=16)


def test_head_dim_not_a_power_of_two(device):
    case = Case(batch=2, heads_q=4, heads_kv=2, seqlen_q=2, seqlen_k=19, head_dim=24, prefix_len=5, pool=2)
    _run(case, torch.float32, device, path="cascade", splits=2, block_n=16)


@pytest.mark.parametrize("path", ["fused", "cascade"])
def test_float16(path, device):
    case = Case(
        batch=3,
        heads_q=8,
        heads_kv=2,
        seqlen_q=2,
        seqlen_k=41,
        head_dim=32,
        prefix_len=11,
        pool=2,
        lengths=True,
        padding="left",
    )
    _run(case, torch.float16, device, path=path, splits=2, block_n=16)


# --- splits ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["fused", "cascade"])
@pytest.mark.parametrize("splits", [2, 3, 7])
def test_split_counts_including_empty_splits(path, splits, device, plans):
    """37 keys + 5 prefix keys in blocks of 16 is 4 blocks (3 for the cascade's sequence pass): 7 splits
    leaves some splits without a block, whose empty partials the merge must ignore."""
    case = Case(batch=2, heads_q=4, heads_kv=2, seqlen_q=2, seqlen_k=37, head_dim=16, prefix_len=5)
    _run(case, torch.float32, device, path=path, splits=splits, block_n=16)
    assert plans[-1].num_splits == splits and plans[-1].needs_merge


def test_planner_splits_small_batches(device, plans):
    """Unforced: one sequence cannot fill the GPU, so the planner splits the keys (min 1 block per split here)."""
    case = Case(batch=1, heads_q=4, heads_kv=2, seqlen_q=1, seqlen_k=70, head_dim=16, prefix_len=3)
    _run(case, torch.float32, device, block_n=16, min_blocks_per_split=1)
    assert plans[-1].num_splits == math.ceil((70 + 3) / 16)


# --- empty rows and unchecked indices ------------------------------------------------------------------


@pytest.mark.parametrize("path", ["fused", "cascade"])
def test_empty_rows_give_zeros_and_minus_inf(path, device):
    """Sequence 0 has no prefix (-1) and every key padded: zeros and lse = -inf, never NaN."""
    b, hq, hkv, sq, sk, d, p = 3, 4, 2, 2, 9, 16, 4
    q, k, v = torch.randn(b, hq, sq, d), torch.randn(b, hkv, sk, d), torch.randn(b, hkv, sk, d)
    pk, pv = torch.randn(2, hkv, p, d), torch.randn(2, hkv, p, d)
    idx = torch.tensor([-1, 1, 0])
    mask = torch.ones(b, sk, dtype=torch.bool)
    mask[0] = False
    args = dict(prefix_index=idx.to(device), key_padding_mask=mask.to(device), causal=False)
    ref, ref_lse = prefixattn.prefix_attention_reference(
        q.double(),
        k.double(),
        v.double(),
        pk.double(),
        pv.double(),
        return_lse=True,
        prefix_index=idx,
        key_padding_mask=mask,
        causal=False,
    )
    with td.force(path=path, splits=2, block_n=16):
        out, lse = prefixattn.prefix_attention(
            *(t.to(device) for t in (q, k, v, pk, pv)), return_lse=True, backend="triton", **args
        )
    assert torch.all(out[0].cpu() == 0) and torch.all(torch.isneginf(lse[0].cpu()))
    assert rel_err(out.cpu(), ref) <= TOLERANCE[torch.float32] and rel_err(lse.cpu(), ref_lse) <= 1e-5


@pytest.mark.parametrize("path", ["fused", "cascade"])
def test_unchecked_pool_indices_and_lengths_are_clamped(path, device):
    """Values validation skips on the GPU: indices outside [0, N) mean no prefix, lengths clamp to [0, P]."""
    b, hq, hkv, sq, sk, d, p, n = 4, 4, 2, 1, 10, 16, 6, 2
    q, k, v = torch.randn(b, hq, sq, d), torch.randn(b, hkv, sk, d), torch.randn(b, hkv, sk, d)
    pk, pv = torch.randn(n, hkv, p, d), torch.randn(n, hkv, p, d)
    bad_idx, bad_len = torch.tensor([5, -3, 0, 1]), torch.tensor([99, -4])
    good_idx, good_len = torch.tensor([-1, -1, 0, 1]), torch.tensor([p, 0])
    ref, ref_lse = prefixattn.prefix_attention_reference(
        q.double(),
        k.double(),
        v.double(),
        pk.double(),
        pv.double(),
        prefix_index=good_idx,
        prefix_lengths=good_len,
        return_lse=True,
    )
    dev = [t.to(device) for t in (q, k, v, pk, pv, bad_idx, bad_len)]
    with td.force(path=path, block_n=16):
        out, lse = td.forward(dev[0], dev[1], dev[2], dev[3], dev[4], dev[5], dev[6], None, True, d**-0.5)
    assert rel_err(out.cpu(), ref) <= TOLERANCE[torch.float32] and rel_err(lse.cpu(), ref_lse) <= 1e-5


# --- routing and planning (no kernels) ------------------------------------------------------------------


def test_handles_short_queries_without_bias():
    q, k = torch.empty(2, 8, 16, 64), torch.empty(2, 2, 40, 64)
    assert td.handles(q, k, None, None, None, True)
    assert td.handles(q, k, None, torch.ones(2, 40, dtype=torch.bool), None, False)
    assert not td.handles(torch.empty(2, 8, 17, 64), k, None, None, None, True)
    assert not td.handles(q, k, None, None, torch.zeros(1, 1, 16, 40), True)
    assert not td.handles(q.double(), k.double(), None, None, None, True)
    assert not td.handles(torch.empty(2, 8, 1, 8), torch.empty(2, 2, 40, 8), None, None, None, True)


def test_forward_refuses_what_it_cannot_serve():
    with pytest.raises(ValueError, match="at most 16 query tokens"):
        td.forward(
            torch.empty(1, 2, 17, 32),
            torch.empty(1, 2, 20, 32),
            torch.empty(1, 2, 20, 32),
            None,
            None,
            None,
            None,
            None,
            True,
            1.0,
        )


def _cost(batch, sk, p, pool=1, sq=1):
    return td.prefix_path_cost(
        batch=batch,
        heads_kv=8,
        group=4,
        seqlen_q=sq,
        max_keys=sk,
        head_dim=128,
        prefix_len=p,
        pool_size=pool,
        elem_size=2,
        num_sms=132,
    )


def test_cost_model_picks_cascade_only_where_the_prefix_dominates():
    """The choices the H200 measurements support (benchmarks/NOTES.md, "Decode kernels")."""
    assert _cost(128, 256, 512).path == "cascade"  # measured 46 us vs 73 fused: the 2x-over-concat shape
    assert _cost(128, 256, 2048).path == "cascade"  # 50 vs 178
    assert _cost(128, 2048, 512).path == "cascade"  # prefix re-reads add ~30 us to the fused 277 us
    assert _cost(128, 2048, 16).path == "fused"  # sequence bytes dominate: nothing to gain, a merge to pay
    assert _cost(8, 2048, 2048).path == "fused"  # 29 vs 40: 8 cascade programs walk the prefix serially
    assert _cost(8, 2048, 128).path == "fused"  # 25 vs 27: a near tie goes to the single pass
    assert _cost(1, 2048, 512).path == "fused"  # batch 1: nothing to share
    assert _cost(4, 64, 64).path == "fused"
    assert _cost(128, 256, 512, pool=4).path == "cascade"
    assert _cost(128, 256, 512, pool=td.MAX_CASCADE_GROUPS + 1).path == "fused"
    assert _cost(64, 256, 512, pool=16).path == "fused"  # 4 sequences per entry: too few to share


def test_target_shape_predictions():
    """The model's predictions at the issue's targets (H200, bf16, Hq=32, Hkv=8, D=128)."""
    kv = 8 * 128 * 2 * 2
    needed_at_85 = (128 * 2048 + 512) * kv / (0.85 * 4.28e6)
    assert _cost(128, 2048, 512).cascade_us <= needed_at_85  # >= 85% of the copy ceiling
    concat_us = 128 * (256 + 512) * kv / 4.28e6  # concat + SDPA at the copy ceiling
    assert _cost(128, 256, 512).cascade_us <= concat_us / 2


def test_splits_fill_the_gpu_only_when_the_batch_cannot():
    assert td.choose_splits(128 * 8, 32, 132) == 1
    assert td.choose_splits(32 * 8, 32, 132) == 1  # 256 programs already cover 132 SMs (measured faster)
    assert td.choose_splits(8, 32, 132) == 8  # capped: 4 blocks per split at least
    assert td.choose_splits(8, 2048, 132) == 33
    assert td.choose_splits(64, 2048, 132) == 5
    assert td.choose_splits(1, 10**6, 132) == td.MAX_SPLITS
    assert td.choose_splits(8, 3, 132) == 1


# --- GPU ------------------------------------------------------------------------------------------------

GPU_TOL = TOLERANCE[torch.bfloat16]


def _gpu_run(
    batch,
    sk,
    p,
    pool=0,
    sq=1,
    path=None,
    dtype=torch.bfloat16,
    heads_q=8,
    heads_kv=2,
    head_dim=128,
    padding=False,
    strided=False,
):
    """Inputs drawn on the GPU in the kernel dtype; the reference runs on float64 copies of those values."""
    g = torch.Generator(device="cuda").manual_seed(batch * 7919 + sk * 31 + p)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device="cuda", dtype=torch.float32).to(dtype)

    if strided:  # [B, S, H, D] memory viewed as [B, H, S, D], as transformers passes it
        q, k, v = (
            rnd(batch, n, h, head_dim).transpose(1, 2) for n, h in ((sq, heads_q), (sk, heads_kv), (sk, heads_kv))
        )
    else:
        q, k, v = (
            rnd(batch, heads_q, sq, head_dim),
            rnd(batch, heads_kv, sk, head_dim),
            rnd(batch, heads_kv, sk, head_dim),
        )
    args = {}
    pk = pv = None
    if p:
        shape = (pool, heads_kv, p, head_dim) if pool else (heads_kv, p, head_dim)
        pk, pv = rnd(*shape), rnd(*shape)
        if pool:
            args["prefix_index"] = torch.randint(-1, pool, (batch,), generator=g, device="cuda")
            args["prefix_lengths"] = torch.randint(0, p + 1, (pool,), generator=g, device="cuda")
    if padding:
        lens = torch.randint(0, sk + 1, (batch,), generator=g, device="cuda")
        args["key_padding_mask"] = torch.arange(sk, device="cuda")[None, :] >= (sk - lens)[:, None]
    f64 = [None if t is None else t.double() for t in (q, k, v, pk, pv)]
    ref, ref_lse = prefixattn.prefix_attention_reference(*f64, return_lse=True, **args)
    with td.force(path=path):
        out, lse = prefixattn.prefix_attention(q, k, v, pk, pv, return_lse=True, backend="triton", **args)
    assert out.transpose(1, 2).is_contiguous() and out.dtype == dtype
    tol = TOLERANCE[dtype]
    assert rel_err(out, ref) <= tol and rel_err(lse, ref_lse) <= tol, (rel_err(out, ref), rel_err(lse, ref_lse))


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 7, 64])
@pytest.mark.parametrize("sk", [1, 300, 4099])
@pytest.mark.parametrize("p", [0, 16, 512])
@pytest.mark.parametrize("path", ["fused", "cascade", None])
def test_gpu_against_reference(batch, sk, p, path):
    _gpu_run(batch, sk, p, path=path)


@pytest.mark.gpu
@pytest.mark.parametrize("batch,sk,p", [(7, 300, 16), (64, 4099, 512), (64, 300, 512)])
@pytest.mark.parametrize("path", ["fused", "cascade", None])
@pytest.mark.parametrize("sq", [1, 4])
def test_gpu_pool_and_short_queries(batch, sk, p, path, sq):
    _gpu_run(batch, sk, p, pool=3, sq=sq, path=path, padding=True, strided=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("head_dim", [64, 96, 256])
@pytest.mark.parametrize("path", ["fused", "cascade"])
def test_gpu_dtypes_and_head_dims(dtype, head_dim, path):
    _gpu_run(9, 777, 40, sq=2, path=path, dtype=dtype, heads_q=32, heads_kv=8, head_dim=head_dim)


@pytest.mark.gpu
@pytest.mark.parametrize("pool", [0, 3])
def test_gpu_cuda_graph_replay_with_new_inputs(pool):
    """A captured decode step replays on new q/k/v/prefix contents: no host sync, no stale launch data."""
    b, hq, hkv, sk, d, p = 16, 32, 8, 600, 128, 64
    shapes = [(b, hq, 1, d), (b, hkv, sk, d), (b, hkv, sk, d)] + [((pool,) if pool else ()) + (hkv, p, d)] * 2
    static = [torch.randn(s, device="cuda").bfloat16() for s in shapes]
    args = {"prefix_index": torch.randint(-1, pool, (b,), device="cuda")} if pool else {}
    force = dict(path="cascade") if pool else {}

    def step():
        with td.force(**force):
            return prefixattn.prefix_attention(*static, return_lse=True, backend="triton", **args)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = step()
    for _ in range(2):
        for t in static:
            t.copy_(torch.randn(t.shape, device="cuda"))
        if pool:
            args["prefix_index"].copy_(torch.randint(-1, pool, (b,), device="cuda"))
        graph.replay()
        ref, ref_lse = prefixattn.prefix_attention_reference(*(t.double() for t in static), return_lse=True, **args)
        assert rel_err(out, ref) <= GPU_TOL and rel_err(lse, ref_lse) <= GPU_TOL
