"""Triton backward kernels for prefix attention (training).

Four launches, all deterministic (no atomics) by default:
1. `_bwd_preprocess_kernel`: delta_i = rowsum(dO_i * O_i) - dlse_i (the gradient through the returned lse folds
   into delta, as in FA4) and lse2_i = lse_i * log2(e), with empty rows (lse = -inf) mapped to delta = 0 and
   lse2 = +inf so every probability recomputed for them is exactly 0.
2. `_bwd_dq_kernel`: per query tile, recompute P = exp2(s2 - lse2) over the prefix tiles then the visible
   sequence tiles (same tile schedule as the forward), dS = P * (dP - delta), dQ = scale * dS K.
3. `_bwd_dkdv_kernel`: per sequence-key tile, dK/dV in registers over the G query heads of its KV head and the
   query tiles that can see it (causal: from the diagonal on, masking only the band).
4. Prefix dK/dV: see _triton_prefix_bwd (chunked partials + fixed-order reduction, batch-bounded memory).
The prefix gradient is not fused into the dq pass: the dq programs would each need all P prefix rows of dK/dV
in registers or atomics to combine them, and the default backward must be deterministic with bounded extra memory.

deterministic=False (opt-in) drops launch 2: launches 3 and 4 already hold K (resp. the prefix block) and compute
dS for every (key, query) pair exactly once, so each also adds scale * dS K into a zeroed fp32 dq buffer with
relaxed atomics (5 GEMM-equivalents per tile pair instead of 7). Every dq row gets one add per sequence-key tile
that sees it and one per prefix block of its sequence's entry; keys it does not see are masked to p = 0.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _triton_prefix_bwd
from ._triton_common import (
    LOG2E,
    PrefixArgs,
    atomic_add_rows,
    bias_strides,
    load_rows,
    mask_sequence_scores,
    padding_args,
    prefix_tile_ptrs,
    sequence_tile_bounds,
    store_rows,
    tile_scores,
    tl_acc,
)
from ._triton_config import KernelConfig, acc_dtype, config_for, dot_precision, head_dim_block

_PREPROCESS_BLOCK_M = 64


@triton.jit
def _bwd_preprocess_kernel(
    OUT,
    DOUT,
    DLSE,
    LSE,
    DELTA,
    LSE2,
    stride_ob,
    stride_oh,
    stride_om,
    stride_dob,
    stride_doh,
    stride_dom,
    stride_dlb,
    stride_dlh,
    stride_dlm,
    stride_lb,
    stride_lh,
    stride_lm,
    heads_q,
    seq_q,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    HAS_DLSE: tl.constexpr,
    ACC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // heads_q).to(tl.int64)
    h = (pid_bh % heads_q).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = load_rows(
        OUT + b * stride_ob + h * stride_oh + rows[:, None] * stride_om + offs_d[None, :],
        rows,
        seq_q,
        offs_d,
        HEAD_DIM,
        BLOCK_D,
        True,
    ).to(ACC)
    do = load_rows(
        DOUT + b * stride_dob + h * stride_doh + rows[:, None] * stride_dom + offs_d[None, :],
        rows,
        seq_q,
        offs_d,
        HEAD_DIM,
        BLOCK_D,
        True,
    ).to(ACC)
    delta = tl.sum(o * do, 1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + b * stride_dlb + h * stride_dlh + rows * stride_dlm, mask=rows < seq_q, other=0.0).to(
            ACC
        )
    lse = tl.load(LSE + b * stride_lb + h * stride_lh + rows * stride_lm, mask=rows < seq_q, other=0.0).to(ACC)
    empty = lse == float("-inf")
    stat = pid_bh.to(tl.int64) * seq_q + rows
    tl.store(DELTA + stat, tl.where(empty, 0.0, delta), mask=rows < seq_q)
    tl.store(LSE2 + stat, tl.where(empty, float("inf"), lse * 1.4426950408889634), mask=rows < seq_q)


@triton.jit
def _dq_step(
    dq,
    q,
    do,
    lse2,
    delta,
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
    k = load_rows(k_ptrs, cols, n_valid, offs_d, HEAD_DIM, BLOCK_D, BOUND)
    v = load_rows(v_ptrs, cols, n_valid, offs_d, HEAD_DIM, BLOCK_D, BOUND)
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
    p = tl.exp2(s - lse2[:, None])
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
    return dq


@triton.jit
def _bwd_dq_kernel(
    Q,
    K,
    V,
    PK,
    PV,
    PIDX,
    PLEN,
    PAD,
    BIAS,
    DOUT,
    LSE2,
    DELTA,
    DQ,
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
    stride_dob,
    stride_doh,
    stride_dom,
    stride_dqb,
    stride_dqh,
    stride_dqm,
    heads_q,
    group,
    seq_q,
    seq_k,
    prefix_len,
    qk_scale,
    scale,
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
    SEQ_KEYS: tl.constexpr = True,
    ADD_DQ: tl.constexpr = False,
):
    # SEQ_KEYS=False, ADD_DQ=True (the "sdpa" backend): only the prefix keys' share of dQ, added to the dq that
    # the vendor kernel computed for the sequence keys.
    pid_m = tl.program_id(0)
    if CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m
    pid_bh = tl.program_id(1)
    b = pid_bh // heads_q
    h = pid_bh % heads_q
    kvh = (h // group).to(tl.int64)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)

    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = load_rows(
        Q + b64 * stride_qb + h64 * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
        offs_m,
        seq_q,
        offs_d,
        HEAD_DIM,
        BLOCK_D,
        True,
    )
    do = load_rows(
        DOUT + b64 * stride_dob + h64 * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :],
        offs_m,
        seq_q,
        offs_d,
        HEAD_DIM,
        BLOCK_D,
        True,
    )
    stat = pid_bh.to(tl.int64) * seq_q + offs_m
    lse2 = tl.load(LSE2 + stat, mask=offs_m < seq_q, other=float("inf"))
    delta = tl.load(DELTA + stat, mask=offs_m < seq_q, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)

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
        full_end = (plen // BLOCK_N) * BLOCK_N
        for start in range(0, full_end, BLOCK_N):
            dq = _dq_step(
                dq,
                q,
                do,
                lse2,
                delta,
                pk_ptrs + start * stride_pkn,
                pv_ptrs + start * stride_pvn,
                start + offs_n,
                plen,
                offs_m,
                offs_d,
                qk_scale,
                seq_q,
                seq_k,
                BIAS,
                0,
                0,
                PAD,
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
            dq = _dq_step(
                dq,
                q,
                do,
                lse2,
                delta,
                pk_ptrs + start * stride_pkn,
                pv_ptrs + start * stride_pvn,
                start + offs_n,
                plen,
                offs_m,
                offs_d,
                qk_scale,
                seq_q,
                seq_k,
                BIAS,
                0,
                0,
                PAD,
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

    if SEQ_KEYS:
        k_ptrs = K + b64 * stride_kb + kvh * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :]
        v_ptrs = V + b64 * stride_vb + kvh * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :]
        bias_base = BIAS + b64 * stride_bb + h64 * stride_bh
        pad_base = PAD + b64 * stride_padb
        full_end, hi = sequence_tile_bounds(m0, seq_q, seq_k, BLOCK_M, BLOCK_N, CAUSAL)
        for start in range(0, full_end, BLOCK_N):
            dq = _dq_step(
                dq,
                q,
                do,
                lse2,
                delta,
                k_ptrs + start * stride_kn,
                v_ptrs + start * stride_vn,
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
            dq = _dq_step(
                dq,
                q,
                do,
                lse2,
                delta,
                k_ptrs + start * stride_kn,
                v_ptrs + start * stride_vn,
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

    dq = dq * scale
    dq_ptrs = DQ + b64 * stride_dqb + h64 * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :]
    if ADD_DQ:
        dq += load_rows(dq_ptrs, offs_m, seq_q, offs_d, HEAD_DIM, BLOCK_D, True).to(ACC)
    store_rows(dq_ptrs, dq.to(DQ.dtype.element_ty), offs_m, seq_q, offs_d, HEAD_DIM, BLOCK_D)


@triton.jit
def _dkdv_step(
    dk,
    dv,
    k,
    v,
    q_ptrs,
    do_ptrs,
    stat_ptrs,
    delta_ptrs,
    dq_ptrs,
    keep,
    rows,
    offs_n,
    offs_d,
    qk_scale,
    scale,
    seq_q,
    seq_k,
    bias_base,
    stride_bias_m,
    stride_bias_n,
    CAUSAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr,
    FUSE_DQ: tl.constexpr,
):
    """Add one query tile's contribution to the resident key tile's dK/dV (computed transposed: [keys, queries]).

    FUSE_DQ (deterministic=False): also add this key tile's share of the query tile's dQ, scale * dS K, to the
    fp32 dq buffer with atomics (one add per element per key tile, in a run-dependent order).
    """
    q = load_rows(q_ptrs, rows, seq_q, offs_d, HEAD_DIM, BLOCK_D, True)
    do = load_rows(do_ptrs, rows, seq_q, offs_d, HEAD_DIM, BLOCK_D, True)
    lse2 = tl.load(stat_ptrs, mask=rows < seq_q, other=float("inf"))
    delta = tl.load(delta_ptrs, mask=rows < seq_q, other=0.0)
    s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale
    # Keys past seq_k and padded keys are not masked here: their rows of dK/dV are discarded or zeroed at the end.
    s_t = mask_sequence_scores(
        s_t,
        rows[None, :],
        offs_n[:, None],
        seq_q,
        seq_k,
        bias_base,
        stride_bias_m,
        stride_bias_n,
        bias_base,
        0,
        CAUSAL,
        False,
        HAS_BIAS,
        False,
    )
    p_t = tl.exp2(s_t - lse2[None, :])
    if FUSE_DQ:  # ...but dQ sums over keys, so there they must contribute exactly 0 (keep: real, unpadded keys)
        p_t = tl.where(keep[:, None], p_t, 0.0)
    dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PREC)
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
    ds_t = p_t * (dp_t - delta[None, :])
    dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PREC)
    if FUSE_DQ:
        dq = tl.dot(tl.trans(ds_t.to(k.dtype)), k, input_precision=DOT_PREC) * scale
        atomic_add_rows(dq_ptrs, dq, rows, seq_q, offs_d, HEAD_DIM)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(
    Q,
    K,
    V,
    PAD,
    BIAS,
    DOUT,
    LSE2,
    DELTA,
    DK,
    DV,
    DQ,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_padb,
    stride_padn,
    stride_bb,
    stride_bh,
    stride_bm,
    stride_bn,
    stride_dob,
    stride_doh,
    stride_dom,
    stride_dkb,
    stride_dkh,
    stride_dkn,
    stride_dvb,
    stride_dvh,
    stride_dvn,
    stride_dqb,
    stride_dqh,
    stride_dqm,
    heads_q,
    heads_kv,
    group,
    seq_q,
    seq_k,
    qk_scale,
    scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_PAD: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACC: tl.constexpr,
    DOT_PREC: tl.constexpr,
    FUSE_DQ: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b64 = (pid_bh // heads_kv).to(tl.int64)
    kvh = pid_bh % heads_kv

    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    k = load_rows(
        K + b64 * stride_kb + kvh.to(tl.int64) * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :],
        offs_n,
        seq_k,
        offs_d,
        HEAD_DIM,
        BLOCK_D,
        True,
    )
    v = load_rows(
        V + b64 * stride_vb + kvh.to(tl.int64) * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :],
        offs_n,
        seq_k,
        offs_d,
        HEAD_DIM,
        BLOCK_D,
        True,
    )
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    dq_keep = offs_n < seq_k
    if FUSE_DQ and HAS_PAD:
        dq_keep = dq_keep & (tl.load(PAD + b64 * stride_padb + offs_n * stride_padn, mask=offs_n < seq_k, other=0) != 0)

    if CAUSAL:
        # Query i sees key j iff i >= j - (seq_k - seq_q). Tiles before m_lo see no key of this tile; tiles from
        # m_full on see all of them; [m_lo, m_full) is the band that needs the causal mask.
        shift = seq_k - seq_q
        m_lo = (tl.maximum(n0 - shift, 0) // BLOCK_M) * BLOCK_M
        m_full = tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 - shift, 0), BLOCK_M) * BLOCK_M
        m_full = tl.minimum(tl.maximum(m_full, m_lo), tl.cdiv(seq_q, BLOCK_M) * BLOCK_M)
    else:
        m_lo = 0
        m_full = 0
    for g in range(0, group):
        h64 = (kvh * group + g).to(tl.int64)
        q_ptrs = Q + b64 * stride_qb + h64 * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :]
        do_ptrs = DOUT + b64 * stride_dob + h64 * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :]
        dq_ptrs = DQ + b64 * stride_dqb + h64 * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :]
        stat_base = (b64 * heads_q + h64) * seq_q
        bias_base = BIAS + b64 * stride_bb + h64 * stride_bh
        for start in range(m_lo, m_full, BLOCK_M):
            dk, dv = _dkdv_step(
                dk,
                dv,
                k,
                v,
                q_ptrs + start * stride_qm,
                do_ptrs + start * stride_dom,
                LSE2 + stat_base + start + offs_m,
                DELTA + stat_base + start + offs_m,
                dq_ptrs + start * stride_dqm,
                dq_keep,
                start + offs_m,
                offs_n,
                offs_d,
                qk_scale,
                scale,
                seq_q,
                seq_k,
                bias_base,
                stride_bm,
                stride_bn,
                True,
                HAS_BIAS,
                HEAD_DIM,
                BLOCK_D,
                DOT_PREC,
                FUSE_DQ,
            )
        for start in range(m_full, seq_q, BLOCK_M):
            dk, dv = _dkdv_step(
                dk,
                dv,
                k,
                v,
                q_ptrs + start * stride_qm,
                do_ptrs + start * stride_dom,
                LSE2 + stat_base + start + offs_m,
                DELTA + stat_base + start + offs_m,
                dq_ptrs + start * stride_dqm,
                dq_keep,
                start + offs_m,
                offs_n,
                offs_d,
                qk_scale,
                scale,
                seq_q,
                seq_k,
                bias_base,
                stride_bm,
                stride_bn,
                False,
                HAS_BIAS,
                HEAD_DIM,
                BLOCK_D,
                DOT_PREC,
                FUSE_DQ,
            )

    dk = dk * scale
    if HAS_PAD:  # a padded key is invisible to every query: its gradient is exactly 0
        keep = tl.load(PAD + b64 * stride_padb + offs_n * stride_padn, mask=offs_n < seq_k, other=0)
        dk = tl.where(keep[:, None] != 0, dk, 0.0)
        dv = tl.where(keep[:, None] != 0, dv, 0.0)
    store_rows(
        DK + b64 * stride_dkb + kvh.to(tl.int64) * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :],
        dk.to(DK.dtype.element_ty),
        offs_n,
        seq_k,
        offs_d,
        HEAD_DIM,
        BLOCK_D,
    )
    store_rows(
        DV + b64 * stride_dvb + kvh.to(tl.int64) * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :],
        dv.to(DV.dtype.element_ty),
        offs_n,
        seq_k,
        offs_d,
        HEAD_DIM,
        BLOCK_D,
    )


def configs_for(head_dim: int, dtype: torch.dtype) -> dict[str, KernelConfig]:
    """The backward launch configurations used for this head dim and dtype (for benchmark reports)."""
    return {name: config_for(name, head_dim, dtype) for name in ("bwd_dq", "bwd_dkdv", "bwd_dkdv_fused", "bwd_prefix")}


def preprocess(dout, dlse, out, lse):
    """Launch 1: (delta, lse2), [B, Hq, Sq] in the accumulation dtype (see the module docstring)."""
    batch, heads_q, seq_q, head_dim = out.shape
    delta = torch.empty((batch, heads_q, seq_q), dtype=acc_dtype(out.dtype), device=out.device)
    lse2 = torch.empty_like(delta)
    dlse_t = dlse if dlse is not None else lse
    if delta.numel() > 0:
        _bwd_preprocess_kernel[(triton.cdiv(seq_q, _PREPROCESS_BLOCK_M), batch * heads_q)](
            out,
            dout,
            dlse_t,
            lse,
            delta,
            lse2,
            out.stride(0),
            out.stride(1),
            out.stride(2),
            dout.stride(0),
            dout.stride(1),
            dout.stride(2),
            dlse_t.stride(0),
            dlse_t.stride(1),
            dlse_t.stride(2),
            lse.stride(0),
            lse.stride(1),
            lse.stride(2),
            heads_q,
            seq_q,
            HEAD_DIM=head_dim,
            BLOCK_D=head_dim_block(head_dim),
            BLOCK_M=_PREPROCESS_BLOCK_M,
            HAS_DLSE=dlse is not None,
            ACC=tl_acc(out.dtype),
            num_warps=4,
        )
    return delta, lse2


def _launch_dq(
    q,
    k,
    v,
    pre: PrefixArgs,
    key_padding_mask,
    attn_bias,
    dout,
    lse2,
    delta,
    dq,
    causal: bool,
    scale: float,
    cfg: KernelConfig,
    *,
    add: bool = False,
):
    """Launch 2: dQ over the prefix keys and (k, v given) the sequence keys; add: dq += instead of dq =."""
    batch, heads_q, seq_q, head_dim = q.shape
    seq_keys = k is not None
    if not seq_keys:  # prefix keys only: K/V are never read
        k = v = pre.k[..., :0, :]
    heads_kv, seq_k = k.shape[-3], k.shape[-2]
    pad, stride_padb, stride_padn = padding_args(key_padding_mask, q)
    bias = attn_bias if attn_bias is not None else q
    sbb, sbh, sbm, sbn = bias_strides(attn_bias, (batch, heads_q, seq_q, seq_k))
    _bwd_dq_kernel[(triton.cdiv(seq_q, cfg.block_m), batch * heads_q)](
        q,
        k,
        v,
        pre.k,
        pre.v,
        pre.index,
        pre.lengths,
        pad,
        bias,
        dout,
        lse2,
        delta,
        dq,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        *((k.stride(0), k.stride(1), k.stride(2)) if seq_keys else (0, 0, 0)),
        *((v.stride(0), v.stride(1), v.stride(2)) if seq_keys else (0, 0, 0)),
        *pre.stride_k,
        *pre.stride_v,
        stride_padb,
        stride_padn,
        sbb,
        sbh,
        sbm,
        sbn,
        dout.stride(0),
        dout.stride(1),
        dout.stride(2),
        dq.stride(0),
        dq.stride(1),
        dq.stride(2),
        heads_q,
        heads_q // heads_kv,
        seq_q,
        seq_k,
        pre.length,
        scale * LOG2E,
        scale,
        HEAD_DIM=head_dim,
        BLOCK_D=head_dim_block(head_dim),
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        CAUSAL=causal and seq_keys,
        HAS_PREFIX=pre.present,
        POOLED=pre.pooled,
        HAS_LENGTHS=pre.has_lengths,
        HAS_PAD=key_padding_mask is not None,
        HAS_BIAS=attn_bias is not None,
        ACC=tl_acc(q.dtype),
        DOT_PREC=dot_precision(q.dtype),
        SEQ_KEYS=seq_keys,
        ADD_DQ=add,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )


def prefix_backward(dout, dlse, q, prefix_k, prefix_v, prefix_index, prefix_lengths, out, lse, dq, scale: float):
    """The prefix keys' part of the backward, for a dq that already holds the sequence keys' share: adds their
    share of dQ into dq (in place) and returns (dprefix_k, dprefix_v). out and lse are those of the whole
    attention ([prefix; sequence]); prefix_index must already be range-mapped. Deterministic."""
    pre = PrefixArgs.build(prefix_k, prefix_v, prefix_index, prefix_lengths, q)
    if not pre.present or q.numel() == 0:
        return torch.zeros_like(prefix_k), torch.zeros_like(prefix_v)
    delta, lse2 = preprocess(dout, dlse, out, lse)
    head_dim = q.shape[-1]
    _launch_dq(
        q,
        None,
        None,
        pre,
        None,
        None,
        dout,
        lse2,
        delta,
        dq,
        False,
        scale,
        config_for("bwd_dq", head_dim, q.dtype),
        add=True,
    )
    return _triton_prefix_bwd.prefix_grads(
        q, dout, lse2, delta, pre, scale, config_for("bwd_prefix", head_dim, q.dtype)
    )


def backward(
    dout,
    dlse,
    q,
    k,
    v,
    prefix_k,
    prefix_v,
    prefix_index,
    prefix_lengths,
    key_padding_mask,
    attn_bias,
    out,
    lse,
    causal: bool,
    scale: float,
    *,
    configs: dict[str, KernelConfig] | None = None,
    prefix_chunks: int | None = None,
    deterministic: bool = True,
):
    """(dq, dk, dv, dprefix_k, dprefix_v); gradients have the layouts of their inputs (torch.empty_like);
    dprefix_* are None without a prefix. prefix_chunks overrides the prefix-gradient chunk count (tests).

    deterministic=False: no dQ kernel; the sequence and prefix dK/dV kernels add dS K into a zeroed fp32 dq
    buffer with atomics (run-dependent summation order), converted to q's dtype at the end."""
    batch, heads_q, seq_q, head_dim = q.shape
    heads_kv, seq_k = k.shape[1], k.shape[2]
    group = heads_q // heads_kv
    cfgs = configs_for(head_dim, q.dtype)
    cfgs.update(configs or {})
    block_d = head_dim_block(head_dim)
    acc = tl_acc(q.dtype)
    prec = dot_precision(q.dtype)
    qk_scale = scale * LOG2E

    pre = PrefixArgs.build(prefix_k, prefix_v, prefix_index, prefix_lengths, q)
    fuse_dq = not deterministic
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    if batch == 0 or heads_q == 0:  # no query: every gradient is zero (k, v keep their Hkv heads when Hq = 0)
        dpk, dpv = (torch.zeros_like(prefix_k), torch.zeros_like(prefix_v)) if prefix_k is not None else (None, None)
        return dq, torch.zeros_like(k), torch.zeros_like(v), dpk, dpv

    # 1. delta and base-2 lse, [B, Hq, Sq] in the accumulation dtype.
    delta, lse2 = preprocess(dout, dlse, out, lse)

    pad, stride_padb, stride_padn = padding_args(key_padding_mask, q)
    bias = attn_bias if attn_bias is not None else q
    sbb, sbh, sbm, sbn = bias_strides(attn_bias, (batch, heads_q, seq_q, seq_k))

    # 2. dQ over prefix and sequence keys (or, fused: a zeroed accumulator, same strides as q, for the atomics).
    dq_acc = torch.zeros_like(q, dtype=acc_dtype(q.dtype)) if fuse_dq else dq
    if seq_q > 0 and not fuse_dq:
        _launch_dq(q, k, v, pre, key_padding_mask, attn_bias, dout, lse2, delta, dq, causal, scale, cfgs["bwd_dq"])

    # 3. dK, dV of the sequence keys (fused: and their share of dQ).
    cfg = cfgs["bwd_dkdv_fused" if fuse_dq else "bwd_dkdv"]
    if seq_k > 0:
        _bwd_dkdv_kernel[(triton.cdiv(seq_k, cfg.block_n), batch * heads_kv)](
            q,
            k,
            v,
            pad,
            bias,
            dout,
            lse2,
            delta,
            dk,
            dv,
            dq_acc,
            q.stride(0),
            q.stride(1),
            q.stride(2),
            k.stride(0),
            k.stride(1),
            k.stride(2),
            v.stride(0),
            v.stride(1),
            v.stride(2),
            stride_padb,
            stride_padn,
            sbb,
            sbh,
            sbm,
            sbn,
            dout.stride(0),
            dout.stride(1),
            dout.stride(2),
            dk.stride(0),
            dk.stride(1),
            dk.stride(2),
            dv.stride(0),
            dv.stride(1),
            dv.stride(2),
            dq_acc.stride(0),
            dq_acc.stride(1),
            dq_acc.stride(2),
            heads_q,
            heads_kv,
            group,
            seq_q,
            seq_k,
            qk_scale,
            scale,
            HEAD_DIM=head_dim,
            BLOCK_D=block_d,
            BLOCK_M=cfg.block_m,
            BLOCK_N=cfg.block_n,
            CAUSAL=causal,
            HAS_PAD=key_padding_mask is not None,
            HAS_BIAS=attn_bias is not None,
            ACC=acc,
            DOT_PREC=prec,
            FUSE_DQ=fuse_dq,
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )

    # 4. dK, dV of the prefix (fused: and the prefix keys' share of dQ).
    dpk = dpv = None
    if prefix_k is not None:
        if pre.present:
            dpk, dpv = _triton_prefix_bwd.prefix_grads(
                q,
                dout,
                lse2,
                delta,
                pre,
                scale,
                cfgs["bwd_prefix"],
                chunks=prefix_chunks,
                dq_acc=dq_acc if fuse_dq else None,
            )
        else:  # P = 0: an empty gradient of the right shape
            dpk, dpv = torch.zeros_like(prefix_k), torch.zeros_like(prefix_v)
    if fuse_dq:
        dq.copy_(dq_acc)  # one elementwise pass (same strides); rows nothing reached stay exactly 0
        del dq_acc
    return dq, dk, dv, dpk, dpv
