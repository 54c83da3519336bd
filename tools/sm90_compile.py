"""Compile prefixattn's Triton kernels for sm_90 (H100/H200) on a machine without a GPU, and report resources.

The interpreter accepts things the compiler rejects (constexpr and type rules, tl.dot shape limits, dtype
mixes) and says nothing about registers, and GPU time to find out is scarce. This compiles the kernels with
the ptxas that ships with Triton and reads every cubin with its cuobjdump: registers, stack (= spills),
shared memory, whether wgmma (HGMMA) or mma.sync (HMMA) was emitted, and atomics in the PTX. Two families:

  training  forward, both backwards (deterministic, and the fused-dQ one of deterministic=False) and the
            sdpa backend's Triton parts. A stand-in driver reports an sm_90 target and every launch the
            launchers make on CPU tensors becomes a compile-only warmup, so exactly what a call compiles is
            reported (scenarios below).
  decode    the decode and merge kernels, compiled directly from example signatures (pointer dtypes, ints,
            constexprs), so that paged, cascade, pool and split variants need no inputs built for them.

Run from the repository root with TRITON_INTERPRET unset:
    python tools/sm90_compile.py [--family training|decode|all] [--quick] [--json] [scenario ...]
Scenario names select training scenarios. --quick compiles the training hot-path scenarios and one decode
program of each kind (what tests/test_triton_sm90_compile.py runs). Exits non-zero if a kernel fails to
compile.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = ("cuda", 90, 32)


def _use_this_checkout() -> None:
    """Import prefixattn (and the test helpers that build the training inputs) from this checkout."""
    for path in (os.path.join(ROOT, "tests"), ROOT):
        if path not in sys.path:
            sys.path.insert(0, path)


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def resources(kernel, cuobjdump: str) -> dict:
    """What the compiled kernel uses, from its cubin (cuobjdump) and PTX."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
        path = f.name
    try:
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", path], capture_output=True, text=True).stdout
        sass = subprocess.run([cuobjdump, "--dump-sass", path], capture_output=True, text=True).stdout
    finally:
        os.unlink(path)
    m = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    ptx = kernel.asm.get("ptx", "")
    return {
        "atomics": len(re.findall(r"\b(?:red|atom)\.", ptx)),
        "registers": int(m.group(1)) if m else None,
        "stack": int(m.group(2)) if m else None,
        "shared": kernel.metadata.shared,
        "wgmma": "HGMMA" in sass,
        "mma": "HMMA" in sass,
    }


# ---------------------------------------------------------------------------------------------- training

# (label, dtype, head_dim, case overrides, causal, with_bias)
SCENARIOS = [
    ("bf16-d128-causal", "bfloat16", 128, dict(prefix_len=128, noncontiguous=True), True, False),
    (
        "bf16-d128-pool-pad-bias",
        "bfloat16",
        128,
        dict(pool=3, lengths=True, padding="random", prefix_len=40),
        True,
        True,
    ),
    ("fp16-d64-noncausal-gqa", "float16", 64, dict(heads_q=8, heads_kv=2, prefix_len=16, seqlen_q=100), False, False),
    ("fp16-d256-causal", "float16", 256, dict(prefix_len=5), True, False),
    ("bf16-d256-pad-bias", "bfloat16", 256, dict(prefix_len=77, padding="random"), True, True),
    ("bf16-d96-causal-pad", "bfloat16", 96, dict(prefix_len=33, padding="left"), True, False),
    ("fp16-d32-mqa", "float16", 32, dict(heads_q=4, heads_kv=1, prefix_len=1), True, False),
    ("fp32-d128-causal", "float32", 128, dict(prefix_len=20, pool=2), True, False),
    ("bf16-d128-noprefix", "bfloat16", 128, dict(prefix_len=0), True, False),
]
# The training hot path (bf16, D=128) with and without every optional feature, and a GQA/D=64 variant.
QUICK_SCENARIOS = ("bf16-d128-causal", "bf16-d128-pool-pad-bias", "fp16-d64-noncausal-gqa")
# Kernels compiled a second time (FUSE_DQ=True) for deterministic=False.
FUSED_DQ_KERNELS = ("_bwd_dkdv_kernel", "_prefix_partial_kernel")
SDPA_KERNELS = ("_prefix_merge_fwd_kernel", "_bwd_dq_kernel")


class _Sm90Driver:
    """Enough of a Triton driver to compile for sm_90 without CUDA."""

    @classmethod
    def is_active(cls):
        return True

    def map_python_to_cpp_type(self, ty):
        from triton.backends.nvidia.driver import ty_to_cpp

        return ty_to_cpp(ty)

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")

    def get_benchmarker(self):
        raise NotImplementedError

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


