"""Triton kernels of the short-query (decode) path. Launch logic and path choice live in triton_decode.py.

Three pieces:
- _split_program: one program per (sequence b, KV head, M tile, split). The G = Hq/Hkv query heads of
  the KV head times the Sq query rows form the M dimension of tl.dot (GQA packing), so every K/V tile
  is loaded once for the whole group. The program walks its share of the key blocks: in the fused path
  the prefix blocks come first (the prefix is "the first key range"), then the sequence blocks, which
  are contiguous ([B, Hkv, Sk, D] with any strides) or paged ([pages, page_size, Hkv, D] + block table).
- _cascade_program: the prefix once per KV head for all sequences: every query row of a group of
  sequences (all of them for a shared prefix, those using one pool entry otherwise) faces the prefix
  in one tensor-core tile loop. It writes slot 0 of the partial workspace.
- _merge_kernel: log-sum-exp merge of the partial (o, lse) slots of each query row, in fp32.

Internally scores and lse are base 2 (exp2); the API's lse is natural log (converted on the final write).
A row with nothing to attend gets o = 0 and lse = -inf at every stage; the merge never produces NaN.

Out-of-range data never causes an out-of-bounds access: sequence lengths are clamped to the table,
page ids outside [0, num_pages) mask their keys, pool indices outside [0, N) mean "no prefix", and
prefix lengths are clamped to [0, P].
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import triton_interpreting

if triton_interpreting():
    from . import _triton_interpreter

    _triton_interpreter.apply()

LN2 = tl.constexpr(0.6931471805599453)  # jit code may only read constexpr globals


@triton.jit
def _attend(q, k, v, mask, acc, m_i, l_i, qk_scale, DOT_PREC: tl.constexpr):
    """One online-softmax step over a key tile. q [M, D], k/v [N, D], mask [M, N] (False = masked)."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    s = tl.where(mask, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # Rows with no visible key so far keep m = -inf; shift by 0 then so exp2 gives 0, never NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return acc, m_new, l_i


@triton.jit
def _store_partial(OPART, LPART, row_lin, slot, acc, m_i, l_i, row_ok, d, dmask, NSLOTS, HEAD_DIM: tl.constexpr):
    """Normalised partial output and its base-2 lse into workspace slot `slot` of each row."""
    has = l_i > 0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    lse2 = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    cell = row_lin * NSLOTS + slot
    tl.store(OPART + cell[:, None] * HEAD_DIM + d[None, :], o, mask=row_ok[:, None] & dmask[None, :])
    tl.store(LPART + cell, lse2, mask=row_ok)


@triton.jit
def _prefix_length(PLEN, entry, PLEN_MAX, HAS_PLEN: tl.constexpr):
    if HAS_PLEN:
        n = tl.load(PLEN + entry).to(tl.int32)
        n = tl.minimum(tl.maximum(n, 0), PLEN_MAX)
    else:
        n = PLEN_MAX
    return n


