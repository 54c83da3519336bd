"""Time the Triton training kernels on the baseline shape of docs/design.md and compare a few launch configs (GPU only).

B=4, H=32, S=2048, D=128, bf16, causal, P in {16, 128, 512}; forward and forward+backward, kernels called
directly (no op-layer overhead), against cuDNN SDPA with no prefix on the same GPU (the floor). Also times
alternative configs per kernel (one kernel changed at a time), and the opt-in deterministic=False backward
(dQ by fp32 atomics, its own dK/dV config "bwd_dkdv_fused"), so the table in
prefixattn/kernels/_triton_config.py can be corrected from one run. Compile time is ~1-2 s per variant.

    python benchmarks/triton_training_configs.py [--quick] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch

CANDIDATES = {  # (block_m, block_n, num_warps, num_stages); the first of each list is compared to the default
    "fwd": [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3)],
    "bwd_dq": [(128, 128, 8, 2), (64, 64, 4, 2)],
    "bwd_dkdv": [(64, 128, 8, 2), (64, 64, 4, 2)],
    "bwd_prefix": [(64, 128, 8, 2), (64, 64, 4, 2)],
    # deterministic=False only (timed with it): 32 queries per step spills 48 B at D=128, 64 keys halves N
    "bwd_dkdv_fused": [(32, 128, 8, 2), (32, 64, 8, 2)],
}


def flops(batch, heads, seq, prefix, dim, causal=True):
    """Forward FLOPs: 4 B H S D x (visible sequence keys per query + P). Backward convention: 2.5 x forward."""
    seq_keys = seq * (seq + 1) / 2 if causal else seq * seq
    return 4 * batch * heads * dim * (seq_keys + seq * prefix)


def bench(fn, reps=50):
    from triton.testing import do_bench

    return do_bench(fn, warmup=10, rep=reps, return_mode="median")


def make(batch, heads, seq, prefix, dim, dtype, device):
    g = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=dtype)

    # transformers' layout: [B, S, H, D] memory viewed as [B, H, S, D]
    q, k, v = (rnd(batch, seq, heads, dim).transpose(1, 2) for _ in range(3))
    pk, pv = (rnd(heads, prefix, dim) if prefix else None for _ in range(2))
    return q, k, v, pk, pv


def time_prefixattn(batch, heads, seq, prefix, dim, dtype, device, overrides=None, deterministic=True):
    from prefixattn.kernels import _triton_config, triton_bwd, triton_fwd

    _triton_config.OVERRIDES.clear()
    _triton_config.OVERRIDES.update(overrides or {})
    try:
        q, k, v, pk, pv = make(batch, heads, seq, prefix, dim, dtype, device)
        scale = dim**-0.5
        args = (None, None, None, None, True, scale)
        out, lse = triton_fwd.forward(q, k, v, pk, pv, *args)
        dout = torch.randn_like(out)

        def fwd():
            triton_fwd.forward(q, k, v, pk, pv, *args)

        def fwd_bwd():
            o, l = triton_fwd.forward(q, k, v, pk, pv, *args)
            triton_bwd.backward(
                dout, None, q, k, v, pk, pv, None, None, None, None, o, l, True, scale, deterministic=deterministic
            )

        t0 = time.perf_counter()
        fwd_bwd()  # compile
        torch.cuda.synchronize()
        compile_s = time.perf_counter() - t0
        return bench(fwd), bench(fwd_bwd), compile_s
    finally:
        _triton_config.OVERRIDES.clear()


def time_cudnn(batch, heads, seq, dim, dtype, device):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    q, k, v, _, _ = make(batch, heads, seq, 0, dim, dtype, device)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    dout = torch.randn(batch, heads, seq, dim, device=device, dtype=dtype)
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):

        def fwd():
            with torch.no_grad():
                sdpa(q, k, v, is_causal=True)

        def fwd_bwd():
            torch.autograd.grad(sdpa(q, k, v, is_causal=True), (q, k, v), dout)

        try:
            fwd_bwd()
            return bench(fwd), bench(fwd_bwd)
        except RuntimeError as e:  # cuDNN unavailable for this build/shape
            print(f"cuDNN SDPA unavailable: {e}", file=sys.stderr)
            return math.nan, math.nan


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="P=128 only, no alternative configs")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    from prefixattn.kernels import triton_bwd, triton_fwd

    device, dtype = torch.device("cuda"), torch.bfloat16
    B, H, S, D = 4, 32, 2048, 128
    rows = []
    floor_f, floor_fb = time_cudnn(B, H, S, D, dtype, device)
    print(
        f"{torch.cuda.get_device_name()}: B={B} H={H} S={S} D={D} bf16 causal; "
        f"cuDNN no prefix fwd {floor_f:.3f} ms, fwd+bwd {floor_fb:.3f} ms"
    )
    print(f"default configs: fwd {triton_fwd.configs_for(D, dtype)}; bwd {triton_bwd.configs_for(D, dtype)}")
    print(
        f"{'P':>4} {'variant':<28} {'fwd ms':>7} {'TF/s':>5} {'target':>6} {'f+b ms':>7} {'TF/s':>5} "
        f"{'target':>6} {'compile':>7}"
    )
    for P in [128] if args.quick else [16, 128, 512]:
        fl = flops(B, H, S, P, D)
        scale = 1 + 2 * P / S
        # deterministic=False: the fused-dQ backward (fp32 atomics), opt-in via prefix_attention(deterministic=False)
        variants = [("default", None, True), ("deterministic=False", None, False)]
        if not args.quick and P == 128:
            variants += [
                (f"{name}={cfg}", {name: cfg}, name != "bwd_dkdv_fused")
                for name, cfgs in CANDIDATES.items()
                for cfg in cfgs
            ]
        for label, ovr, deterministic in variants:
            from prefixattn.kernels._triton_config import KernelConfig

            overrides = {k: KernelConfig(*c) for k, c in (ovr or {}).items()}
            try:
                t_f, t_fb, comp = time_prefixattn(B, H, S, P, D, dtype, device, overrides, deterministic)
            except Exception as e:  # a candidate that does not fit (shared memory) is reported, not fatal
                print(f"{P:>4} {label:<28} failed: {type(e).__name__}: {str(e)[:80]}")
                continue
            row = dict(
                P=P,
                variant=label,
                deterministic=deterministic,
                fwd_ms=t_f,
                fwd_bwd_ms=t_fb,
                fwd_tflops=fl / t_f / 1e9,
                fwd_bwd_tflops=3.5 * fl / t_fb / 1e9,
                target_fwd_ms=1.2 * floor_f * scale,
                target_fwd_bwd_ms=1.3 * floor_fb * scale,
                compile_s=comp,
            )
            rows.append(row)
            print(
                f"{P:>4} {label:<28} {t_f:7.3f} {row['fwd_tflops']:5.0f} {row['target_fwd_ms']:6.3f} "
                f"{t_fb:7.3f} {row['fwd_bwd_tflops']:5.0f} {row['target_fwd_bwd_ms']:6.3f} {comp:6.1f}s",
                flush=True,
            )
    print("TF/s: forward FLOPs / time; fwd+bwd counts 3.5 x forward FLOPs (backward = 2.5 x by convention)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                dict(
                    device=torch.cuda.get_device_name(),
                    torch=torch.__version__,
                    cudnn_fwd_ms=floor_f,
                    cudnn_fwd_bwd_ms=floor_fb,
                    rows=rows,
                ),
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
