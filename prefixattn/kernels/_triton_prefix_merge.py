"""Fold the prefix into an attention result computed over the sequence keys alone (the "sdpa" backend's forward).

Given (o_seq, lse_seq) from a fused attention kernel over the sequence keys, the online-softmax state of every
query row after those keys is fully determined: row max m = lse_seq, row sum l = 1, accumulator acc = o_seq
(acc is normalised to that m). One program per (query tile, batch x query head) starts from that state and
runs the prefix tiles exactly as the triton forward does (read in place from the prefix buffer, shared or pool
entry, tail tile masked), then writes the final out and lse. No concatenation, no [B, Hq, Sq, P] scores.

A row whose sequence part is empty (lse_seq = -inf) starts from the empty state (m = -inf, l = 0, acc = 0).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._layout import unit_stride_last
from ._triton_common import (
    LOG2E,
    PrefixArgs,
    finish_rows,
    load_rows,
    offsets_need_64bit,
    prefix_tile_ptrs,
    row_offsets,
    store_rows,
    tl_acc,
)
from ._triton_config import acc_dtype, config_for, dot_precision, head_dim_block
from .triton_fwd import prefix_tiles


@triton.jit
def _prefix_merge_fwd_kernel(
    Q,
    PK,
    PV,
    PIDX,
    PLEN,
    OSEQ,
    LSEQ,
    OUT,
    LSE,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_pke,
    stride_pkh,
    stride_pkn,
    stride_pve,
    stride_pvh,
    stride_pvn,
    stride_osb,
    stride_osh,
    stride_osm,
    stride_lsb,
    stride_lsh,
    stride_lsm,
    stride_ob,
    stride_oh,
    stride_om,
    heads_q,
    group,
    seq_q,
    prefix_len,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    POOLED: tl.constexpr,
    HAS_LENGTHS: tl.constexpr,
    ACC: tl.constexpr,
    DOT_PREC: tl.constexpr,
    WIDE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // heads_q
    h = pid_bh % heads_q
    kvh = h // group
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)

    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = load_rows(
        Q + b64 * stride_qb + h64 * stride_qh + row_offsets(m0, BLOCK_M, stride_qm, WIDE) + offs_d[None, :],
        offs_m,
        seq_q,
        offs_d,
        HEAD_DIM,
        BLOCK_D,
        True,
    )

    # The state after the sequence keys, base 2.
    lse_seq = tl.load(
        LSEQ + b64 * stride_lsb + h64 * stride_lsh + offs_m * stride_lsm, mask=offs_m < seq_q, other=float("-inf")
    ).to(ACC)
    has_seq = lse_seq != float("-inf")
    m_i = lse_seq * 1.4426950408889634
    l_i = tl.where(has_seq, 1.0, 0.0).to(ACC)
    acc = load_rows(
        OSEQ + b64 * stride_osb + h64 * stride_osh + row_offsets(m0, BLOCK_M, stride_osm, WIDE) + offs_d[None, :],
        offs_m,
        seq_q,
        offs_d,
        HEAD_DIM,
        BLOCK_D,
        True,
    ).to(ACC)
    acc = tl.where(has_seq[:, None], acc, 0.0)

    pk_ptrs, pv_ptrs, plen = prefix_tile_ptrs(
        PK,
        PV,
        PIDX,
        PLEN,
        b,
        kvh,
        prefix_len,
        stride_pke,
        stride_pkh,
        stride_pkn,
        stride_pve,
        stride_pvh,
        stride_pvn,
        offs_n,
        offs_d,
        POOLED,
        HAS_LENGTHS,
    )
    acc, m_i, l_i = prefix_tiles(
        acc,
        m_i,
        l_i,
        q,
        pk_ptrs,
        pv_ptrs,
        stride_pkn,
        stride_pvn,
        plen,
        offs_m,
        offs_n,
        offs_d,
        qk_scale,
        seq_q,
        HEAD_DIM,
        BLOCK_D,
        BLOCK_N,
        DOT_PREC,
        WIDE,
    )

    out, lse = finish_rows(acc, m_i, l_i)
    store_rows(
        OUT + b64 * stride_ob + h64 * stride_oh + row_offsets(m0, BLOCK_M, stride_om, WIDE) + offs_d[None, :],
        out.to(OUT.dtype.element_ty),
        offs_m,
        seq_q,
        offs_d,
        HEAD_DIM,
        BLOCK_D,
    )
    tl.store(LSE + pid_bh.to(tl.int64) * seq_q + offs_m, lse.to(LSE.dtype.element_ty), mask=offs_m < seq_q)


def merge_prefix(
    q: torch.Tensor,
    prefix_k,
    prefix_v,
    prefix_index,
    prefix_lengths,
    out_seq: torch.Tensor,
    lse_seq: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    block_m: int | None = None,
):
    """(out [B, Hq, Sq, D], lse [B, Hq, Sq]) of attention over [prefix; sequence], from the sequence-only result
    out_seq [B, Hq, Sq, D] (any strides, last dim contiguous) and its natural-log lse_seq [B, Hq, Sq], written
    into out (any strides, last dim contiguous; out may be out_seq itself: each program reads its rows before
    writing them). prefix_index must already be range-mapped (out of range -> -1). block_m overrides the query
    tile height (the token-major entry prefixattn.merge_prefix runs a few query heads per program, not 128 rows)."""
    batch, heads_q, seq_q, head_dim = q.shape
    lse = torch.empty((batch, heads_q, seq_q), dtype=acc_dtype(q.dtype), device=q.device)
    if out.numel() == 0:
        return out, lse
    pre = PrefixArgs.build(prefix_k, prefix_v, prefix_index, prefix_lengths, q)
    if not pre.present:  # nothing to fold in
        out.copy_(out_seq)
        lse.copy_(lse_seq)
        return out, lse
    out_seq = unit_stride_last(out_seq)  # the vendor kernels' output: already dense unless a torch version changes it
    cfg = config_for("fwd", head_dim, q.dtype)
    # A short prefix gets a narrower key tile (the training table's 128 would be mostly masked at P = 16).
    block_n = min(cfg.block_n, max(16, triton.next_power_of_2(pre.length)))
    block_m = block_m or cfg.block_m
    grid = (triton.cdiv(seq_q, block_m), batch * heads_q)
    _prefix_merge_fwd_kernel[grid](
        q,
        pre.k,
        pre.v,
        pre.index,
        pre.lengths,
        out_seq,
        lse_seq,
        out,
        lse,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        *pre.stride_k,
        *pre.stride_v,
        out_seq.stride(0),
        out_seq.stride(1),
        out_seq.stride(2),
        lse_seq.stride(0),
        lse_seq.stride(1),
        lse_seq.stride(2),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        heads_q,
        heads_q // prefix_k.shape[-3],
        seq_q,
        pre.length,
        scale * LOG2E,
        HEAD_DIM=head_dim,
        BLOCK_D=head_dim_block(head_dim),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        POOLED=pre.pooled,
        HAS_LENGTHS=pre.has_lengths,
        ACC=tl_acc(q.dtype),
        DOT_PREC=dot_precision(q.dtype),
        WIDE=offsets_need_64bit(q, out_seq, out, pre.k, pre.v),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out, lse
