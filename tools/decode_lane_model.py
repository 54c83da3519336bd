"""A lane-level model of csrc/decode_kernel.cuh (the CUDA decode kernel) in numpy, for checking its index algebra
without a GPU.

It follows the kernel statement by statement: the same lanes (g, t), register fragments, 16-key tiles,
masks, online softmax, warp merge and split merge, with mma.sync.m16n8k16 modelled from the PTX ISA's
fragment layouts (A: rows g / g+8, cols 2t.. / 2t+8..; B: rows 2t.. / 2t+8.., col g; C: row g / g+8,
cols 2t, 2t+1). When the kernel's data layout changes, change this model the same way and run

    python tools/decode_lane_model.py

which compares the model with the float64 reference on small problems (contiguous and paged, prefixes,
padding, splits, bad page ids); tests/test_decode_lane_model.py runs the same cases. It checks the algebra,
not the CUDA code: the GPU tests do that.
"""

import math
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from prefixattn.reference import prefix_attention_reference  # noqa: E402

NEG = -np.inf


def mma(c_lanes, a_lanes, b_lanes):
    """c_lanes[lane] = [4 floats]; a_lanes[lane] = 4 words (lo, hi); b_lanes[lane] = 2 words."""
    A = np.zeros((16, 16))
    B = np.zeros((16, 8))
    C = np.zeros((16, 8))
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        a = a_lanes[lane]
        A[g][2 * t], A[g][2 * t + 1] = a[0]
        A[g + 8][2 * t], A[g + 8][2 * t + 1] = a[1]
        A[g][2 * t + 8], A[g][2 * t + 9] = a[2]
        A[g + 8][2 * t + 8], A[g + 8][2 * t + 9] = a[3]
        b = b_lanes[lane]
        B[2 * t][g], B[2 * t + 1][g] = b[0]
        B[2 * t + 8][g], B[2 * t + 9][g] = b[1]
        c = c_lanes[lane]
        C[g][2 * t], C[g][2 * t + 1], C[g + 8][2 * t], C[g + 8][2 * t + 1] = c
    Dm = A @ B + C
    return [
        [
            Dm[l >> 2][2 * (l & 3)],
            Dm[l >> 2][2 * (l & 3) + 1],
            Dm[(l >> 2) + 8][2 * (l & 3)],
            Dm[(l >> 2) + 8][2 * (l & 3) + 1],
        ]
        for l in range(32)
    ]


def chunk(vec8):  # 8 elements -> 4 words (lo, hi)
    return [(vec8[2 * i], vec8[2 * i + 1]) for i in range(4)]


def byte_perm(x, y, sel):
    return (x[0], y[0]) if sel == 0x5410 else (x[1], y[1])


def rnd(x, dt):  # rounding of P to the mma input type
    return float(torch.tensor(x, dtype=torch.float32).to(dt).float())


