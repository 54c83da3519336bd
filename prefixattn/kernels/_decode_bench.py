"""Time the Triton decode kernels on a GPU against concat + SDPA: `python -m prefixattn.kernels._decode_bench`.

Every method is timed the same way: a CUDA graph holding `ITERS` steps, replayed, divided by ITERS (the
decode loop of a serving engine runs from graphs). Inputs rotate over enough copies that the working set
of consecutive steps exceeds the L2 cache, so small problems are not timed L2-hot. Prints one line per
measurement with the cost model's prediction next to it and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys

import torch
import torch.nn.functional as F

from prefixattn import prefix_attention, prefix_attention_paged
from prefixattn.kernels import triton_decode as td

HQ, HKV, D = 32, 8, 128
COPY_CEILING_TBPS = 4.28
ITERS, REPS = 20, 5
L2_BYTES = 50 * 2**20


def time_graph(step, n_inputs: int) -> float:
    """Milliseconds per step: step(i) uses input copy i % n_inputs."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(min(n_inputs, 2)):
            step(i)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(ITERS):
            step(i % n_inputs)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(REPS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / ITERS)
    del graph
    return statistics.median(times)


def _copies(bytes_per_step: int) -> int:
    return max(1, min(8, math.ceil(2 * L2_BYTES / max(bytes_per_step, 1))))


def bench_contiguous(batch, sk, p, *, path=None, pool=0, sq=1, dtype=torch.bfloat16):
    kv_bytes = (batch * sk + p * max(pool, 1)) * HKV * D * 2 * 2
    n = _copies(kv_bytes)
    mk = lambda *s: torch.randn(*s, device="cuda", dtype=dtype)  # noqa: E731
    sets = []
    for _ in range(n):
        q, k, v = mk(batch, HQ, sq, D), mk(batch, HKV, sk, D), mk(batch, HKV, sk, D)
        pk = pv = None
        args = {}
        if p:
            shape = (pool, HKV, p, D) if pool else (HKV, p, D)
            pk, pv = mk(*shape), mk(*shape)
            if pool:
                args["prefix_index"] = torch.randint(0, pool, (batch,), device="cuda")
        sets.append((q, k, v, pk, pv, args))

    def step(i):
        q, k, v, pk, pv, args = sets[i]
        with td.force(path=path):
            return prefix_attention(q, k, v, pk, pv, backend="triton", **args)

    with td.force(path=path):
        plan = td.make_plan(
            batch=batch,
            heads_kv=HKV,
            group=HQ // HKV,
            seqlen_q=sq,
            max_keys=sk,
            head_dim=D,
            prefix_len=p,
            pool_size=pool or 1,
            dtype=dtype,
            device=torch.device("cuda"),
        )
    ms = time_graph(step, n)
    needed = (batch * sk + p * (min(pool, batch) if pool else 1)) * HKV * D * 2 * 2
    cost = td.prefix_path_cost(
        batch=batch,
        heads_kv=HKV,
        group=HQ // HKV,
        seqlen_q=sq,
        max_keys=sk,
        head_dim=D,
        prefix_len=p,
        pool_size=pool or 1,
        elem_size=dtype.itemsize,
        num_sms=td.sm_count(torch.device("cuda")),
    )
    return dict(
        method="prefixattn_triton",
        layout="contiguous",
        path=path or "auto",
        chosen="cascade" if plan.cascade else "fused",
        splits=plan.num_splits,
        B=batch,
        Sk=sk,
        P=p,
        pool=pool,
        Sq=sq,
        ms=ms,
        TBps_needed_bytes=needed / ms / 1e9,
        pct_of_copy_ceiling=100 * needed / ms / 1e9 / COPY_CEILING_TBPS,
        predicted_fused_us=cost.fused_us,
        predicted_cascade_us=cost.cascade_us,
    )


def bench_concat_sdpa(batch, sk, p, *, sq=1, dtype=torch.bfloat16):
    """What a KV cache holding the prefix per sequence costs: SDPA over the concatenated [prefix; cache]."""
    total = sk + p
    n = _copies(batch * total * HKV * D * 4)
    mk = lambda *s: torch.randn(*s, device="cuda", dtype=dtype)  # noqa: E731
    sets = [(mk(batch, HQ, sq, D), mk(batch, HKV, total, D), mk(batch, HKV, total, D)) for _ in range(n)]

    def step(i):
        q, k, v = sets[i]
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    ms = time_graph(step, n)
    return dict(
        method="concat_sdpa",
        B=batch,
        Sk=sk,
        P=p,
        Sq=sq,
        ms=ms,
        TBps_concat_bytes=batch * total * HKV * D * 4 / ms / 1e9,
    )


def bench_paged(batch, sk, p, *, page_size=16, path=None, dtype=torch.bfloat16):
    max_pages = math.ceil(sk / page_size)
    num_pages = batch * max_pages
    n = _copies(batch * sk * HKV * D * 4)
    sets = []
    for _ in range(n):
        kc = torch.randn(num_pages, page_size, HKV, D, device="cuda", dtype=dtype)
        vc = torch.randn_like(kc)
        bt = torch.randperm(num_pages, device="cuda").view(batch, max_pages).int()
        sl = torch.full((batch,), sk, dtype=torch.int32, device="cuda")
        q = torch.randn(batch, HQ, 1, D, device="cuda", dtype=dtype)
        pk = torch.randn(HKV, p, D, device="cuda", dtype=dtype) if p else None
        pv = torch.randn_like(pk) if p else None
        sets.append((q, kc, vc, bt, sl, pk, pv))

    def step(i):
        with td.force(path=path):
            return prefix_attention_paged(*sets[i], backend="triton")

    ms = time_graph(step, n)
    needed = (batch * sk + p) * HKV * D * 2 * 2
    return dict(
        method="prefixattn_triton",
        layout=f"paged{page_size}",
        path=path or "auto",
        B=batch,
        Sk=sk,
        P=p,
        Sq=1,
        ms=ms,
        TBps_needed_bytes=needed / ms / 1e9,
        pct_of_copy_ceiling=100 * needed / ms / 1e9 / COPY_CEILING_TBPS,
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args(argv)
    results = []

    def record(r):
        results.append(r)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}), flush=True)
        if a.out:
            with open(a.out, "w") as f:
                json.dump(results, f, indent=1)

    # Targets (issue 4): bandwidth at B=128 Sk=2048; 2x concat at B=128 Sk=256 P=512; never slower at B=1.
    for p in (0, 16, 128, 512):
        record(bench_contiguous(128, 2048, p))
        record(bench_concat_sdpa(128, 2048, p))
    for path in (None, "fused", "cascade"):
        record(bench_contiguous(128, 256, 512, path=path))
    record(bench_contiguous(128, 256, 512, pool=4))
    record(bench_concat_sdpa(128, 256, 512))
    for sk in (2048, 16384):
        for p in (0, 128):
            record(bench_contiguous(1, sk, p))
            record(bench_concat_sdpa(1, sk, p))
    record(bench_paged(128, 2048, 128))
    record(bench_paged(1, 16384, 128))
    if a.quick:
        return 0
    # Cost-model calibration: both paths forced across batch, cache and prefix lengths.
    for batch in (8, 32, 128):
        for sk in (256, 2048):
            for p in (128, 2048):
                for path in ("fused", "cascade"):
                    record(bench_contiguous(batch, sk, p, path=path))
    for p in (0, 512):
        record(bench_contiguous(32, 2048, p))
        record(bench_concat_sdpa(32, 2048, p))
    return 0


if __name__ == "__main__":
    sys.exit(main())
