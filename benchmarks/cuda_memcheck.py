"""Every variant of the CUDA decode kernels once, on small shapes, for compute-sanitizer:

    compute-sanitizer --tool memcheck --error-exitcode 3 python benchmarks/cuda_memcheck.py

Variants: float16/bfloat16 x head dim 64/128 x contiguous/paged x one split/several (the merge kernel),
with no prefix, a shared one and a pool; plus the bad values the kernels must survive without an illegal
access (page ids outside the cache, seq_lens beyond the table or negative, pool indices out of range).
Each result is compared with the float64 reference (on the CPU, to keep the sanitized run short); the
script exits 1 on any mismatch, 2 when the extension or a GPU is missing.

PyTorch's caching allocator is switched off so that each tensor is its own cudaMalloc and memcheck sees
an access past a tensor's end (inside a cached block it could not).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("PYTORCH_NO_CUDA_MEMORY_CACHING", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's prefixattn

import torch  # noqa: E402

from prefixattn.kernels import cuda_backend, cuda_ext  # noqa: E402
from prefixattn.reference import prefix_attention_reference  # noqa: E402

TOL = {torch.float16: 2e-2, torch.bfloat16: 5e-2}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    inf_a, inf_b = torch.isinf(a), torch.isinf(b)
    if not torch.equal(inf_a, inf_b) or torch.isnan(a).any():
        return float("inf")
    a, b = a[~inf_a], b[~inf_b]
    n = b.norm().item()
    return (a - b).norm().item() / (n if n > 0 else 1.0)


def rand(gen, *shape, dtype):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def prefix_tensors(gen, kind, Hkv, P, D, B, dtype):
    if kind == "none":
        return None, None, None, None
    if kind == "shared":
        return rand(gen, Hkv, P, D, dtype=dtype), rand(gen, Hkv, P, D, dtype=dtype), None, None
    pool = 3
    idx = torch.tensor([(b % (pool + 1)) - 1 for b in range(B)])  # -1, 0, 1, 2, -1, ...
    lengths = torch.tensor([P, P // 2, 0])
    return rand(gen, pool, Hkv, P, D, dtype=dtype), rand(gen, pool, Hkv, P, D, dtype=dtype), idx, lengths


def cuda(t):
    return t.cuda() if t is not None else None


def reference(q, k, v, pk, pv, pidx, plen, kpm, causal):
    d = lambda t: t.double() if t is not None else None  # noqa: E731
    args = dict(causal=causal, key_padding_mask=kpm, return_lse=True)
    if pidx is not None:
        args["prefix_index"] = pidx
    if plen is not None:
        args["prefix_lengths"] = plen
    return prefix_attention_reference(d(q), d(k), d(v), d(pk), d(pv), **args)


def run_contiguous(gen, dtype, D, splits, kind):
    B, Hq, Hkv, Sq, Sk, P = 3, 8, 2, 2, 45, 9
    q = rand(gen, B, Sq, Hq, D, dtype=dtype).transpose(1, 2)  # the layout transformers passes
    k, v = rand(gen, B, Hkv, Sk, D, dtype=dtype), rand(gen, B, Hkv, Sk, D, dtype=dtype)
    pk, pv, pidx, plen = prefix_tensors(gen, kind, Hkv, P, D, B, dtype)
    kpm = torch.rand(B, Sk, generator=gen) > 0.2
    out, lse = cuda_backend.decode(
        cuda(q),
        cuda(k),
        cuda(v),
        cuda(pk),
        cuda(pv),
        cuda(pidx),
        cuda(plen),
        cuda(kpm),
        True,
        D**-0.5,
        num_splits=splits,
    )
    return (out, lse), reference(q, k, v, pk, pv, pidx, plen, kpm, True)


def paged_problem(gen, dtype, D, kind, *, B=3, Hq=8, Hkv=2, Sq=1, page_size=8, max_pages=4, lengths=None):
    P = 7
    num_pages = B * max_pages + 2
    kc, vc = rand(gen, num_pages, page_size, Hkv, D, dtype=dtype), rand(gen, num_pages, page_size, Hkv, D, dtype=dtype)
    bt = torch.randperm(num_pages, generator=gen)[: B * max_pages].view(B, max_pages).to(torch.int32)
    sl = lengths if lengths is not None else torch.tensor([max_pages * page_size, 11, 1][:B])
    q = rand(gen, B, Hq, Sq, D, dtype=dtype)
    pk, pv, pidx, plen = prefix_tensors(gen, kind, Hkv, P, D, B, dtype)
    return q, kc, vc, bt, sl.to(torch.int32), pk, pv, pidx, plen


def paged_reference(q, kc, vc, bt, sl, pk, pv, pidx, plen):
    """Contiguous equivalent: tokens right-aligned, bad pages and the clamped lengths as documented."""
    B, _, Sq, D = q.shape
    num_pages, page_size, Hkv = kc.shape[:3]
    cap = bt.shape[1] * page_size
    lens = [min(max(int(n), 0), cap) for n in sl]
    L = max(max(lens), Sq)
    k = torch.zeros(B, Hkv, L, D, dtype=kc.dtype)
    v = torch.zeros_like(k)
    mask = torch.zeros(B, L, dtype=torch.bool)
    for b, n in enumerate(lens):
        for pos in range(n):
            page = int(bt[b, pos // page_size])
            if 0 <= page < num_pages:
                k[b, :, L - n + pos], v[b, :, L - n + pos] = kc[page, pos % page_size], vc[page, pos % page_size]
                mask[b, L - n + pos] = True
    if pidx is not None:
        pidx = torch.where((pidx >= 0) & (pidx < pk.shape[0]), pidx, torch.full_like(pidx, -1))
    return reference(q, k, v, pk, pv, pidx, plen, mask, True)


def run_paged(gen, dtype, D, splits, kind, *, bad=False):
    lengths = torch.tensor([100, -2, 19]) if bad else None
    q, kc, vc, bt, sl, pk, pv, pidx, plen = paged_problem(gen, dtype, D, kind, Sq=1 if bad else 2, lengths=lengths)
    if bad:  # page ids below and past the cache (one huge), pool indices past the pool
        bt[0, 1], bt[2, 0], bt[2, 2] = -1, kc.shape[0], 2**31 - 1
        if pidx is not None:
            pidx = torch.tensor([7, -5, 1])
    out, lse = cuda_backend.paged_decode(
        cuda(q),
        cuda(kc),
        cuda(vc),
        cuda(bt),
        cuda(sl),
        cuda(pk),
        cuda(pv),
        cuda(pidx),
        cuda(plen),
        D**-0.5,
        num_splits=splits,
    )
    return (out, lse), paged_reference(q, kc, vc, bt, sl, pk, pv, pidx, plen)


def main() -> int:
    if cuda_ext.load() is None or not torch.cuda.is_available():
        print(f"cuda_memcheck: cannot run: {cuda_ext.why_unavailable() or 'no CUDA device'}")
        return 2
    gen = torch.Generator().manual_seed(0)
    failures, runs = [], 0
    kinds = ("none", "shared", "pool")
    variant = 0
    for dtype in (torch.float16, torch.bfloat16):
        for D in (64, 128):
            for splits in (1, 3):
                for paged in (False, True):
                    kind = kinds[variant % 3]
                    variant += 1
                    runner = run_paged if paged else run_contiguous
                    (out, lse), (ref_out, ref_lse) = runner(gen, dtype, D, splits, kind)
                    torch.cuda.synchronize()
                    err, lerr = rel(out, ref_out), rel(lse, ref_lse)
                    name = f"{str(dtype)[6:]} D={D} splits={splits} {'paged' if paged else 'contiguous'} prefix={kind}"
                    runs += 1
                    if not (err <= TOL[dtype] and lerr <= 2e-3):
                        failures.append(f"{name}: out {err:.2e}, lse {lerr:.2e}")
    for splits in (1, 4):  # bad values: must neither fault nor produce NaN
        for kind in ("pool", "shared"):
            (out, lse), (ref_out, ref_lse) = run_paged(gen, torch.bfloat16, 128, splits, kind, bad=True)
            torch.cuda.synchronize()
            err, lerr = rel(out, ref_out), rel(lse, ref_lse)
            runs += 1
            if not (err <= TOL[torch.bfloat16] and lerr <= 2e-3):
                failures.append(f"bad values splits={splits} prefix={kind}: out {err:.2e}, lse {lerr:.2e}")
    for f in failures:
        print("MISMATCH", f)
    print(f"cuda_memcheck: {runs - len(failures)}/{runs} variants match the reference")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
