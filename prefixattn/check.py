"""`prefixattn check`: run every available backend on small problems against the float64 reference.

Prints one row per (case, backend, dtype) with the relative errors of the output, lse and gradients.
On a machine without a GPU the Triton kernels run in Triton's interpreter (slow, so the shapes are tiny).
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass

import torch

TOL = {torch.float64: 1e-9, torch.float32: 2e-3, torch.float16: 2e-2, torch.bfloat16: 5e-2}


@dataclass(frozen=True)
class CheckCase:
    name: str
    batch: int
    heads_q: int
    heads_kv: int
    seqlen_q: int
    seqlen_k: int
    head_dim: int
    prefix_len: int
    causal: bool = True
    pool: int = 0
    padding: bool = False


CASES = [
    CheckCase("mha causal", 2, 4, 4, 37, 37, 64, 5),
    CheckCase("gqa padded", 2, 4, 2, 29, 29, 32, 7, padding=True),
    CheckCase("pool mixed", 3, 4, 2, 17, 17, 64, 9, pool=2),
    CheckCase("non-causal", 2, 2, 1, 13, 21, 128, 3, causal=False),
    CheckCase("chunked", 2, 4, 2, 5, 33, 64, 6),
    CheckCase("decode", 3, 8, 2, 1, 45, 128, 16),
    CheckCase("no prefix", 2, 4, 2, 19, 19, 64, 0),
]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    fin = torch.isfinite(b)
    if not torch.equal(fin, torch.isfinite(a)):
        return math.inf
    d = b[fin].norm().item()
    return (a[fin] - b[fin]).norm().item() / (d if d > 0 else 1.0)


def _inputs(c: CheckCase, device, gen):
    def rnd(*s):
        return torch.randn(*s, generator=gen, dtype=torch.float64).to(device)

    q = rnd(c.batch, c.heads_q, c.seqlen_q, c.head_dim)
    k = rnd(c.batch, c.heads_kv, c.seqlen_k, c.head_dim)
    v = rnd(c.batch, c.heads_kv, c.seqlen_k, c.head_dim)
    kw = dict(causal=c.causal)
    pk = pv = None
    if c.pool:
        pk, pv = rnd(c.pool, c.heads_kv, c.prefix_len, c.head_dim), rnd(c.pool, c.heads_kv, c.prefix_len, c.head_dim)
        kw["prefix_index"] = (torch.arange(c.batch) % (c.pool + 1) - 1).to(device)
        kw["prefix_lengths"] = torch.tensor([c.prefix_len, c.prefix_len // 2]).to(device)[: c.pool]
    elif c.prefix_len:
        pk, pv = rnd(c.heads_kv, c.prefix_len, c.head_dim), rnd(c.heads_kv, c.prefix_len, c.head_dim)
    if c.padding:
        mask = torch.ones(c.batch, c.seqlen_k, dtype=torch.bool)
        mask[0, : c.seqlen_k // 3] = False
        kw["key_padding_mask"] = mask.to(device)
    return [q, k, v, pk, pv], kw


def _run(fn, tensors, kw, dtype, grad_out, with_grad):
    ts = [t.detach().to(dtype).requires_grad_(with_grad) if t is not None else None for t in tensors]
    out, lse = fn(*ts, return_lse=True, **kw)
    grads = []
    if with_grad:
        live = [t for t in ts if t is not None]
        grads = list(torch.autograd.grad(out, live, grad_out.to(out.dtype)))
    return out, lse, grads


def available_backends(device: torch.device) -> list[str]:
    from . import kernels

    names = ["torch"]
    if kernels.triton_unavailable_reason(device) is None:
        names += ["triton", "sdpa"]  # sdpa: the vendor kernels plus Triton (CPU flash under the interpreter)
    from .kernels import cuda_backend

    if device.type == "cuda" and cuda_backend.extension_loaded():
        names.append("cuda")
    return names


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="prefixattn check", description=__doc__)
    parser.add_argument("--backends", default="all", help="comma-separated subset of torch,triton,cuda,sdpa")
    parser.add_argument("--cases", default="all", help="comma-separated case names (default: all)")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported
    from . import kernels
    from .ops import prefix_attention
    from .reference import prefix_attention_reference

    backends = available_backends(device)
    if args.backends != "all":
        backends = [b for b in args.backends.split(",") if b in backends]
    cases = CASES if args.cases == "all" else [c for c in CASES if c.name in args.cases.split(",")]
    # The interpreter's bf16 dot is broken (Triton 3.6/3.9), so bf16 is only checked on a GPU.
    dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if device.type == "cuda" else [])
    where = (
        torch.cuda.get_device_name()
        if device.type == "cuda"
        else "CPU" + (" (Triton interpreter)" if kernels.triton_interpreting() else "")
    )
    print(f"prefixattn check on {where}; backends: {', '.join(backends)}", flush=True)
    header = f"{'case':<12} {'backend':<7} {'dtype':<9} {'out':>9} {'lse':>9} {'grads':>9} {'time':>7}  result"
    print(header)
    print("-" * len(header))
    gen = torch.Generator().manual_seed(0)
    failures = 0
    for c in cases:
        tensors, kw = _inputs(c, device, gen)
        grad_out = torch.randn(c.batch, c.heads_q, c.seqlen_q, c.head_dim, generator=gen, dtype=torch.float64).to(
            device
        )
        ref_out, ref_lse, ref_grads = _run(prefix_attention_reference, tensors, kw, torch.float64, grad_out, True)
        for backend in backends:
            for dtype in dtypes if backend != "torch" else [torch.float32]:
                with_grad = backend != "cuda"  # the CUDA kernels are inference-only
                t0 = time.perf_counter()
                try:
                    # sdpa's vendor backward is not deterministic: it trains only with deterministic=False
                    fn = lambda *a, **k: prefix_attention(
                        *a,
                        backend=backend,  # noqa: E731
                        deterministic=backend != "sdpa",
                        **k,
                    )
                    out, lse, grads = _run(fn, tensors, kw, dtype, grad_out, with_grad)
                except ValueError as e:  # a backend that cannot run this shape says why
                    print(f"{c.name:<12} {backend:<7} {str(dtype)[6:]:<9} {'':>9} {'':>9} {'':>9} {'':>7}  skip: {e}")
                    continue
                dt = time.perf_counter() - t0
                e_out, e_lse = _rel(out, ref_out), _rel(lse, ref_lse)
                e_grad = max((_rel(g, r) for g, r in zip(grads, ref_grads)), default=float("nan"))
                errs = [e_out, e_lse] + ([e_grad] if with_grad else [])
                ok = all(e <= TOL[dtype] for e in errs)
                failures += not ok
                grad_s = f"{e_grad:9.1e}" if with_grad else f"{'-':>9}"
                print(
                    f"{c.name:<12} {backend:<7} {str(dtype)[6:]:<9} {e_out:9.1e} {e_lse:9.1e} {grad_s} "
                    f"{dt:6.2f}s  {'ok' if ok else 'FAIL'}",
                    flush=True,
                )
    print(
        f"\nrelative errors against the float64 reference; tolerances fp32 {TOL[torch.float32]}, "
        f"fp16 {TOL[torch.float16]}, bf16 {TOL[torch.bfloat16]}"
    )
    print("all checks passed" if not failures else f"{failures} check(s) FAILED")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