def run_block(P, b, hkv, split, rg, dt):
    D = P["D"]
    KC = D // 32
    KSTEPS = D // 16
    VH = D // 64
    NT = D // 8
    G = P["Hq"] // P["Hkv"]
    rows = G * P["Sq"]
    Sq = P["Sq"]
    q = P["q"]
    # prefix
    plen = 0
    pk = pv = None
    if P["pk"] is not None:
        entry = 0
        has = True
        if P["pool"] > 0:
            entry = int(P["pidx"][b])
            has = 0 <= entry < P["pool"]
        if has:
            n = P["Pl"]
            if P["plens"] is not None:
                n = min(max(int(P["plens"][entry]), 0), P["Pl"])
            plen = n
            pk = P["pk"][entry, hkv] if P["pool"] > 0 else P["pk"][hkv]
            pv = P["pv"][entry, hkv] if P["pool"] > 0 else P["pv"][hkv]
    paged = P["paged"]
    if paged:
        cap = P["bt"].shape[1] * P["ps"]
        seqlen = min(max(int(P["sl"][b]), 0), cap)
    else:
        seqlen = P["k"].shape[2]
    total = plen + seqlen
    tiles_total = (total + 15) // 16
    tps = (tiles_total + P["ns"] - 1) // P["ns"]
    first = split * tps
    n_tiles = max(0, min(tiles_total, first + tps) - first)
    kbeg = first * 16

    def row(kk, V):
        if kk >= total:
            return None
        if kk < plen:
            return (pv if V else pk)[kk]
        pos = kk - plen
        if not paged:
            return (P["v"] if V else P["k"])[b, hkv, pos]
        slot, tok = pos // P["ps"], pos % P["ps"]
        page = int(P["bt"][b, slot])
        if page < 0 or page >= P["kc"].shape[0]:
            return None
        return (P["vc"] if V else P["kc"])[page, tok, hkv]

    def load16(r, off):
        return chunk(np.zeros(8) if r is None else r[off : off + 8])

    kpm = P["kpm"][b] if (not paged and P["kpm"] is not None) else None
    res = []
    for warp in range(4):
        lanes = range(32)
        qf = {}
        limit = {}
        for lane in lanes:
            g, t = lane >> 2, lane & 3
            for r in range(2):
                rw = rg * 16 + g + 8 * r
                ok = rw < rows
                hh = rw // Sq if ok else 0
                qi = rw - hh * Sq if ok else 0
                qrow = q[b, hkv * G + hh, qi] if ok else None
                for i in range(KC):
                    qf[lane, r, i] = load16(qrow, (4 * i + t) * 8)
                limit[lane, r] = (seqlen - Sq + qi) if (paged or P["causal"]) else 2**31 - 1
        acc = {lane: [[0.0] * 4 for _ in range(NT)] for lane in lanes}
        m_run = {lane: [NEG, NEG] for lane in lanes}
        l_run = {lane: [0.0, 0.0] for lane in lanes}

        def v_key(t, u):
            return 2 * t + (u & 1) + 8 * (u >> 1)

        def load_k(k0):
            kf = {}
            for lane in lanes:
                g, t = lane >> 2, lane & 3
                for n2 in range(2):
                    r_ = row(k0 + 8 * n2 + g, False)
                    for i in range(KC):
                        kf[lane, n2, i] = load16(r_, (4 * i + t) * 8)
            return kf

        def load_v(k0):
            vf = {}
            for lane in lanes:
                g, t = lane >> 2, lane & 3
                for u in range(4):
                    r_ = row(k0 + v_key(t, u), True)
                    for h in range(VH):
                        vf[lane, u, h] = load16(r_, 64 * h + 8 * g)
            return vf

        it = warp
        for it in range(warp, n_tiles, 4):
            k0 = kbeg + it * 16
            kf = load_k(k0)
            vf = load_v(k0)
            s = {lane: [[0.0] * 4 for _ in range(2)] for lane in lanes}
            for n2 in range(2):
                for j in range(KSTEPS):
                    i, w = j >> 1, 2 * (j & 1)
                    a = [[qf[l, 0, i][w], qf[l, 1, i][w], qf[l, 0, i][w + 1], qf[l, 1, i][w + 1]] for l in lanes]
                    bb = [[kf[l, n2, i][w], kf[l, n2, i][w + 1]] for l in lanes]
                    out = mma([s[l][n2] for l in lanes], a, bb)
                    for l in lanes:
                        s[l][n2] = out[l]
            mx = {}
            for lane in lanes:
                g, t = lane >> 2, lane & 3
                key_ok = []
                key_pos = []
                for u in range(4):
                    kk = k0 + v_key(t, u)
                    ok = kk < total
                    if paged and ok and kk >= plen:
                        ok = row(kk, True) is not None
                    pos = kk - plen
                    if kpm is not None and ok and pos >= 0:
                        ok = bool(kpm[pos])
                    key_ok.append(ok)
                    key_pos.append(pos if pos >= 0 else -(2**31))
                mxl = [NEG, NEG]
                for n2 in range(2):
                    for c in range(4):
                        u, r = 2 * n2 + (c & 1), c >> 1
                        vis = key_ok[u] and key_pos[u] <= limit[lane, r]
                        s[lane][n2][c] = s[lane][n2][c] * P["scale"] * math.log2(math.e) if vis else NEG
                        mxl[r] = max(mxl[r], s[lane][n2][c])
                mx[lane] = mxl
            # shfl xor 1, 2
            for r in range(2):
                for sh in (1, 2):
                    new = {l: max(mx[l][r], mx[l ^ sh][r]) for l in lanes}
                    for l in lanes:
                        mx[l][r] = new[l]
            pa = {}
            for lane in lanes:
                alpha = [0, 0]
                m_use = [0, 0]
                for r in range(2):
                    m_new = max(m_run[lane][r], mx[lane][r])
                    m_use[r] = 0.0 if m_new == NEG else m_new
                    alpha[r] = 2.0 ** (m_run[lane][r] - m_use[r])
                    m_run[lane][r] = m_new
                p_ = [[2.0 ** (s[lane][n2][c] - m_use[c >> 1]) for c in range(4)] for n2 in range(2)]
                for r in range(2):
                    l_run[lane][r] = (
                        l_run[lane][r] * alpha[r] + p_[0][2 * r] + p_[0][2 * r + 1] + p_[1][2 * r] + p_[1][2 * r + 1]
                    )
                for n in range(NT):
                    acc[lane][n] = [
                        acc[lane][n][0] * alpha[0],
                        acc[lane][n][1] * alpha[0],
                        acc[lane][n][2] * alpha[1],
                        acc[lane][n][3] * alpha[1],
                    ]
                pa[lane] = [
                    (rnd(p_[0][0], dt), rnd(p_[0][1], dt)),
                    (rnd(p_[0][2], dt), rnd(p_[0][3], dt)),
                    (rnd(p_[1][0], dt), rnd(p_[1][1], dt)),
                    (rnd(p_[1][2], dt), rnd(p_[1][3], dt)),
                ]
            for h in range(VH):
                for e in range(8):
                    sel = 0x7632 if e & 1 else 0x5410
                    bb = [
                        [
                            byte_perm(vf[l, 0, h][e >> 1], vf[l, 1, h][e >> 1], sel),
                            byte_perm(vf[l, 2, h][e >> 1], vf[l, 3, h][e >> 1], sel),
                        ]
                        for l in lanes
                    ]
                    out = mma([acc[l][8 * h + e] for l in lanes], [pa[l] for l in lanes], bb)
                    for l in lanes:
                        acc[l][8 * h + e] = out[l]
        # reduce l over t
        for r in range(2):
            for sh in (1, 2):
                new = {l: l_run[l][r] + l_run[l ^ sh][r] for l in lanes}
                for l in lanes:
                    l_run[l][r] = new[l]
        sm_o = np.zeros((16, D))
        sm_m = np.zeros(16)
        sm_l = np.zeros(16)
        for lane in lanes:
            g, t = lane >> 2, lane & 3
            if t == 0:
                sm_m[g], sm_m[g + 8] = m_run[lane]
                sm_l[g], sm_l[g + 8] = l_run[lane]
            for h in range(VH):
                for e in range(8):
                    d = 64 * h + 16 * t + e
                    sm_o[g][d] = acc[lane][8 * h + e][0]
                    sm_o[g][d + 8] = acc[lane][8 * h + e][1]
                    sm_o[g + 8][d] = acc[lane][8 * h + e][2]
                    sm_o[g + 8][d + 8] = acc[lane][8 * h + e][3]
        res.append((sm_o, sm_m, sm_l))
    outs = {}
    for r in range(16):
        rw = rg * 16 + r
        if rw >= rows:
            continue
        m = max(res[w][1][r] for w in range(4))
        m_use = 0.0 if m == NEG else m
        l = 0.0
        o = np.zeros(D)
        for w in range(4):
            wt = 2.0 ** (res[w][1][r] - m_use)
            l += wt * res[w][2][r]
            o += wt * res[w][0][r]
        empty = not (l > 0)
        o = o * (0 if empty else 1 / l)
        lse2 = NEG if empty else m + math.log2(l)
        hh = rw // Sq
        qi = rw - hh * Sq
        outs[(b, hkv * G + hh, qi)] = (o, lse2)
    return outs