def compile_training(only=None) -> list:
    """One row per compiled training kernel and scenario (all scenarios, or those named in `only`)."""
    _use_this_checkout()
    import torch
    import triton
    from triton.runtime.jit import JITFunction

    triton.runtime.driver.set_active(_Sm90Driver())
    cuobjdump = _cuobjdump()
    compiled = []
    original_run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = original_run(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.append((self.fn.__name__, kwargs.get("num_warps"), kwargs.get("num_stages"), kernel))
        return kernel

    JITFunction.run = compile_only
    from helpers import Case

    from prefixattn.kernels import _triton_prefix_merge, triton_bwd, triton_fwd

    results = []
    for label, dtype_name, head_dim, overrides, causal, with_bias in SCENARIOS:
        if only and label not in only:
            continue
        dtype = getattr(torch, dtype_name)
        fields = dict(batch=2, heads_q=4, heads_kv=2, seqlen_q=256, seqlen_k=256, head_dim=head_dim, causal=causal)
        fields.update(overrides)
        case = Case(**fields)
        (q, k, v, pk, pv), args = case.make(dtype=dtype, requires_grad=False)
        bias = torch.randn(1, q.shape[1], q.shape[2], k.shape[2], dtype=dtype) if with_bias else None
        common = (pk, pv, args.get("prefix_index"), args.get("prefix_lengths"), args.get("key_padding_mask"), bias)
        compiled.clear()
        triton_fwd.forward(q, k, v, *common, causal, head_dim**-0.5)
        out = torch.randn(q.shape[0], q.shape[2], q.shape[1], head_dim, dtype=dtype).transpose(1, 2)
        lse = torch.randn(q.shape[:3], dtype=torch.float32)
        triton_bwd.backward(
            torch.randn_like(out), torch.randn_like(lse), q, k, v, *common, out, lse, causal, head_dim**-0.5
        )
        n_deterministic = len(compiled)
        # The opt-in fused-dQ backward (atomics): its dK/dV and prefix kernels are separate compiled variants.
        triton_bwd.backward(
            torch.randn_like(out),
            torch.randn_like(lse),
            q,
            k,
            v,
            *common,
            out,
            lse,
            causal,
            head_dim**-0.5,
            deterministic=False,
        )
        n_fused = len(compiled)
        # The sdpa backend's Triton parts: the prefix merge forward and the prefix-keys-only dQ (dq +=).
        pidx, plen = args.get("prefix_index"), args.get("prefix_lengths")
        if pk is not None:
            _triton_prefix_merge.merge_prefix(
                q, pk, pv, pidx, plen, torch.randn_like(q), lse, head_dim**-0.5, torch.empty_like(q)
            )
            triton_bwd.prefix_backward(
                torch.randn_like(out), None, q, pk, pv, pidx, plen, out, lse, torch.randn_like(q), head_dim**-0.5
            )
        for i, (name, warps, stages, kernel) in enumerate(compiled):
            deterministic = i < n_deterministic or i >= n_fused
            if n_deterministic <= i < n_fused and name not in FUSED_DQ_KERNELS:
                continue  # the same compiled kernel as in the deterministic backward
            if i >= n_fused and name not in SDPA_KERNELS:
                continue  # preprocess / prefix partials: the kernels the triton backward compiled already
            results.append(
                dict(
                    family="training",
                    scenario=label,
                    kernel=name,
                    deterministic=deterministic,
                    sdpa=i >= n_fused,
                    num_warps=warps,
                    num_stages=stages,
                    **resources(kernel, cuobjdump),
                )
            )
    return results


# ---------------------------------------------------------------------------------------------- decode


def _signature(kernel, values: dict):
    """ASTSource signature, constexprs and attrs from example values (pointer dtype strings, ints, floats,
    None). Like the JIT on a GPU, pointers (16-byte aligned allocations) and ints divisible by 16 get the
    divisibility hint that enables vectorised and asynchronous loads."""
    sig, constexprs, attrs = {}, {}, {}
    for name in kernel.arg_names:
        value = values[name]
        param = kernel.params[kernel.arg_names.index(name)]
        index = (kernel.arg_names.index(name),)
        if isinstance(value, str) and value.startswith("*") and not param.is_constexpr:
            sig[name] = value
            attrs[index] = [["tt.divisibility", 16]]
        elif param.is_constexpr or value is None or isinstance(value, (bool, str)):
            sig[name] = "constexpr"
            constexprs[name] = value
        elif isinstance(value, int):
            sig[name] = "i32" if abs(value) < 2**31 else "i64"
            if value % 16 == 0:
                attrs[index] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{name}: unsupported example value {value!r}")
    return sig, constexprs, attrs


def decode_variant(
    *,
    dtype="bf16",
    head_dim=128,
    block_n=64,
    group=4,
    sq=1,
    paged=False,
    prefix=1,
    cascade=False,
    kpm=False,
    plen=False,
    final=True,
    num_splits=2,
):
    ptr = "*" + dtype
    block_d = max(16, 1 << (head_dim - 1).bit_length())
    block_m = min(64, max(16, 1 << max(0, (group * sq - 1).bit_length())))
    v = dict(
        Q=ptr,
        K=ptr,
        V=ptr,
        PK=ptr if prefix else None,
        PV=ptr if prefix else None,
        PIDX="*i32" if prefix == 2 else None,
        PLEN="*i64" if (plen and prefix) else None,
        KPM="*u8" if kpm else None,
        BT="*i32" if paged else None,
        SEQLEN="*i32" if paged else None,
        ORDER="*i32" if (cascade and prefix == 2) else None,
        STARTS="*i32" if (cascade and prefix == 2) else None,
        OUT=ptr,
        LSE="*fp32",
        OPART="*fp32" if not final else None,
        LPART="*fp32" if not final else None,
    )
    for name in (
        "stride_qb",
        "stride_qh",
        "stride_qs",
        "stride_kb",
        "stride_kh",
        "stride_ks",
        "stride_vb",
        "stride_vh",
        "stride_vs",
        "stride_pkn",
        "stride_pkh",
        "stride_pks",
        "stride_pvn",
        "stride_pvh",
        "stride_pvs",
        "stride_mb",
        "stride_ms",
        "stride_btb",
        "stride_ob",
        "stride_oh",
        "stride_os",
        "stride_lb",
        "stride_lh",
    ):
        v[name] = 1024
    v.update(
        BATCH=128,
        HKV=8,
        SEQ_K=2048,
        PLEN_MAX=512,
        POOL=4,
        NUM_PAGES=4096,
        PAGE_SIZE=16,
        num_splits=num_splits,
        m_tiles=3,
        cascade_programs=64,
        cascade_tiles=8,
        NSLOTS=3,
        qk_scale=0.1,
    )
    v.update(
        G=group,
        SQ=sq,
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        CASCADE_BLOCK_M=64,
        CASCADE_BLOCK_N=block_n,
        PAGED=paged,
        CAUSAL=True,
        HAS_KPM=kpm,
        PREFIX=prefix,
        CASCADE=cascade,
        HAS_PLEN=plen and prefix != 0,
        WRITE_FINAL=final,
        DOT_PREC="ieee" if dtype == "fp32" else "tf32",
    )
    return v


def merge_variant(*, dtype="bf16", head_dim=128, sq=1, nslots=5, pool_slot0=False):
    v = dict(
        OPART="*fp32",
        LPART="*fp32",
        PIDX="*i64" if pool_slot0 else None,
        OUT="*" + dtype,
        LSE="*fp32",
        stride_ob=4096,
        stride_oh=128,
        stride_os=4096,
        stride_lb=32,
        stride_lh=1,
        HQ=32,
        POOL=4,
        NSLOTS=nslots,
        SQ=sq,
        HEAD_DIM=head_dim,
        BLOCK_D=max(16, 1 << (head_dim - 1).bit_length()),
        BLOCK_S=max(2, 1 << (nslots - 1).bit_length()),
        POOL_SLOT0=pool_slot0,
    )
    return v


def _compile(kernel, values, num_warps=4, num_stages=3):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, constexprs, attrs = _signature(kernel, values)
    src = ASTSource(kernel, sig, constexprs, attrs)
    return triton.compile(src, target=GPUTarget(*TARGET), options={"num_warps": num_warps, "num_stages": num_stages})


def compile_decode(quick: bool = False) -> list:
    """One row per decode variant: its resources, or `error` when it does not compile (the others still run,
    so one run shows every broken variant)."""
    _use_this_checkout()
    import torch

    from prefixattn.kernels import _decode_kernels as kern
    from prefixattn.kernels.triton_decode import kernel_config

    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    variants = []
    if quick:  # one of each kind of program, the CI check
        for name, dtype, hd, kw in (
            ("fused shared, final", "bf16", 128, dict()),
            (
                "cascade pool paged, plen, G=8 Sq=4",
                "fp16",
                64,
                dict(prefix=2, cascade=True, paged=True, plen=True, final=False, group=8, sq=4),
            ),
            ("fused pool, padding mask, splits", "fp32", 96, dict(prefix=2, kpm=True, final=False)),
        ):
            cfg = kernel_config(hd, dtypes[dtype])
            variants.append((f"{dtype} D={hd} {name}", cfg, dict(dtype=dtype, head_dim=hd, block_n=cfg.block_n, **kw)))
    for dtype, hd in (
        ()
        if quick
        else (
            ("bf16", 128),
            ("fp16", 64),
            ("fp32", 128),
            ("bf16", 256),
            ("fp16", 96),
            ("fp32", 256),
            ("fp16", 256),
            ("fp32", 16),
        )
    ):
        cfg = kernel_config(hd, dtypes[dtype])
        variants.append((f"{dtype} D={hd} fused shared", cfg, dict(dtype=dtype, head_dim=hd, block_n=cfg.block_n)))
        variants.append(
            (
                f"{dtype} D={hd} cascade pool paged",
                cfg,
                dict(
                    dtype=dtype,
                    head_dim=hd,
                    block_n=cfg.block_n,
                    prefix=2,
                    cascade=True,
                    paged=True,
                    plen=True,
                    final=False,
                    group=8,
                    sq=4,
                ),
            )
        )
    bf = kernel_config(128, torch.bfloat16)
    for paged, prefix, cascade, kpm, group, sq, final, splits in (
        ()
        if quick
        else itertools.islice(
            itertools.product(
                (False, True), (0, 1, 2), (False, True), (False, True), (1, 8), (1, 16), (True, False), (1, 3)
            ),
            0,
            None,
            7,
        )
    ):
        if cascade and prefix == 0:
            continue
        name = (
            f"bf16 paged={paged} prefix={prefix} cascade={cascade} kpm={kpm} "
            f"G={group} Sq={sq} final={final} splits={splits}"
        )
        variants.append(
            (
                name,
                bf,
                dict(
                    paged=paged,
                    prefix=prefix,
                    cascade=cascade,
                    kpm=kpm and not paged,
                    group=group,
                    sq=sq,
                    final=final and not cascade,
                    num_splits=splits,
                ),
            )
        )
    jobs = [
        (name, kern.decode_kernel, decode_variant(**kw), cfg.num_warps, cfg.num_stages) for name, cfg, kw in variants
    ]
    for dtype, hd, pool_slot0 in (
        (("fp16", 96, True),) if quick else (("bf16", 128, False), ("fp32", 64, True), ("fp16", 96, True))
    ):
        values = merge_variant(dtype=dtype, head_dim=hd, pool_slot0=pool_slot0)
        jobs.append((f"{dtype} D={hd} pool_slot0={pool_slot0}", kern.merge_kernel, values, 4, 3))
    cuobjdump = _cuobjdump()
    rows = []
    for name, kernel, values, warps, stages in jobs:
        row = dict(family="decode", scenario=name, kernel=kernel.fn.__name__, num_warps=warps, num_stages=stages)
        try:
            row.update(resources(_compile(kernel, values, warps, stages), cuobjdump))
        except Exception as exc:  # report and go on
            row["error"] = f"{type(exc).__name__}: {str(exc)[:2000]}"
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------- command


def _line(r: dict, width: int) -> str:
    if "error" in r:
        return f"FAIL {r['family']:8s} {r['scenario']} {r['kernel']}: {r['error']}"
    tag = "" if r.get("deterministic", True) else " (fast)"
    return (
        f"{r['family']:8s} {r['scenario']:{width}s} {r['kernel'] + tag:30s} warps={r['num_warps']} "
        f"stages={r['num_stages']} regs={r['registers']} stack={r['stack']} smem={r['shared']} wgmma={r['wgmma']}"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=("training", "decode", "all"), default="all")
    parser.add_argument("--quick", action="store_true", help="the training hot path and one decode program per kind")
    parser.add_argument("--json", action="store_true", help="print the rows as one JSON list on the last line")
    parser.add_argument("scenarios", nargs="*", help="training scenarios to compile (default: all, or --quick's)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("0", ""):
        print("unset TRITON_INTERPRET: this compiles for a real GPU target", file=sys.stderr)
        return 2
    rows = []
    # Decode first: it compiles through triton.compile alone, before the training family swaps the driver.
    if args.family in ("decode", "all"):
        rows += compile_decode(quick=args.quick)
    if args.family in ("training", "all"):
        only = args.scenarios or (QUICK_SCENARIOS if args.quick else None)
        rows += compile_training(only)
    if args.json:
        print(json.dumps(rows))
    else:
        width = max((len(r["scenario"]) for r in rows), default=0)
        for r in rows:
            print(_line(r, width))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
