"""Triton forward kernel for prefix attention (training and prefill).

One program per (query tile, batch x query head). It runs a single online softmax over
  1. the prefix tiles, read in place from the prefix buffer (shared: no batch stride; pool: the entry chosen by
     prefix_index), masked only at the entry's valid length, then
  2. the sequence tiles: fully visible tiles without any mask, then (causal) the diagonal band with the
     bottom-right causal mask, or (non-causal) the ragged last tile. Tiles that no query of the tile can see
     are never visited.
Padding and bias cost nothing when absent (constexpr flags). GQA reads KV head h // G in place.
The output is written as [B, Sq, Hq, D] memory and returned as the [B, Hq, Sq, D] view.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import bshd_empty
from ._triton_common import (
    LOG2E,
    PrefixArgs,
    bias_mode,
    bias_strides,
    finish_rows,
    load_rows,
    offsets_need_64bit,
    padding_args,
    prefix_tile_ptrs,
    row_offsets,
    scalar_offset,
    sequence_tile_bounds,
    store_rows,
    tile_scores,
    tl_acc,
)
from ._triton_config import KernelConfig, acc_dtype, config_for, dot_precision, head_dim_block


@triton.jit
def _online_softmax_step(
    acc,
    m_i,
    l_i,
    q,
    k_ptrs,
    v_ptrs,
    cols,
    n_valid,
    offs_m,
    offs_d,
    qk_scale,
    seq_q,
    seq_k,
    bias_base,
    stride_bias_m,
    stride_bias_n,
    pad_base,
    stride_pad_n,
    SEQUENCE: tl.constexpr,
    BOUND: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """Fold one key tile (columns `cols`) into the running (acc, row max m_i, row sum l_i), all base 2."""
    k = load_rows(k_ptrs, cols, n_valid, offs_d, HEAD_DIM, BLOCK_D, BOUND)
    s = tile_scores(
        q,
        k,
        cols,
        n_valid,
        offs_m,
        qk_scale,
        seq_q,
        seq_k,
        bias_base,
        stride_bias_m,
        stride_bias_n,
        pad_base,
        stride_pad_n,
        SEQUENCE,
        BOUND,
        CAUSAL,
        HAS_BIAS,
        HAS_PAD,
        DOT_PREC,
    )
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row that has seen only masked keys keeps m = -inf; subtract 0 instead so exp2 gives 0, not NaN.
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = load_rows(v_ptrs, cols, n_valid, offs_d, HEAD_DIM, BLOCK_D, BOUND)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return acc, m_new, l_i


@triton.jit
def prefix_tiles(
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
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PREC: tl.constexpr,
    WIDE: tl.constexpr,
):
    """Fold the plen prefix keys (tile pointers at key 0) into the running state: full tiles without any mask,
    then the tail tile (plen not a multiple of BLOCK_N) masked at plen."""
    full_end = (plen // BLOCK_N) * BLOCK_N
    for start in range(0, full_end, BLOCK_N):
        acc, m_i, l_i = _online_softmax_step(
            acc,
            m_i,
            l_i,
            q,
            pk_ptrs + scalar_offset(start, stride_pkn, WIDE),
            pv_ptrs + scalar_offset(start, stride_pvn, WIDE),
            start + offs_n,
            plen,
            offs_m,
            offs_d,
            qk_scale,
            seq_q,
            0,
            pk_ptrs,
            0,
            0,
            pk_ptrs,
            0,
            False,
            False,
            False,
            False,
            False,
            HEAD_DIM,
            BLOCK_D,
            DOT_PREC,
        )
    for start in range(full_end, plen, BLOCK_N):
        acc, m_i, l_i = _online_softmax_step(
            acc,
            m_i,
            l_i,
            q,
            pk_ptrs + scalar_offset(start, stride_pkn, WIDE),
            pv_ptrs + scalar_offset(start, stride_pvn, WIDE),
            start + offs_n,
            plen,
            offs_m,
            offs_d,
            qk_scale,
            seq_q,
            0,
            pk_ptrs,
            0,
            0,
            pk_ptrs,
            0,
            False,
            True,
            False,
            False,
            False,
            HEAD_DIM,
            BLOCK_D,
            DOT_PREC,
        )
    return acc, m_i, l_i


@triton.jit
def _prefix_attention_fwd_kernel(
    Q,
    K,
    V,
    PK,
    PV,
    PIDX,
    PLEN,
    PAD,
    BIAS,
    OUT,
    LSE,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_pke,
    stride_pkh,
    stride_pkn,
    stride_pve,
    stride_pvh,
    stride_pvn,
    stride_padb,
    stride_padn,
    stride_bb,
    stride_bh,
    stride_bm,
    stride_bn,
    stride_ob,
    stride_oh,
    stride_om,
    heads_q,
    group,
    seq_q,
    seq_k,
    prefix_len,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_PREFIX: tl.constexpr,
    POOLED: tl.constexpr,
    HAS_LENGTHS: tl.constexpr,
    HAS_PAD: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACC: tl.constexpr,
    DOT_PREC: tl.constexpr,
    WIDE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    if CAUSAL:  # the last query tiles see the most keys: start them first
        pid_m = tl.num_programs(0) - 1 - pid_m
    pid_bh = tl.program_id(1)
    b = pid_bh // heads_q
    h = pid_bh % heads_q
    kvh = h // group
    b64 = b.to(tl.int64)

    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)

    q_ptrs = (
        Q + b64 * stride_qb + h.to(tl.int64) * stride_qh + row_offsets(m0, BLOCK_M, stride_qm, WIDE) + offs_d[None, :]
    )
    q = load_rows(q_ptrs, offs_m, seq_q, offs_d, HEAD_DIM, BLOCK_D, True)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
    l_i = tl.zeros([BLOCK_M], dtype=ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)

    # 1. prefix tiles: always visible; only the tail tile (valid length not a multiple of BLOCK_N) is masked.
    if HAS_PREFIX:
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

    # 2. sequence tiles: [0, full_end) are visible to every row of the tile; [full_end, hi) need masks.
    k_ptrs = K + b64 * stride_kb + kvh.to(tl.int64) * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :]
    v_ptrs = V + b64 * stride_vb + kvh.to(tl.int64) * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :]
    bias_base = BIAS + b64 * stride_bb + h.to(tl.int64) * stride_bh
    pad_base = PAD + b64 * stride_padb
    full_end, hi = sequence_tile_bounds(m0, seq_q, seq_k, BLOCK_M, BLOCK_N, CAUSAL)
    for start in range(0, full_end, BLOCK_N):
        acc, m_i, l_i = _online_softmax_step(
            acc,
            m_i,
            l_i,
            q,
            k_ptrs + scalar_offset(start, stride_kn, WIDE),
            v_ptrs + scalar_offset(start, stride_vn, WIDE),
            start + offs_n,
            seq_k,
            offs_m,
            offs_d,
            qk_scale,
            seq_q,
            seq_k,
            bias_base,
            stride_bm,
            stride_bn,
            pad_base,
            stride_padn,
            True,
            False,
            False,
            HAS_BIAS,
            HAS_PAD,
            HEAD_DIM,
            BLOCK_D,
            DOT_PREC,
        )
    for start in range(full_end, hi, BLOCK_N):
        acc, m_i, l_i = _online_softmax_step(
            acc,
            m_i,
            l_i,
            q,
            k_ptrs + scalar_offset(start, stride_kn, WIDE),
            v_ptrs + scalar_offset(start, stride_vn, WIDE),
            start + offs_n,
            seq_k,
            offs_m,
            offs_d,
            qk_scale,
            seq_q,
            seq_k,
            bias_base,
            stride_bm,
            stride_bn,
            pad_base,
            stride_padn,
            True,
            True,
            CAUSAL,
            HAS_BIAS,
            HAS_PAD,
            HEAD_DIM,
            BLOCK_D,
            DOT_PREC,
        )

    out, lse = finish_rows(acc, m_i, l_i)
    o_ptrs = (
        OUT + b64 * stride_ob + h.to(tl.int64) * stride_oh + row_offsets(m0, BLOCK_M, stride_om, WIDE) + offs_d[None, :]
    )
    store_rows(o_ptrs, out.to(OUT.dtype.element_ty), offs_m, seq_q, offs_d, HEAD_DIM, BLOCK_D)
    tl.store(LSE + pid_bh.to(tl.int64) * seq_q + offs_m, lse.to(LSE.dtype.element_ty), mask=offs_m < seq_q)


def configs_for(head_dim: int, dtype: torch.dtype) -> KernelConfig:
    """The forward launch configuration used for this head dim and dtype (for benchmark reports)."""
    return config_for("fwd", head_dim, dtype)


def forward(
    q,
    k,
    v,
    prefix_k,
    prefix_v,
    prefix_index,
    prefix_lengths,
    key_padding_mask,
    attn_bias,
    causal: bool,
    scale: float,
    *,
    config: KernelConfig | None = None,
):
    """(out [B, Hq, Sq, D] view of [B, Sq, Hq, D] memory, lse [B, Hq, Sq] natural log; fp64 lse for fp64 q)."""
    batch, heads_q, seq_q, head_dim = q.shape
    heads_kv, seq_k = k.shape[1], k.shape[2]
    out = bshd_empty(q)
    lse = torch.empty((batch, heads_q, seq_q), dtype=acc_dtype(q.dtype), device=q.device)
    if out.numel() == 0:
        return out, lse

    cfg = config or config_for("fwd", head_dim, q.dtype)
    pre = PrefixArgs.build(prefix_k, prefix_v, prefix_index, prefix_lengths, q)
    pad, stride_padb, stride_padn = padding_args(key_padding_mask, q)
    bias = attn_bias if attn_bias is not None else q
    sbb, sbh, sbm, sbn = bias_strides(attn_bias, (batch, heads_q, seq_q, seq_k))

    grid = (triton.cdiv(seq_q, cfg.block_m), batch * heads_q)
    _prefix_attention_fwd_kernel[grid](
        q,
        k,
        v,
        pre.k,
        pre.v,
        pre.index,
        pre.lengths,
        pad,
        bias,
        out,
        lse,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        *pre.stride_k,
        *pre.stride_v,
        stride_padb,
        stride_padn,
        sbb,
        sbh,
        sbm,
        sbn,
        out.stride(0),
        out.stride(1),
        out.stride(2),
        heads_q,
        heads_q // heads_kv,
        seq_q,
        seq_k,
        pre.length,
        scale * LOG2E,
        HEAD_DIM=head_dim,
        BLOCK_D=head_dim_block(head_dim),
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        CAUSAL=causal,
        HAS_PREFIX=pre.present,
        POOLED=pre.pooled,
        HAS_LENGTHS=pre.has_lengths,
        HAS_PAD=key_padding_mask is not None,
        HAS_BIAS=bias_mode(attn_bias, (batch, heads_q, seq_q, seq_k)),
        WIDE=offsets_need_64bit(q, k, v, out, pre.k, pre.v, key_padding_mask),
        ACC=tl_acc(q.dtype),
        DOT_PREC=dot_precision(q.dtype),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out, lse
