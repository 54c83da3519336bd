"""Gradient of the prefix K/V: a deterministic, batch-bounded two-pass reduction.

dPK[e, kvh] = scale * sum over (sequences using entry e, query heads of kvh, queries) of dS^T Q, and likewise
dPV = P^T dO. The natural grid (prefix blocks x KV heads) is a handful of programs, so the work items
(sequence, query head of the group, query tile) are split into `chunks` contiguous ranges instead:

1. `_prefix_partial_kernel`, grid (prefix blocks, Hkv, chunks): each program keeps fp32 dK/dV of its prefix
   block in registers over its item range and writes one partial per (chunk, entry) segment.
2. `_prefix_reduce_kernel`, grid (prefix row blocks, Hkv, N): sums, for each entry, the partials of the chunks that
   cover it, in chunk order.

Pool form: sequences are ordered by entry with a device-side stable argsort (no host sync), so a chunk's range
crosses entries only at segment boundaries; the partial of (chunk c, entry e) lives in slot c + e, which is
unique because entries are non-decreasing along the chunk order. Slots: chunks + N - 1. Sequences with index -1
sort first and are skipped. The number of chunks depends on the GPU and the prefix shape, never on the batch,
so the temporary is O(chunks x Hkv x P x D) fp32 (plus one slot per extra pool entry) and is freed on return.
Everything is plain stores and fixed-order sums: bitwise deterministic.

Opt-in (deterministic=False, FUSE_DQ): each work item also adds scale * dS PK for its query rows into the fp32 dq
buffer with atomics. Each (sequence, head, query tile) is in exactly one chunk per prefix block, so every row gets
one add per prefix block of its entry; sequences with index -1 and blocks past the valid length add nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._layout import unit_stride_last
from ._triton_common import LOG2E, PrefixArgs, atomic_add_rows, load_rows, offsets_need_64bit, row_offsets, tl_acc
from ._triton_config import KernelConfig, acc_dtype, dot_precision, head_dim_block

# Each chunk of (prefix block x KV head) programs should fill ~2 waves of the GPU.
WAVES = 2
MAX_CHUNKS = 1024
_INTERPRETER_SMS = 4


@triton.jit
def _chunk_layout(SEG_START, batch, items_per_seq, n_chunks, POOLED: tl.constexpr):
    """(first sorted sequence with a prefix, number of work items, items per chunk) - same in both kernels."""
    if POOLED:
        s0 = tl.load(SEG_START).to(tl.int32)  # sequences with index -1 sort first
    else:
        s0 = 0
    n_items = (batch - s0) * items_per_seq
    per = tl.maximum(tl.cdiv(n_items, n_chunks), 1)
    return s0, n_items, per


@triton.jit
def _prefix_partial_kernel(
    Q,
    DOUT,
    LSE2,
    DELTA,
    PK,
    PV,
    PLEN,
    ORDER,
    SORTED,
    SEG_START,
    SEG_END,
    PART_K,
    PART_V,
    DQ,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_dob,
    stride_doh,
    stride_dom,
    stride_pke,
    stride_pkh,
    stride_pkn,
    stride_pve,
    stride_pvh,
    stride_pvn,
    stride_part_slot,
    stride_part_h,
    stride_dqb,
    stride_dqh,
    stride_dqm,
    batch,
    heads_q,
    group,
    seq_q,
    prefix_len,
    items_per_seq,
    tiles_m,
    n_chunks,
    qk_scale,
    scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_P: tl.constexpr,
    POOLED: tl.constexpr,
    HAS_LENGTHS: tl.constexpr,
    ACC: tl.constexpr,
    DOT_PREC: tl.constexpr,
    FUSE_DQ: tl.constexpr,
    WIDE: tl.constexpr,
):
    pid_p = tl.program_id(0)
    kvh = tl.program_id(1)
    chunk = tl.program_id(2)
    s0, n_items, per = _chunk_layout(SEG_START, batch, items_per_seq, n_chunks, POOLED)
    w_lo = chunk * per
    w_hi = tl.minimum(w_lo + per, n_items)

    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    if w_lo < w_hi:
        if POOLED:
            e_first = tl.load(SORTED + s0 + w_lo // items_per_seq).to(tl.int32)
            e_last = tl.load(SORTED + s0 + (w_hi - 1) // items_per_seq).to(tl.int32)
        else:
            e_first = 0
            e_last = 0
        for e in range(e_first, e_last + 1):
            if POOLED:
                lo = tl.maximum(w_lo, (tl.load(SEG_START + e).to(tl.int32) - s0) * items_per_seq)
                hi = tl.minimum(w_hi, (tl.load(SEG_END + e).to(tl.int32) - s0) * items_per_seq)
            else:
                lo = w_lo
                hi = w_hi
            if HAS_LENGTHS:
                plen = tl.load(PLEN + e).to(tl.int32)
            else:
                plen = prefix_len
            if pid_p * BLOCK_P >= plen:  # this prefix block is past the entry's valid length: gradient 0
                hi = lo
            e64 = tl.cast(e, tl.int64)
            pk_ptrs = PK + e64 * stride_pke + kvh * stride_pkh + offs_p[:, None] * stride_pkn + offs_d[None, :]
            pv_ptrs = PV + e64 * stride_pve + kvh * stride_pvh + offs_p[:, None] * stride_pvn + offs_d[None, :]
            pk = load_rows(pk_ptrs, offs_p, plen, offs_d, HEAD_DIM, BLOCK_D, True)
            pv = load_rows(pv_ptrs, offs_p, plen, offs_d, HEAD_DIM, BLOCK_D, True)
            dk = tl.zeros([BLOCK_P, BLOCK_D], dtype=ACC)
            dv = tl.zeros([BLOCK_P, BLOCK_D], dtype=ACC)
            for w in range(lo, hi):
                s = w // items_per_seq
                rem = w - s * items_per_seq
                g = rem // tiles_m
                m0 = (rem - g * tiles_m) * BLOCK_M
                rows = m0 + offs_m
                if POOLED:
                    b = tl.load(ORDER + s0 + s).to(tl.int64)
                else:
                    b = tl.cast(s, tl.int64)
                h = kvh * group + g
                if WIDE:  # 64-bit head offsets too: Hq * head stride may pass 2^31
                    h = tl.cast(h, tl.int64)
                q = load_rows(
                    Q + b * stride_qb + h * stride_qh + row_offsets(m0, BLOCK_M, stride_qm, WIDE) + offs_d[None, :],
                    rows,
                    seq_q,
                    offs_d,
                    HEAD_DIM,
                    BLOCK_D,
                    True,
                )
                do = load_rows(
                    DOUT
                    + b * stride_dob
                    + h * stride_doh
                    + row_offsets(m0, BLOCK_M, stride_dom, WIDE)
                    + offs_d[None, :],
                    rows,
                    seq_q,
                    offs_d,
                    HEAD_DIM,
                    BLOCK_D,
                    True,
                )
                stat = (b * heads_q + h) * seq_q + rows
                # Rows past seq_q and empty rows carry lse2 = +inf, so their probabilities are exactly 0.
                lse2 = tl.load(LSE2 + stat, mask=rows < seq_q, other=float("inf"))
                delta = tl.load(DELTA + stat, mask=rows < seq_q, other=0.0)
                p_t = tl.exp2(tl.dot(pk, tl.trans(q), input_precision=DOT_PREC) * qk_scale - lse2[None, :])
                if FUSE_DQ:  # slots past the valid length must add exactly 0 to dQ (not 0 * an overflowed p)
                    p_t = tl.where(offs_p[:, None] < plen, p_t, 0.0)
                dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PREC)
                dp_t = tl.dot(pv, tl.trans(do), input_precision=DOT_PREC)
                ds_t = p_t * (dp_t - delta[None, :])
                dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PREC)
                if FUSE_DQ:  # this work item's rows get the prefix block's share of dQ, once per prefix block
                    dq = tl.dot(tl.trans(ds_t.to(pk.dtype)), pk, input_precision=DOT_PREC) * scale
                    atomic_add_rows(
                        DQ
                        + b * stride_dqb
                        + h * stride_dqh
                        + row_offsets(m0, BLOCK_M, stride_dqm, WIDE)
                        + offs_d[None, :],
                        dq,
                        rows,
                        seq_q,
                        offs_d,
                        HEAD_DIM,
                    )
            # Slots past the valid length read zeros above but their rows still hold exp2(-lse2) terms: zero them.
            valid = offs_p[:, None] < plen
            dk = tl.where(valid, dk * scale, 0.0)
            dv = tl.where(valid, dv, 0.0)
            slot = tl.cast(chunk + e, tl.int64)
            part = slot * stride_part_slot + kvh * stride_part_h + offs_p[:, None] * HEAD_DIM + offs_d[None, :]
            mask = (offs_p[:, None] < prefix_len) & (offs_d[None, :] < HEAD_DIM)
            tl.store(PART_K + part, dk, mask=mask)
            tl.store(PART_V + part, dv, mask=mask)


@triton.jit
def _prefix_reduce_kernel(
    PART_K,
    PART_V,
    SEG_START,
    SEG_END,
    DPK,
    DPV,
    stride_part_slot,
    stride_part_h,
    stride_dpke,
    stride_dpkh,
    stride_dpkn,
    stride_dpve,
    stride_dpvh,
    stride_dpvn,
    batch,
    prefix_len,
    items_per_seq,
    n_chunks,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    POOLED: tl.constexpr,
    ACC: tl.constexpr,
):
    pid_r = tl.program_id(0)
    kvh = tl.program_id(1)
    e = tl.program_id(2)
    e64 = e.to(tl.int64)  # the gradient store: N * Hkv * P * D may pass 2^31
    s0, n_items, per = _chunk_layout(SEG_START, batch, items_per_seq, n_chunks, POOLED)
    if POOLED:
        e_lo = (tl.load(SEG_START + e).to(tl.int32) - s0) * items_per_seq
        e_hi = (tl.load(SEG_END + e).to(tl.int32) - s0) * items_per_seq
    else:
        e_lo = 0
        e_hi = n_items
    c_lo = e_lo // per
    c_hi = tl.where(e_hi > e_lo, (tl.maximum(e_hi, 1) - 1) // per + 1, c_lo)  # chunks covering [e_lo, e_hi)

    offs_p = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_p[:, None] < prefix_len) & (offs_d[None, :] < HEAD_DIM)
    part = kvh * stride_part_h + offs_p[:, None] * HEAD_DIM + offs_d[None, :]
    dk = tl.zeros([BLOCK_R, BLOCK_D], dtype=ACC)
    dv = tl.zeros([BLOCK_R, BLOCK_D], dtype=ACC)
    for c in range(c_lo, c_hi):
        slot = tl.cast(c + e, tl.int64) * stride_part_slot
        dk += tl.load(PART_K + slot + part, mask=mask, other=0.0)
        dv += tl.load(PART_V + slot + part, mask=mask, other=0.0)
    tl.store(
        DPK + e64 * stride_dpke + kvh * stride_dpkh + offs_p[:, None] * stride_dpkn + offs_d[None, :],
        dk.to(DPK.dtype.element_ty),
        mask=mask,
    )
    tl.store(
        DPV + e64 * stride_dpve + kvh * stride_dpvh + offs_p[:, None] * stride_dpvn + offs_d[None, :],
        dv.to(DPV.dtype.element_ty),
        mask=mask,
    )


@dataclass(frozen=True)
class PrefixPlan:
    """How the prefix-gradient work is cut: the partial buffer is [slots, Hkv, P, D] fp32."""

    block_p: int
    prefix_blocks: int
    chunks: int
    slots: int


def device_sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return _INTERPRETER_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def plan(
    *,
    batch: int,
    heads_q: int,
    heads_kv: int,
    seq_q: int,
    prefix_len: int,
    pool_size: int,
    block_m: int,
    block_p: int,
    sm_count: int,
    chunks: int | None = None,
) -> PrefixPlan:
    """Chunk count ~ WAVES x SMs / (prefix blocks x Hkv) (at least 1), capped by MAX_CHUNKS and the work items.

    The batch only enters through the item cap (min), so slots <= MAX_CHUNKS + N - 1 whatever the batch.
    """
    block_p = max(16, min(block_p, triton.next_power_of_2(prefix_len)))
    prefix_blocks = triton.cdiv(prefix_len, block_p)
    items = batch * (heads_q // heads_kv) * triton.cdiv(seq_q, block_m)
    if chunks is None:  # round down: a partly filled extra wave costs more than slightly larger chunks
        chunks = (WAVES * sm_count) // (prefix_blocks * heads_kv)
    chunks = max(1, min(chunks, MAX_CHUNKS, items))
    return PrefixPlan(block_p, prefix_blocks, chunks, chunks + max(pool_size, 1) - 1)


def allocate_partials(
    plan_: PrefixPlan, heads_kv: int, prefix_len: int, head_dim: int, dtype: torch.dtype, device: torch.device
):
    """The fp32 (fp64 for fp64 inputs) partial buffers; a separate function so tests can watch the size."""
    shape = (plan_.slots, heads_kv, prefix_len, head_dim)
    return torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device)


def _sequence_order(prefix_index: torch.Tensor, pool_size: int):
    """Sequences sorted by pool entry (stable, device-side) and each entry's [start, end) in that order."""
    idx = prefix_index.to(torch.int64)
    order = torch.argsort(idx, stable=True)
    sorted_idx = idx[order]
    entries = torch.arange(pool_size, device=idx.device, dtype=torch.int64)
    seg_start = torch.searchsorted(sorted_idx, entries)
    seg_end = torch.searchsorted(sorted_idx, entries, right=True)
    return order, sorted_idx, seg_start, seg_end