def emulate(P, dt):
    G = P["Hq"] // P["Hkv"]
    rows = G * P["Sq"]
    rgs = (rows + 15) // 16
    parts = {}
    for b in range(P["B"]):
        for hkv in range(P["Hkv"]):
            for split in range(P["ns"]):
                for rg in range(rgs):
                    for key, val in run_block(P, b, hkv, split, rg, dt).items():
                        parts.setdefault(key, []).append(val)
    out = np.zeros((P["B"], P["Hq"], P["Sq"], P["D"]))
    lse = np.zeros((P["B"], P["Hq"], P["Sq"]))
    for (b, h, qi), lst in parts.items():
        if len(lst) == 1:
            o, l2 = lst[0]
        else:  # merge kernel
            m = max(l2 for _, l2 in lst)
            m_use = 0 if m == NEG else m
            l = 0.0
            o = np.zeros(P["D"])
            for os_, l2 in lst:
                wt = 2.0 ** (l2 - m_use)
                if wt > 0:
                    o += wt * os_
                    l += wt
            o = o * (0 if not l > 0 else 1 / l)
            l2 = NEG if not l > 0 else m + math.log2(l)
        out[b, h, qi] = o
        lse[b, h, qi] = l2 * math.log(2) if l2 != NEG else NEG
    return out, lse


