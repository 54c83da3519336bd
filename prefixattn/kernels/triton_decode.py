"""Short-query (decode) path of the Triton backend: Sq <= 16 against a contiguous or paged KV cache.

handles() says which calls of the contiguous op come here (triton_backend routes them); forward() and
paged_forward() plan the launch and run the kernels in _decode_kernels.py.

Plan (shapes only, so a decode step is CUDA-graph capturable: no host sync, no value-dependent
allocation or launch parameter):
- split-K: one program per (sequence, KV head, M tile, split); splits are added only when B * Hkv alone
  cannot give every SM a program. With one split and no cascade the kernel writes the output directly
  (one launch); otherwise partials go to an fp32 workspace and a merge kernel reduces them.
- the prefix: read as the first key range of every (sequence, KV head) program ("fused", the default),
  or once per KV head for all sequences ("cascade") where prefix_path_cost's model predicts the repeated
  prefix reads cost more than the cascade's extra work. See benchmarks/NOTES.md, "Decode kernels".
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from . import bshd_empty

MAX_QUERY_LEN = 16  # the decode path serves Sq <= 16 (decode, speculative verification, short chunks)
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256  # tl.dot needs K >= 16; 256 keeps the tiles within shared memory
DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# --- scheduling constants (H100/H200-class GPU; see benchmarks/NOTES.md "Decode kernels") ---
# Splitting stops once B * Hkv * m_tiles >= the SM count: each program keeps two 32 KB K/V stages in
# flight, so one program per SM already covers HBM latency (measured, H200, B=32 Sk=2048: 256 programs
# unsplit ~ SDPA's 63 us, while 2 splits + merge took 73 us). Below that, splits top the grid up to
# SPLIT_PROGRAMS_PER_SM programs per SM (measured on par with SDPA at B=1, Sk=16K).
SPLIT_PROGRAMS_PER_SM = 2
MIN_BLOCKS_PER_SPLIT = 4  # a split streams at least 4 key blocks, so its partial write stays < 4% of its reads
MAX_SPLITS = 64
CASCADE_BLOCK_M = 64  # query rows per cascade program (rows of several sequences against one prefix tile)
MAX_CASCADE_GROUPS = 64  # pool entries: the cascade grid holds one row of tiles per entry

# --- cost model constants, calibrated on the H200 (benchmarks/NOTES.md "Decode kernels") ---
HBM_BYTES_PER_US = 4.2e6  # streaming K/V: measured 4.2-4.38 TB/s at B=128, Sk=2048 (copy ceiling 4.28)
L2_REREAD_BYTES_PER_US = 8.2e6  # fused prefix re-reads through L2 add time at this rate: measured 6.4-8.9 TB/s
LAUNCH_US = 2.0  # the merge kernel (launch gap + ramp/tail) inside a CUDA graph
TORCH_OP_US = 7.5  # one op of the pool grouping (sort, arange, searchsorted): measured ~23 us for the three
CASCADE_BLOCK_US = 1.0  # one 64-key prefix block of a cascade program (latency-bound: measured 0.9-1.1 us)
# The cascade's fixed costs the model leaves out (its programs hold SM slots, every sequence program
# writes partials) lost it the near-ties measured at B=8; like vLLM's gate it needs 8 sequences per
# prefix entry and a predicted win of 5%.
CASCADE_MIN_SEQUENCES = 8
CASCADE_MARGIN = 0.95


# Test / benchmark knobs. Production code never sets them; tests force each path and small splits.
_FORCE: dict = {"path": None, "splits": None, "block_n": None, "min_blocks_per_split": None}


@contextlib.contextmanager
def force(
    path: str | None = None,
    splits: int | None = None,
    block_n: int | None = None,
    min_blocks_per_split: int | None = None,
):
    """Force the prefix path ("fused" | "cascade"), the split count or the key block size (tests, benchmarks)."""
    if path not in (None, "fused", "cascade"):
        raise ValueError(f"path: expected None, 'fused' or 'cascade', got {path!r}")
    saved = dict(_FORCE)
    _FORCE.update(path=path, splits=splits, block_n=block_n, min_blocks_per_split=min_blocks_per_split)
    try:
        yield
    finally:
        _FORCE.clear()
        _FORCE.update(saved)


def unsupported_reason(dtype: torch.dtype, head_dim: int, seqlen_q: int) -> str | None:
    """Why the decode kernels cannot serve these shapes, or None."""
    if seqlen_q > MAX_QUERY_LEN:
        return f"the decode kernels serve at most {MAX_QUERY_LEN} query tokens, got Sq={seqlen_q}"
    if dtype not in DTYPES:
        return f"the decode kernels take float16, bfloat16 or float32, got {dtype}"
    if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        return f"the decode kernels take head dims {MIN_HEAD_DIM}..{MAX_HEAD_DIM}, got {head_dim}"
    return None


def handles(q: Tensor, k: Tensor, prefix_k, key_padding_mask, attn_bias, causal) -> bool:
    """True when this path serves a call of the contiguous op: short queries, no additive bias.

    key_padding_mask (HF left-padded batches) and causal (a per-row key limit) are handled here;
    attn_bias and longer queries go to the prefill/training kernels.
    """
    return attn_bias is None and unsupported_reason(q.dtype, q.shape[-1], q.shape[2]) is None


# ---------------------------------------------------------------------------------------------------
# Planning


@dataclass(frozen=True)
class Config:
    block_n: int
    num_warps: int
    num_stages: int


def kernel_config(head_dim: int, dtype: torch.dtype) -> Config:
    """Fixed table per (head dim, dtype): K and V tiles of BLOCK_N x D; 3 stages (2 for the big tiles)
    keep shared memory at 22-140 KB (compile check), so 1-3 programs fit an SM."""
    block_d = max(16, triton_next_pow2(head_dim))
    elem = 4 if dtype == torch.float32 else 2
    tile_bytes = 2 * block_d * elem  # K + V bytes per key
    block_n = 64 if tile_bytes * 64 <= 32 * 1024 else 32
    stages = 3 if tile_bytes * block_n <= 32 * 1024 else 2
    # D = 256: a 64-row fp32 accumulator is 64 KB; 8 warps keep it at 64 registers a thread (no spills).
    return Config(block_n=block_n, num_warps=8 if block_d > 128 else 4, num_stages=stages)


def triton_next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """SMs of the device (a cached host query, no sync); the interpreter plans as for an H100/H200."""
    if device.type != "cuda":
        return 132
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def choose_splits(base_programs: int, max_blocks: int, num_sms: int, min_blocks: int = MIN_BLOCKS_PER_SPLIT) -> int:
    """Splits per (sequence, KV head, M tile): none once the base grid covers every SM; otherwise enough
    to give each SM SPLIT_PROGRAMS_PER_SM programs, each streaming at least min_blocks key blocks."""
    if base_programs >= num_sms or max_blocks <= min_blocks:
        return 1
    target = SPLIT_PROGRAMS_PER_SM * num_sms
    return max(1, min(math.ceil(target / base_programs), math.ceil(max_blocks / min_blocks), MAX_SPLITS))


@dataclass(frozen=True)
class PathCost:
    fused_us: float
    cascade_us: float
    cascade_possible: bool

    @property
    def path(self) -> str:
        return "cascade" if self.cascade_possible and self.cascade_us < CASCADE_MARGIN * self.fused_us else "fused"


def prefix_path_cost(
    *,
    batch: int,
    heads_kv: int,
    group: int,
    seqlen_q: int,
    max_keys: int,
    head_dim: int,
    prefix_len: int,
    pool_size: int,
    elem_size: int,
    num_sms: int,
) -> PathCost:
    """Predicted microseconds of the fused and the cascade path (docs/design.md, "Decode paths").

    kv = Hkv * D * elem * 2 bytes per token (K and V). Both paths stream the sequence once from HBM and
    each used prefix entry once (it stays in L2 afterwards):
        stream = (B * Sk + min(N, B) * P) * kv / HBM bandwidth
    fused:   every (sequence, KV head, M tile) program re-reads the prefix from L2, which adds (measured
             on the H200; it does not hide under the streaming):
        fused   = stream + B * m_tiles * P * kv / L2 re-read rate  (+ merge launch when split)
    cascade: the prefix programs run in the same launch as the sequence programs, each walking
             cdiv(P, 64) blocks serially (latency-bound), then the merge; pools also pay for grouping
             the sequences by entry (three small torch ops):
        cascade = max(stream, waves * cdiv(P, 64) * block latency) + merge launch (+ 3 torch ops)
    G * Sq > 64 rows (m_tiles > 1) re-reads the sequence too, equally in both paths. The fused path wins
    for short prefixes and small batches (nothing to share, and no merge at B * Hkv >= #SMs); the cascade
    wins once B * P is a sizeable fraction of B * Sk (e.g. B=128, Sk=256, P=512: 65 vs 35 us).
    """
    rows = group * seqlen_q
    block_m = min(64, max(16, triton_next_pow2(rows)))
    m_tiles = math.ceil(rows / block_m)
    kv = heads_kv * head_dim * elem_size * 2
    n_entries = min(pool_size, batch) if pool_size > 1 else 1
    stream_us = (batch * max_keys + n_entries * prefix_len) * kv / HBM_BYTES_PER_US
    retile_us = batch * (m_tiles - 1) * max_keys * kv / L2_REREAD_BYTES_PER_US
    fused_splits = choose_splits(batch * heads_kv * m_tiles, math.ceil((max_keys + prefix_len) / 64), num_sms)
    fused_us = (
        stream_us
        + retile_us
        + batch * m_tiles * prefix_len * kv / L2_REREAD_BYTES_PER_US
        + (LAUNCH_US if fused_splits > 1 else 0.0)
    )

    cascade_possible = prefix_len > 0 and pool_size <= MAX_CASCADE_GROUPS and batch >= CASCADE_MIN_SEQUENCES * n_entries
    tiles = math.ceil(batch * rows / CASCADE_BLOCK_M) + (n_entries - 1)  # tiles holding rows, all groups
    waves = math.ceil(heads_kv * tiles / (SPLIT_PROGRAMS_PER_SM * num_sms))
    prefix_programs_us = waves * math.ceil(prefix_len / 64) * CASCADE_BLOCK_US
    cascade_us = (
        max(stream_us + retile_us, prefix_programs_us) + LAUNCH_US + (3 * TORCH_OP_US if pool_size > 1 else 0.0)
    )
    return PathCost(fused_us=fused_us, cascade_us=cascade_us, cascade_possible=cascade_possible)


@dataclass(frozen=True)
class Plan:
    cascade: bool
    num_splits: int
    block_m: int
    m_tiles: int
    block_d: int
    config: Config
    cascade_groups: int
    cascade_tiles: int

    @property
    def nslots(self) -> int:
        return self.num_splits + (1 if self.cascade else 0)

    @property
    def needs_merge(self) -> bool:
        return self.cascade or self.num_splits > 1


def make_plan(
    *,
    batch: int,
    heads_kv: int,
    group: int,
    seqlen_q: int,
    max_keys: int,
    head_dim: int,
    prefix_len: int,
    pool_size: int,
    dtype: torch.dtype,
    device: torch.device,
) -> Plan:
    config = kernel_config(head_dim, dtype)
    if _FORCE["block_n"]:
        config = Config(block_n=_FORCE["block_n"], num_warps=config.num_warps, num_stages=config.num_stages)
    rows = group * seqlen_q
    block_m = min(64, max(16, triton_next_pow2(rows)))
    m_tiles = math.ceil(rows / block_m)
    num_sms = sm_count(device)

    cascade = False
    if prefix_len > 0:
        forced = _FORCE["path"]
        if forced is not None:
            cascade = forced == "cascade"
        else:
            cost = prefix_path_cost(
                batch=batch,
                heads_kv=heads_kv,
                group=group,
                seqlen_q=seqlen_q,
                max_keys=max_keys,
                head_dim=head_dim,
                prefix_len=prefix_len,
                pool_size=pool_size,
                elem_size=dtype.itemsize,
                num_sms=num_sms,
            )
            cascade = cost.path == "cascade"

    key_range = max_keys + (0 if cascade else prefix_len)
    max_blocks = math.ceil(key_range / config.block_n)
    min_blocks = _FORCE["min_blocks_per_split"] or MIN_BLOCKS_PER_SPLIT
    splits = _FORCE["splits"] or choose_splits(batch * heads_kv * m_tiles, max_blocks, num_sms, min_blocks)
    groups = (pool_size if pool_size > 1 else 1) if cascade else 0
    tiles = math.ceil(batch * rows / CASCADE_BLOCK_M) if cascade else 0
    return Plan(
        cascade=cascade,
        num_splits=splits,
        block_m=block_m,
        m_tiles=m_tiles,
        block_d=max(16, triton_next_pow2(head_dim)),
        config=config,
        cascade_groups=groups,
        cascade_tiles=tiles,
    )


# ---------------------------------------------------------------------------------------------------
# Launch


def _prefix_args(prefix_k: Tensor | None, prefix_v: Tensor | None):
    """(mode, P, N, strides of prefix_k, strides of prefix_v): mode 0 none, 1 shared, 2 pool."""
    if prefix_k is None or prefix_k.shape[-2] == 0:
        return 0, 0, 0, (0, 0, 0), (0, 0, 0)
    if prefix_k.dim() == 3:
        return (
            1,
            prefix_k.shape[1],
            1,
            (0, prefix_k.stride(0), prefix_k.stride(1)),
            (0, prefix_v.stride(0), prefix_v.stride(1)),
        )
    return (2, prefix_k.shape[2], prefix_k.shape[0], prefix_k.stride()[:3], prefix_v.stride()[:3])


def _cascade_groups(prefix_index: Tensor, pool_size: int):
    """Sequences grouped by pool entry, on the device and without a host sync:
    ORDER = sequences sorted by entry (-1 and out-of-range entries fall outside every group),
    STARTS[e] .. STARTS[e+1] = the slice of ORDER using entry e."""
    sorted_idx, order = torch.sort(prefix_index, stable=True)
    entries = torch.arange(pool_size + 1, device=prefix_index.device, dtype=sorted_idx.dtype)
    starts = torch.searchsorted(sorted_idx, entries).to(torch.int32)
    return order.to(torch.int32), starts


def _launch(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prefix_k,
    prefix_v,
    prefix_index,
    prefix_lengths,
    key_padding_mask,
    block_table,
    seq_lens,
    causal: bool,
    scale: float,
    *,
    paged: bool,
    max_keys: int,
    heads_kv: int,
    k_strides,
    v_strides,
    num_pages: int,
    page_size: int,
):
    """k_strides / v_strides: (sequence or page, KV head, token) strides of k and v."""
    from . import _decode_kernels as kern

    batch, heads_q, seqlen_q, head_dim = q.shape
    group = heads_q // heads_kv
    out = bshd_empty(q)
    lse = torch.empty((batch, heads_q, seqlen_q), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        lse.fill_(float("-inf"))
        return out, lse

    mode, plen_max, pool, spk, spv = _prefix_args(prefix_k, prefix_v)
    plan = make_plan(
        batch=batch,
        heads_kv=heads_kv,
        group=group,
        seqlen_q=seqlen_q,
        max_keys=max_keys,
        head_dim=head_dim,
        prefix_len=plen_max,
        pool_size=pool if mode == 2 else 1,
        dtype=q.dtype,
        device=q.device,
    )
    if plan.needs_merge:
        opart = torch.empty((batch * heads_q * seqlen_q, plan.nslots, head_dim), dtype=torch.float32, device=q.device)
        lpart = torch.empty((batch * heads_q * seqlen_q, plan.nslots), dtype=torch.float32, device=q.device)
    else:
        opart = lpart = None

    order = starts = None
    cascade_programs = 0
    if plan.cascade:
        if mode == 2:
            order, starts = _cascade_groups(prefix_index, pool)
        cascade_programs = heads_kv * plan.cascade_tiles * plan.cascade_groups
    split_programs = batch * heads_kv * plan.m_tiles * plan.num_splits

    kpm = key_padding_mask.view(torch.uint8) if key_padding_mask is not None else None
    skb, skh, sks = k_strides
    svb, svh, svs = v_strides
    cfg = plan.config
    grid = (cascade_programs + split_programs,)
    kern.decode_kernel[grid](
        q,
        k,
        v,
        prefix_k if mode else None,
        prefix_v if mode else None,
        prefix_index if mode == 2 else None,
        prefix_lengths if mode else None,
        kpm,
        block_table,
        seq_lens,
        order,
        starts,
        out,
        lse,
        opart,
        lpart,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        skb,
        skh,
        sks,
        svb,
        svh,
        svs,
        spk[0],
        spk[1],
        spk[2],
        spv[0],
        spv[1],
        spv[2],
        kpm.stride(0) if kpm is not None else 0,
        kpm.stride(1) if kpm is not None else 0,
        block_table.stride(0) if block_table is not None else 0,
        out.stride(0),
        out.stride(1),
        out.stride(2),
        lse.stride(0),
        lse.stride(1),
        batch,
        heads_kv,
        max_keys,
        plen_max,
        max(pool, 1),
        num_pages,
        page_size,
        plan.num_splits,
        plan.m_tiles,
        cascade_programs,
        plan.cascade_tiles,
        plan.nslots,
        scale * 1.4426950408889634,
        G=group,
        SQ=seqlen_q,
        HEAD_DIM=head_dim,
        BLOCK_D=plan.block_d,
        BLOCK_M=plan.block_m,
        BLOCK_N=cfg.block_n,
        CASCADE_BLOCK_M=CASCADE_BLOCK_M,
        CASCADE_BLOCK_N=cfg.block_n,
        PAGED=paged,
        CAUSAL=causal,
        HAS_KPM=kpm is not None,
        PREFIX=mode,
        CASCADE=plan.cascade,
        HAS_PLEN=prefix_lengths is not None and mode != 0,
        WRITE_FINAL=not plan.needs_merge,
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    if plan.needs_merge:
        kern.merge_kernel[(batch * heads_q * seqlen_q,)](
            opart,
            lpart,
            prefix_index if mode == 2 else None,
            out,
            lse,
            out.stride(0),
            out.stride(1),
            out.stride(2),
            lse.stride(0),
            lse.stride(1),
            heads_q,
            max(pool, 1),
            plan.nslots,
            SQ=seqlen_q,
            HEAD_DIM=head_dim,
            BLOCK_D=plan.block_d,
            BLOCK_S=max(2, triton_next_pow2(plan.nslots)),
            POOL_SLOT0=plan.cascade and mode == 2,
            num_warps=4,
        )
    return out, lse


def forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prefix_k,
    prefix_v,
    prefix_index,
    prefix_lengths,
    key_padding_mask,
    causal: bool,
    scale: float,
):
    """The contiguous op's decode path: q [B, Hq, Sq, D], k/v [B, Hkv, Sk, D]; same semantics as the reference."""
    reason = unsupported_reason(q.dtype, q.shape[-1], q.shape[2])
    if reason is not None:
        raise ValueError(f"q: {reason}")
    heads_kv, seqlen_k = k.shape[1], k.shape[2]
    return _launch(
        q,
        k,
        v,
        prefix_k,
        prefix_v,
        prefix_index,
        prefix_lengths,
        key_padding_mask,
        None,
        None,
        causal,
        scale,
        paged=False,
        max_keys=seqlen_k,
        heads_kv=heads_kv,
        k_strides=k.stride()[:3],
        v_strides=v.stride()[:3],
        num_pages=0,
        page_size=1,
    )


def paged_forward(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_table: Tensor,
    seq_lens: Tensor,
    prefix_k,
    prefix_v,
    prefix_index,
    prefix_lengths,
    scale: float,
):
    """Decode over a paged cache: k_cache/v_cache [num_pages, page_size, Hkv, D], block_table [B, max_pages],
    seq_lens [B] (including the Sq new tokens, which are causal bottom-right). Inputs validated by
    prefixattn.paged; bad table entries mask their keys, lengths are clamped to the table."""
    reason = unsupported_reason(q.dtype, q.shape[-1], q.shape[2])
    if reason is not None:
        raise ValueError(f"q: {reason}")
    num_pages, page_size, heads_kv = k_cache.shape[0], k_cache.shape[1], k_cache.shape[2]
    max_keys = block_table.shape[1] * page_size
    return _launch(
        q,
        k_cache,
        v_cache,
        prefix_k,
        prefix_v,
        prefix_index,
        prefix_lengths,
        None,
        block_table,
        seq_lens,
        True,
        scale,
        paged=True,
        max_keys=max_keys,
        heads_kv=heads_kv,
        k_strides=(k_cache.stride(0), k_cache.stride(2), k_cache.stride(1)),
        v_strides=(v_cache.stride(0), v_cache.stride(2), v_cache.stride(1)),
        num_pages=num_pages,
        page_size=page_size,
    )