def prefix_grads(
    q,
    dout,
    lse2,
    delta,
    pre: PrefixArgs,
    scale: float,
    cfg: KernelConfig,
    chunks: int | None = None,
    dq_acc: torch.Tensor | None = None,
):
    """(dprefix_k, dprefix_v) shaped like the prefix tensors, in their dtype. With dq_acc (an fp32 buffer shaped
    like q), also atomically add the prefix keys' share of dQ into it (deterministic=False)."""
    batch, heads_q, seq_q, head_dim = q.shape
    heads_kv = pre.k.shape[-3]
    prefix_len = pre.length
    dpk = torch.empty_like(pre.k)
    dpv = torch.empty_like(pre.v)
    if dpk.numel() == 0:
        return dpk, dpv
    dout = unit_stride_last(dout)
    p = plan(
        batch=batch,
        heads_q=heads_q,
        heads_kv=heads_kv,
        seq_q=seq_q,
        prefix_len=prefix_len,
        pool_size=pre.pool_size,
        block_m=cfg.block_m,
        block_p=cfg.block_n,
        sm_count=device_sm_count(q.device),
        chunks=chunks,
    )
    block_d = head_dim_block(head_dim)
    tiles_m = triton.cdiv(seq_q, cfg.block_m)
    items_per_seq = (heads_q // heads_kv) * tiles_m
    if pre.pooled:
        order, sorted_idx, seg_start, seg_end = _sequence_order(pre.index, pre.pool_size)
    else:
        order = sorted_idx = seg_start = seg_end = q
    part_k, part_v = allocate_partials(p, heads_kv, prefix_len, head_dim, acc_dtype(q.dtype), q.device)
    dq_t = dq_acc if dq_acc is not None else q  # a dummy pointer when dQ is not fused

    if seq_q > 0 and batch > 0:
        _prefix_partial_kernel[(p.prefix_blocks, heads_kv, p.chunks)](
            q,
            dout,
            lse2,
            delta,
            pre.k,
            pre.v,
            pre.lengths,
            order,
            sorted_idx,
            seg_start,
            seg_end,
            part_k,
            part_v,
            dq_t,
            q.stride(0),
            q.stride(1),
            q.stride(2),
            dout.stride(0),
            dout.stride(1),
            dout.stride(2),
            *pre.stride_k,
            *pre.stride_v,
            part_k.stride(0),
            part_k.stride(1),
            dq_t.stride(0),
            dq_t.stride(1),
            dq_t.stride(2),
            batch,
            heads_q,
            heads_q // heads_kv,
            seq_q,
            prefix_len,
            items_per_seq,
            tiles_m,
            p.chunks,
            scale * LOG2E,
            scale,
            HEAD_DIM=head_dim,
            BLOCK_D=block_d,
            BLOCK_M=cfg.block_m,
            BLOCK_P=p.block_p,
            POOLED=pre.pooled,
            HAS_LENGTHS=pre.has_lengths,
            ACC=tl_acc(q.dtype),
            DOT_PREC=dot_precision(q.dtype),
            FUSE_DQ=dq_acc is not None,
            WIDE=offsets_need_64bit(q, dout, dq_acc, pre.k, pre.v),
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )
    view_k = dpk if pre.pooled else dpk.unsqueeze(0)
    view_v = dpv if pre.pooled else dpv.unsqueeze(0)
    # A memory-bound sum: small row blocks keep the two accumulators at ~32 registers per thread.
    block_r = min(64, max(16, (4096 if acc_dtype(q.dtype) == torch.float32 else 2048) // block_d))
    _prefix_reduce_kernel[(triton.cdiv(prefix_len, block_r), heads_kv, pre.pool_size)](
        part_k,
        part_v,
        seg_start,
        seg_end,
        view_k,
        view_v,
        part_k.stride(0),
        part_k.stride(1),
        view_k.stride(0),
        view_k.stride(1),
        view_k.stride(2),
        view_v.stride(0),
        view_v.stride(1),
        view_v.stride(2),
        batch,
        prefix_len,
        items_per_seq,
        p.chunks,
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        BLOCK_R=block_r,
        POOLED=pre.pooled,
        ACC=tl_acc(q.dtype),
        num_warps=4,
    )
    del part_k, part_v  # a temporary: freed (returned to the caching allocator) before the caller continues
    return dpk, dpv