def check(
    B=2,
    Hq=4,
    Hkv=2,
    Sq=1,
    Sk=37,
    D=64,
    Pl=5,
    pool=0,
    causal=True,
    kpm=False,
    ns=1,
    paged=False,
    ps=8,
    lengths=False,
    dt=torch.bfloat16,
    seed=0,
    bad_page=False,
):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dt).double()
    q = r(B, Hq, Sq, D)
    P = dict(
        B=B,
        Hq=Hq,
        Hkv=Hkv,
        Sq=Sq,
        D=D,
        causal=causal,
        ns=ns,
        paged=paged,
        scale=D**-0.5,
        q=q.numpy(),
        pk=None,
        pv=None,
        pool=pool,
        pidx=None,
        plens=None,
        Pl=Pl,
        kpm=None,
    )
    args = {}
    if Pl:
        shape = (pool, Hkv, Pl, D) if pool else (Hkv, Pl, D)
        pk, pv = r(*shape), r(*shape)
        P["pk"], P["pv"] = pk.numpy(), pv.numpy()
        if pool:
            idx = torch.randint(-1, pool, (B,), generator=g)
            idx[0] = 0
            P["pidx"] = idx.numpy()
            args["prefix_index"] = idx
        if lengths:
            pl = torch.randint(0, Pl + 1, (pool or 1,), generator=g)
            P["plens"] = pl.numpy()
            args["prefix_lengths"] = pl
    else:
        pk = pv = None
    if paged:
        max_pages = (Sk + ps - 1) // ps + 1
        num_pages = B * max_pages + 3
        kc, vc = r(num_pages, ps, Hkv, D), r(num_pages, ps, Hkv, D)
        perm = torch.randperm(num_pages, generator=g)[: B * max_pages].view(B, max_pages)
        sl = torch.randint(Sq, max_pages * ps + 1, (B,), generator=g)
        if bad_page:
            perm[0, 0] = num_pages + 5
        P.update(kc=kc.numpy(), vc=vc.numpy(), bt=perm.numpy(), sl=sl.numpy(), ps=ps)
        # reference: gather contiguous per sequence with padding mask (left-aligned)
        L = int(sl.max())
        k = torch.zeros(B, Hkv, L, D, dtype=torch.float64)
        v = torch.zeros_like(k)
        mask = torch.zeros(B, L, dtype=torch.bool)
        for b in range(B):
            for pos in range(int(sl[b])):
                page = int(perm[b, pos // ps])
                tok = pos % ps
                if 0 <= page < num_pages:
                    k[b, :, pos] = kc[page, tok]
                    v[b, :, pos] = vc[page, tok]
                    mask[b, pos] = True
        # causal per sequence: query i sees pos <= sl-Sq+i ; reference has bottom-right over L: emulate with mask
        ref_o = torch.zeros(B, Hq, Sq, D, dtype=torch.float64)
        ref_l = torch.zeros(B, Hq, Sq, dtype=torch.float64)
        for b in range(B):
            n = int(sl[b])
            kk, vv = k[b : b + 1, :, :n], v[b : b + 1, :, :n]
            extra = {kk2: (vv2[b : b + 1] if kk2 == "prefix_index" else vv2) for kk2, vv2 in args.items()}
            o, l = prefix_attention_reference(
                q[b : b + 1],
                kk,
                vv,
                pk,
                pv,
                causal=True,
                key_padding_mask=mask[b : b + 1, :n],
                return_lse=True,
                **extra,
            )
            ref_o[b], ref_l[b] = o[0], l[0]
    else:
        k, v = r(B, Hkv, Sk, D), r(B, Hkv, Sk, D)
        P["k"], P["v"] = k.numpy(), v.numpy()
        if kpm:
            m = torch.rand(B, Sk, generator=g) > 0.3
            P["kpm"] = m.numpy()
            args["key_padding_mask"] = m
        ref_o, ref_l = prefix_attention_reference(q, k, v, pk, pv, causal=causal, return_lse=True, **args)
    out, lse = emulate(P, dt)
    err = np.linalg.norm(out - ref_o.numpy()) / max(np.linalg.norm(ref_o.numpy()), 1e-30)
    rl, el = ref_l.numpy(), lse
    inf_match = np.array_equal(np.isinf(rl), np.isinf(el))
    fin = ~np.isinf(rl)
    lerr = (np.abs(rl[fin] - el[fin]).max() if fin.any() else 0.0) if inf_match else float("inf")
    print(
        f"B={B} Hq={Hq} Hkv={Hkv} Sq={Sq} Sk={Sk} D={D} P={Pl} pool={pool} causal={causal} kpm={kpm} ns={ns} "
        f"paged={paged} lengths={lengths} -> out rel {err:.2e}, lse max abs {lerr:.2e}"
    )
    assert err < 1e-2 and lerr < 1e-2, "MISMATCH"
    return err, lerr


def from_tensors(
    q,
    k=None,
    v=None,
    pk=None,
    pv=None,
    pidx=None,
    plen=None,
    kpm=None,
    causal=True,
    scale=None,
    splits=1,
    kc=None,
    vc=None,
    bt=None,
    sl=None,
):
    """The model's (out, lse) for torch tensors in prefix_attention's layout (paged: kc/vc pages, block table bt,
    sequence lengths sl); softmax scale default 1/sqrt(D)."""
    B, Hq, Sq, D = q.shape
    paged = kc is not None
    Hkv = kc.shape[2] if paged else k.shape[1]
    f = lambda t: t.double().cpu().numpy() if t is not None else None
    P = dict(
        B=B,
        Hq=Hq,
        Hkv=Hkv,
        Sq=Sq,
        D=D,
        causal=causal,
        ns=splits,
        paged=paged,
        scale=scale if scale is not None else D**-0.5,
        q=f(q),
        pk=f(pk) if pk is not None and pk.shape[-2] > 0 else None,
        pv=f(pv),
        pool=(pk.shape[0] if pk is not None and pk.dim() == 4 else 0),
        pidx=pidx.cpu().numpy() if pidx is not None else None,
        plens=plen.cpu().numpy() if plen is not None else None,
        Pl=pk.shape[-2] if pk is not None else 0,
        kpm=kpm.cpu().numpy() if kpm is not None else None,
    )
    if paged:
        P.update(kc=f(kc), vc=f(vc), bt=bt.cpu().numpy(), sl=sl.cpu().numpy(), ps=kc.shape[1])
    else:
        P.update(k=f(k), v=f(v))
    out, lse = emulate(P, q.dtype)
    out_t = torch.from_numpy(out).to(q.dtype)
    return out_t, torch.from_numpy(lse).float()


# Small problems that reach every branch of the kernel's index algebra (keyword arguments of check()).
CASES = (
    dict(),
    dict(D=128, Sk=50, Pl=0),
    dict(Sq=3, Hq=8, Hkv=2, Sk=40, Pl=7, kpm=True, ns=3),
    dict(Sq=5, Hq=8, Hkv=1, Sk=20, Pl=3, causal=True, ns=2),  # rows = 40 -> 3 row groups
    dict(pool=3, Pl=6, lengths=True, B=3, Sk=23, ns=2),
    dict(paged=True, B=3, Sk=30, Pl=4, ps=8, Sq=2, ns=2),
    dict(paged=True, B=2, Sk=20, Pl=0, ps=5, Sq=1, ns=1, bad_page=True),
    dict(Sk=0, Pl=3, causal=False, B=1, Sq=2),
    dict(Sk=3, Pl=0, causal=False, kpm=True, B=4, Sq=2, seed=3),
    dict(Sk=5, Pl=0, causal=False, kpm=True, B=2, Sq=1, ns=4),
    dict(dt=torch.float16, Sk=70, Pl=9, ns=1),
)


if __name__ == "__main__":
    for case in CASES:
        check(**case)