@triton.jit
def _split_program(
    pid,
    Q,
    K,
    V,
    PK,
    PV,
    PIDX,
    PLEN,
    KPM,
    BT,
    SEQLEN,
    OUT,
    LSE,
    OPART,
    LPART,
    stride_qb,
    stride_qh,
    stride_qs,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_vb,
    stride_vh,
    stride_vs,
    stride_pkn,
    stride_pkh,
    stride_pks,
    stride_pvn,
    stride_pvh,
    stride_pvs,
    stride_mb,
    stride_ms,
    stride_btb,
    stride_ob,
    stride_oh,
    stride_os,
    stride_lb,
    stride_lh,
    HKV,
    SEQ_K,
    PLEN_MAX,
    POOL,
    NUM_PAGES,
    PAGE_SIZE,
    num_splits,
    m_tiles,
    qk_scale,
    G: tl.constexpr,
    SQ: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NSLOTS,
    SLOT0: tl.constexpr,
    PAGED: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_KPM: tl.constexpr,
    PREFIX: tl.constexpr,
    FUSED_PREFIX: tl.constexpr,
    HAS_PLEN: tl.constexpr,
    WRITE_FINAL: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    # pid -> (b, hkv, m tile, split); splits of one (b, hkv) are neighbours.
    split = pid % num_splits
    rest = pid // num_splits
    mt = rest % m_tiles
    rest = rest // m_tiles
    hkv = rest % HKV
    b = rest // HKV
    b64 = b.to(tl.int64)

    rows = mt * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < G * SQ
    g = rows // SQ
    qi = rows % SQ
    h = hkv * G + g
    d = tl.arange(0, BLOCK_D)
    dmask = d < HEAD_DIM
    q_ptrs = Q + b64 * stride_qb + h.to(tl.int64)[:, None] * stride_qh + qi[:, None] * stride_qs + d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & dmask[None, :], other=0.0)

    if PAGED:
        kv_len = tl.load(SEQLEN + b).to(tl.int32)
        kv_len = tl.minimum(tl.maximum(kv_len, 0), SEQ_K)  # SEQ_K = max_pages * page_size here
    else:
        kv_len = SEQ_K
    if CAUSAL:
        row_limit = kv_len - SQ + qi  # bottom-right: query i sees keys j <= kv_len - Sq + i
    else:
        row_limit = tl.zeros([BLOCK_M], tl.int32) + (kv_len - 1)

    n_pb = 0
    plen = 0
    pk_base = PK
    pv_base = PV
    if FUSED_PREFIX:
        pk_base += hkv * stride_pkh
        pv_base += hkv * stride_pvh
        if PREFIX == 2:
            e = tl.load(PIDX + b).to(tl.int32)
            e_ok = (e >= 0) & (e < POOL)
            entry = tl.where(e_ok, e, 0)
            plen = tl.where(e_ok, _prefix_length(PLEN, entry, PLEN_MAX, HAS_PLEN), 0)
            pk_base += entry.to(tl.int64) * stride_pkn
            pv_base += entry.to(tl.int64) * stride_pvn
        else:
            plen = _prefix_length(PLEN, 0, PLEN_MAX, HAS_PLEN)
        n_pb = tl.cdiv(plen, BLOCK_N)
    n_sb = tl.cdiv(kv_len, BLOCK_N)
    total = n_pb + n_sb
    per = tl.cdiv(total, num_splits)
    start = split * per
    end = tl.minimum(start + per, total)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    offs_n = tl.arange(0, BLOCK_N)

    if FUSED_PREFIX:
        for blk in range(start, tl.minimum(end, n_pb)):
            n = blk * BLOCK_N + offs_n
            kok = n < plen
            ld = kok[:, None] & dmask[None, :]
            k = tl.load(pk_base + n[:, None] * stride_pks + d[None, :], mask=ld, other=0.0)
            v = tl.load(pv_base + n[:, None] * stride_pvs + d[None, :], mask=ld, other=0.0)
            acc, m_i, l_i = _attend(q, k, v, kok[None, :] & row_ok[:, None], acc, m_i, l_i, qk_scale, DOT_PREC)

    for blk in range(tl.maximum(start, n_pb), end):
        n = (blk - n_pb) * BLOCK_N + offs_n
        kok = n < kv_len
        if PAGED:
            page = tl.load(BT + b64 * stride_btb + n // PAGE_SIZE, mask=kok, other=-1)
            kok = kok & (page >= 0) & (page < NUM_PAGES)
            page = tl.where(kok, page, 0).to(tl.int64)
            tok = n % PAGE_SIZE
            k_off = page * stride_kb + tok * stride_ks
            v_off = page * stride_vb + tok * stride_vs
        else:
            k_off = b64 * stride_kb + n.to(tl.int64) * stride_ks
            v_off = b64 * stride_vb + n.to(tl.int64) * stride_vs
        if HAS_KPM:
            real = tl.load(KPM + b64 * stride_mb + n * stride_ms, mask=kok, other=0)
            kok = kok & (real != 0)
        ld = kok[:, None] & dmask[None, :]
        k = tl.load(K + k_off[:, None] + hkv * stride_kh + d[None, :], mask=ld, other=0.0)
        v = tl.load(V + v_off[:, None] + hkv * stride_vh + d[None, :], mask=ld, other=0.0)
        vis = kok[None, :] & (n[None, :] <= row_limit[:, None])
        acc, m_i, l_i = _attend(q, k, v, vis, acc, m_i, l_i, qk_scale, DOT_PREC)

    if WRITE_FINAL:
        has = l_i > 0
        o = acc / tl.where(has, l_i, 1.0)[:, None]
        lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * LN2, float("-inf"))
        o_ptrs = OUT + b64 * stride_ob + h.to(tl.int64)[:, None] * stride_oh + qi[:, None] * stride_os + d[None, :]
        tl.store(o_ptrs, o.to(OUT.dtype.element_ty), mask=row_ok[:, None] & dmask[None, :])
        tl.store(LSE + b64 * stride_lb + h.to(tl.int64) * stride_lh + qi, lse, mask=row_ok)
    else:
        row_lin = (b64 * (HKV * G) + h) * SQ + qi
        _store_partial(OPART, LPART, row_lin, SLOT0 + split, acc, m_i, l_i, row_ok, d, dmask, NSLOTS, HEAD_DIM)


