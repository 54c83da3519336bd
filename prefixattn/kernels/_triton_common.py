"""Pieces shared by the Triton training kernels: tile loads, score masking, prefix lookup, host-side argument packing.

Conventions used by every kernel:
- scores are kept in base 2: s2 = (q.k) * scale * log2(e) (+ bias * log2(e)), so softmax uses exp2;
- the log-sum-exp handed between kernels is natural log at the API and base 2 inside the backward;
- masked scores are -inf (never a large finite value); the forward subtracts a finite row maximum (0 for a row
  that has seen only masked keys) and the backward a base-2 lse set to +inf for empty rows, so rows with
  nothing to attend give exact zeros instead of NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import triton_interpreting
from ._layout import unit_stride_last

if triton_interpreting():
    from . import _triton_interpreter

    _triton_interpreter.apply()

LOG2E = 1.4426950408889634  # log2(e); inside @triton.jit code the literal is written out (no globals there)


def tl_acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


@triton.jit
def row_offsets(row0, BLOCK: tl.constexpr, stride, WIDE: tl.constexpr):
    """[BLOCK, 1] element offsets of rows row0 .. row0 + BLOCK - 1 along a dimension of this stride. WIDE: the
    tile start is a 64-bit scalar (row0 * stride may pass 2^31; in-tile offsets stay 32-bit). Otherwise all
    32-bit, as the launcher chooses when every offset of every tensor fits (offsets_need_64bit)."""
    if WIDE:
        return tl.cast(row0, tl.int64) * stride + tl.arange(0, BLOCK)[:, None] * stride
    else:
        return (row0 + tl.arange(0, BLOCK))[:, None] * stride


@triton.jit
def scalar_offset(i, stride, WIDE: tl.constexpr):
    """i * stride, in 64 bits when WIDE (see row_offsets)."""
    if WIDE:
        return tl.cast(i, tl.int64) * stride
    else:
        return i * stride


@triton.jit
def load_rows(ptrs, rows, n_rows, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASK_ROWS: tl.constexpr):
    """Load a [rows, BLOCK_D] tile; rows >= n_rows (when MASK_ROWS) and the head-dim padding read as 0."""
    if MASK_ROWS:
        if HEAD_DIM == BLOCK_D:
            x = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
        else:
            x = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    else:
        if HEAD_DIM == BLOCK_D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    return x


@triton.jit
def store_rows(ptrs, x, rows, n_rows, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    if HEAD_DIM == BLOCK_D:
        tl.store(ptrs, x, mask=rows[:, None] < n_rows)
    else:
        tl.store(ptrs, x, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def atomic_add_rows(ptrs, x, rows, n_rows, offs_d, HEAD_DIM: tl.constexpr):
    """Atomically add a [rows, BLOCK_D] fp32 tile (rows < n_rows, the real head dim). Relaxed: only the final
    sums matter, no ordering with other memory, so no fences."""
    tl.atomic_add(ptrs, x, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM), sem="relaxed")


@triton.jit
def mask_sequence_scores(
    s,
    rows_q,
    cols_k,
    seq_q,
    seq_k,
    bias_base,
    stride_bias_q,
    stride_bias_k,
    pad_base,
    stride_pad_k,
    CAUSAL: tl.constexpr,
    BOUND: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_PAD: tl.constexpr,
):
    """Base-2 scores of sequence keys with bias and masks applied (masked entries become -inf).

    rows_q / cols_k are query / key indices already broadcast to the tile's orientation ([M, 1] and [1, N] for
    a [queries, keys] tile, the transpose for a [keys, queries] tile). CAUSAL: bottom-right causal mask;
    BOUND: keys >= seq_k. Padding is per key (True = real token).
    """
    if HAS_BIAS:
        if HAS_BIAS == 2:  # 64-bit offsets: Sq * Sk passes 2^31 at ~46K tokens (a dense sliding-window bias)
            bias_off = rows_q.to(tl.int64) * stride_bias_q + cols_k.to(tl.int64) * stride_bias_k
        else:
            bias_off = rows_q * stride_bias_q + cols_k * stride_bias_k
        bias = tl.load(
            bias_base + bias_off,
            mask=(rows_q < seq_q) & (cols_k < seq_k),
            other=0.0,
        )
        s += bias.to(s.dtype) * 1.4426950408889634
    if CAUSAL:
        s = tl.where(cols_k <= rows_q + (seq_k - seq_q), s, float("-inf"))
    if BOUND:
        s = tl.where(cols_k < seq_k, s, float("-inf"))
    if HAS_PAD:
        keep = tl.load(pad_base + cols_k * stride_pad_k, mask=cols_k < seq_k, other=0)
        s = tl.where(keep != 0, s, float("-inf"))
    return s


@triton.jit
def tile_scores(
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
    SEQUENCE: tl.constexpr,
    BOUND: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_PAD: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """Base-2 scores [queries, keys] of q against the key tile k (columns `cols`), masked: sequence keys with
    bias / causal / bound / padding (mask_sequence_scores), prefix keys only at their valid length n_valid."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    if SEQUENCE:
        s = mask_sequence_scores(
            s,
            offs_m[:, None],
            cols[None, :],
            seq_q,
            seq_k,
            bias_base,
            stride_bias_m,
            stride_bias_n,
            pad_base,
            stride_pad_n,
            CAUSAL,
            BOUND,
            HAS_BIAS,
            HAS_PAD,
        )
    elif BOUND:
        s = tl.where(cols[None, :] < n_valid, s, float("-inf"))
    return s