@triton.jit
def _cascade_program(
    pid,
    Q,
    PK,
    PV,
    PLEN,
    ORDER,
    STARTS,
    OPART,
    LPART,
    stride_qb,
    stride_qh,
    stride_qs,
    stride_pkn,
    stride_pkh,
    stride_pks,
    stride_pvn,
    stride_pvh,
    stride_pvs,
    HKV,
    BATCH,
    PLEN_MAX,
    tiles_per_group,
    qk_scale,
    G: tl.constexpr,
    SQ: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NSLOTS,
    POOLED: tl.constexpr,
    HAS_PLEN: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    # pid -> (group e, tile t, KV head). A group is the sequences sharing one prefix entry: all of the
    # batch for a shared prefix; for a pool, the sequences ORDER[STARTS[e]:STARTS[e+1]] using entry e.
    hkv = pid % HKV
    rest = pid // HKV
    t = rest % tiles_per_group
    e = rest // tiles_per_group
    if POOLED:
        first = tl.load(STARTS + e).to(tl.int32)
        count = tl.load(STARTS + e + 1).to(tl.int32) - first
    else:
        first = 0
        count = BATCH
    rows_per_seq: tl.constexpr = G * SQ
    rows_total = count * rows_per_seq

    r = t * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = r < rows_total
    slot = first + r // rows_per_seq
    if POOLED:
        b = tl.load(ORDER + slot, mask=row_ok, other=0).to(tl.int64)
    else:
        b = slot.to(tl.int64)
    rem = r % rows_per_seq
    g = rem // SQ
    qi = rem % SQ
    h = hkv * G + g
    d = tl.arange(0, BLOCK_D)
    dmask = d < HEAD_DIM
    q_ptrs = Q + b[:, None] * stride_qb + h.to(tl.int64)[:, None] * stride_qh + qi[:, None] * stride_qs + d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & dmask[None, :], other=0.0)

    plen = _prefix_length(PLEN, e, PLEN_MAX, HAS_PLEN)
    n_blocks = tl.where(t * BLOCK_M < rows_total, tl.cdiv(plen, BLOCK_N), 0)  # empty tiles do nothing

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    pk_base = PK + e.to(tl.int64) * stride_pkn + hkv * stride_pkh
    pv_base = PV + e.to(tl.int64) * stride_pvn + hkv * stride_pvh
    for blk in range(0, n_blocks):
        n = blk * BLOCK_N + offs_n
        kok = n < plen
        ld = kok[:, None] & dmask[None, :]
        k = tl.load(pk_base + n[:, None] * stride_pks + d[None, :], mask=ld, other=0.0)
        v = tl.load(pv_base + n[:, None] * stride_pvs + d[None, :], mask=ld, other=0.0)
        acc, m_i, l_i = _attend(q, k, v, kok[None, :] & row_ok[:, None], acc, m_i, l_i, qk_scale, DOT_PREC)

    row_lin = (b * (HKV * G) + h) * SQ + qi
    _store_partial(OPART, LPART, row_lin, 0, acc, m_i, l_i, row_ok, d, dmask, NSLOTS, HEAD_DIM)


@triton.jit
def decode_kernel(
    Q,
    K,
    V,
    PK,
    PV,
    PIDX,
    PLEN,
    KPM,
    BT,
    SEQLEN,
    ORDER,
    STARTS,
    OUT,
    LSE,
    OPART,
    LPART,
    stride_qb,
    stride_qh,
    stride_qs,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_vb,
    stride_vh,
    stride_vs,
    stride_pkn,
    stride_pkh,
    stride_pks,
    stride_pvn,
    stride_pvh,
    stride_pvs,
    stride_mb,
    stride_ms,
    stride_btb,
    stride_ob,
    stride_oh,
    stride_os,
    stride_lb,
    stride_lh,
    BATCH,
    HKV,
    SEQ_K,
    PLEN_MAX,
    POOL,
    NUM_PAGES,
    PAGE_SIZE,
    num_splits,
    m_tiles,
    cascade_programs,
    cascade_tiles,
    NSLOTS,
    qk_scale,
    G: tl.constexpr,
    SQ: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CASCADE_BLOCK_M: tl.constexpr,
    CASCADE_BLOCK_N: tl.constexpr,
    PAGED: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_KPM: tl.constexpr,
    PREFIX: tl.constexpr,
    CASCADE: tl.constexpr,
    HAS_PLEN: tl.constexpr,
    WRITE_FINAL: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """One launch for the whole decode step (before the merge).

    With CASCADE, the first `cascade_programs` programs run the prefix pass and the rest run the
    split-K sequence pass, so the prefix's tensor-core work overlaps the sequence's memory streaming
    instead of costing a launch and a tail of its own.
    """
    pid = tl.program_id(0)
    if CASCADE:
        if pid < cascade_programs:
            _cascade_program(
                pid,
                Q,
                PK,
                PV,
                PLEN,
                ORDER,
                STARTS,
                OPART,
                LPART,
                stride_qb,
                stride_qh,
                stride_qs,
                stride_pkn,
                stride_pkh,
                stride_pks,
                stride_pvn,
                stride_pvh,
                stride_pvs,
                HKV,
                BATCH,
                PLEN_MAX,
                cascade_tiles,
                qk_scale,
                G,
                SQ,
                HEAD_DIM,
                BLOCK_D,
                CASCADE_BLOCK_M,
                CASCADE_BLOCK_N,
                NSLOTS,
                PREFIX == 2,
                HAS_PLEN,
                DOT_PREC,
            )
        else:
            _split_program(
                pid - cascade_programs,
                Q,
                K,
                V,
                PK,
                PV,
                PIDX,
                PLEN,
                KPM,
                BT,
                SEQLEN,
                OUT,
                LSE,
                OPART,
                LPART,
                stride_qb,
                stride_qh,
                stride_qs,
                stride_kb,
                stride_kh,
                stride_ks,
                stride_vb,
                stride_vh,
                stride_vs,
                stride_pkn,
                stride_pkh,
                stride_pks,
                stride_pvn,
                stride_pvh,
                stride_pvs,
                stride_mb,
                stride_ms,
                stride_btb,
                stride_ob,
                stride_oh,
                stride_os,
                stride_lb,
                stride_lh,
                HKV,
                SEQ_K,
                PLEN_MAX,
                POOL,
                NUM_PAGES,
                PAGE_SIZE,
                num_splits,
                m_tiles,
                qk_scale,
                G,
                SQ,
                HEAD_DIM,
                BLOCK_D,
                BLOCK_M,
                BLOCK_N,
                NSLOTS,
                1,
                PAGED,
                CAUSAL,
                HAS_KPM,
                PREFIX,
                False,
                HAS_PLEN,
                False,
                DOT_PREC,
            )
    else:
        _split_program(
            pid,
            Q,
            K,
            V,
            PK,
            PV,
            PIDX,
            PLEN,
            KPM,
            BT,
            SEQLEN,
            OUT,
            LSE,
            OPART,
            LPART,
            stride_qb,
            stride_qh,
            stride_qs,
            stride_kb,
            stride_kh,
            stride_ks,
            stride_vb,
            stride_vh,
            stride_vs,
            stride_pkn,
            stride_pkh,
            stride_pks,
            stride_pvn,
            stride_pvh,
            stride_pvs,
            stride_mb,
            stride_ms,
            stride_btb,
            stride_ob,
            stride_oh,
            stride_os,
            stride_lb,
            stride_lh,
            HKV,
            SEQ_K,
            PLEN_MAX,
            POOL,
            NUM_PAGES,
            PAGE_SIZE,
            num_splits,
            m_tiles,
            qk_scale,
            G,
            SQ,
            HEAD_DIM,
            BLOCK_D,
            BLOCK_M,
            BLOCK_N,
            NSLOTS,
            0,
            PAGED,
            CAUSAL,
            HAS_KPM,
            PREFIX,
            PREFIX != 0,
            HAS_PLEN,
            WRITE_FINAL,
            DOT_PREC,
        )


@triton.jit
def merge_kernel(
    OPART,
    LPART,
    PIDX,
    OUT,
    LSE,
    stride_ob,
    stride_oh,
    stride_os,
    stride_lb,
    stride_lh,
    HQ,
    POOL,
    NSLOTS,
    SQ: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
    POOL_SLOT0: tl.constexpr,
):
    """out = sum_s softmax(lse)_s * o_s over the slots of one query row (fp32), lse = logsumexp(lse_s).

    POOL_SLOT0: slot 0 holds the cascade's prefix partial, written only for sequences whose pool index
    is in [0, N); for the others the slot is garbage and must be ignored.
    """
    row = tl.program_id(0).to(tl.int64)
    b = row // (HQ * SQ)
    h = (row // SQ) % HQ
    qi = row % SQ
    s = tl.arange(0, BLOCK_S)
    smask = s < NSLOTS
    if POOL_SLOT0:
        e = tl.load(PIDX + b)
        smask = smask & ((s > 0) | ((e >= 0) & (e < POOL)))
    lse = tl.load(LPART + row * NSLOTS + s, mask=smask, other=float("-inf"))
    m = tl.max(lse, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.where(smask, tl.exp2(lse - m_safe), 0.0)
    denom = tl.sum(w, 0)
    d = tl.arange(0, BLOCK_D)
    dmask = d < HEAD_DIM
    live = smask & (lse > float("-inf"))
    o = tl.load(
        OPART + (row * NSLOTS + s)[:, None] * HEAD_DIM + d[None, :], mask=live[:, None] & dmask[None, :], other=0.0
    )
    has = denom > 0
    out = tl.sum(w[:, None] * o, 0) / tl.where(has, denom, 1.0)
    lse_out = tl.where(has, (m_safe + tl.log2(tl.where(has, denom, 1.0))) * LN2, float("-inf"))
    tl.store(OUT + b * stride_ob + h * stride_oh + qi * stride_os + d, out.to(OUT.dtype.element_ty), mask=dmask)
    tl.store(LSE + b * stride_lb + h * stride_lh + qi, lse_out)