@triton.jit
def prefix_entry(PIDX, PLEN, b, P, POOLED: tl.constexpr, HAS_LENGTHS: tl.constexpr):
    """(pool entry, valid prefix length) for sequence b; length 0 when it has no prefix (index -1)."""
    if POOLED:
        e = tl.load(PIDX + b).to(tl.int32)
        if HAS_LENGTHS:
            plen = tl.load(PLEN + tl.maximum(e, 0)).to(tl.int32)
        else:
            plen = P
        plen = tl.where(e >= 0, plen, 0)
        e = tl.maximum(e, 0)
    else:
        e = 0
        if HAS_LENGTHS:
            plen = tl.load(PLEN).to(tl.int32)
        else:
            plen = P
    return e, plen


@triton.jit
def prefix_tile_ptrs(
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
    POOLED: tl.constexpr,
    HAS_LENGTHS: tl.constexpr,
):
    """(K tile pointers, V tile pointers at prefix key 0, valid length) of sequence b's entry, KV head kvh."""
    e, plen = prefix_entry(PIDX, PLEN, b, prefix_len, POOLED, HAS_LENGTHS)
    e64 = tl.cast(e, tl.int64)
    kvh64 = kvh.to(tl.int64)
    pk_ptrs = PK + e64 * stride_pke + kvh64 * stride_pkh + offs_n[:, None] * stride_pkn + offs_d[None, :]
    pv_ptrs = PV + e64 * stride_pve + kvh64 * stride_pvh + offs_n[:, None] * stride_pvn + offs_d[None, :]
    return pk_ptrs, pv_ptrs, plen


@triton.jit
def sequence_tile_bounds(m0, seq_q, seq_k, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """(full_end, hi) for the query tile starting at row m0: sequence key tiles [0, full_end) are visible to
    every row of it (no mask), [full_end, hi) need the causal mask or the ragged-end bound, and keys past hi are
    visible to none. Causal is bottom-right: query i sees key j <= i + (seq_k - seq_q), seq_q <= seq_k."""
    if CAUSAL:
        hi = tl.minimum(seq_k, m0 + BLOCK_M + seq_k - seq_q)
        full_end = ((m0 + seq_k - seq_q + 1) // BLOCK_N) * BLOCK_N
    else:
        hi = seq_k
        full_end = (seq_k // BLOCK_N) * BLOCK_N
    return full_end, hi


@triton.jit
def finish_rows(acc, m_i, l_i):
    """(out, natural-log lse) from an online-softmax state (base-2 row max m_i, row sum l_i); rows that saw
    nothing to attend (l = 0) give out 0 and lse -inf, never NaN."""
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    return out, lse


@dataclass
class PrefixArgs:
    """Kernel-side view of the prefix: pointers (dummies when absent), strides and flags.

    The shared form [Hkv, P, D] is entry 0 of a pool whose entry stride is 0, so both forms use one code path
    and the shared prefix is read in place (no per-sequence copy, no batch stride).
    """

    k: torch.Tensor
    v: torch.Tensor
    index: torch.Tensor
    lengths: torch.Tensor
    stride_k: tuple  # (entry, head, position)
    stride_v: tuple
    length: int  # P
    pool_size: int  # N (1 for the shared form, 0 without a prefix)
    present: bool
    pooled: bool
    has_lengths: bool

    @staticmethod
    def build(prefix_k, prefix_v, prefix_index, prefix_lengths, dummy: torch.Tensor) -> PrefixArgs:
        if prefix_k is None or prefix_k.shape[-2] == 0:
            return PrefixArgs(dummy, dummy, dummy, dummy, (0, 0, 0), (0, 0, 0), 0, 0, False, False, False)
        pooled = prefix_k.dim() == 4

        def strides(t):
            return (t.stride(0), t.stride(1), t.stride(2)) if pooled else (0, t.stride(0), t.stride(1))

        return PrefixArgs(
            prefix_k,
            prefix_v,
            unit_stride_last(prefix_index) if pooled else dummy,  # the kernels read index vectors densely
            unit_stride_last(prefix_lengths) if prefix_lengths is not None else dummy,
            strides(prefix_k),
            strides(prefix_v),
            prefix_k.shape[-2],
            prefix_k.shape[0] if pooled else 1,
            True,
            pooled,
            prefix_lengths is not None,
        )


INT32_LIMIT = 2**31


def offsets_need_64bit(*tensors) -> bool:
    """Whether an element offset into one of these tensors can pass the int32 range: its largest offset is
    sum((size - 1) * |stride|). Kernels get WIDE=True then (64-bit tile starts); the common case keeps the
    32-bit arithmetic, and so its registers. Pass attn_bias expanded to [B, Hq, Sq, Sk] (bias_mode does)."""
    for t in tensors:
        if t is not None and t.numel() and sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride())) >= INT32_LIMIT:
            return True
    return False


def bias_mode(attn_bias: torch.Tensor | None, shape) -> int:
    """HAS_BIAS for the kernels: 0 without a bias, 2 when its offsets need 64 bits (Sq * Sk >= 2^31), else 1."""
    if attn_bias is None:
        return 0
    return 2 if offsets_need_64bit(attn_bias.expand(*shape)) else 1


def bias_strides(attn_bias: torch.Tensor | None, shape) -> tuple:
    """Strides of attn_bias broadcast to [B, Hq, Sq, Sk] (0 on broadcast dims); zeros when absent."""
    if attn_bias is None:
        return (0, 0, 0, 0)
    return attn_bias.expand(*shape).stride()


def padding_args(key_padding_mask: torch.Tensor | None, dummy: torch.Tensor):
    """(uint8 view of the [B, Sk] mask, stride_b, stride_k): a zero-copy reinterpretation of the bools."""
    if key_padding_mask is None:
        return dummy, 0, 0
    # Key offsets into the mask are 32-bit (key index * stride < Sk): give it a unit key stride (a copy only if not).
    mask = unit_stride_last(key_padding_mask).view(torch.uint8)
    return mask, mask.stride(0), mask.stride(1)
