"""Compile the decode kernels for sm_90 without a GPU: `python -m prefixattn.kernels._decode_compile_check`.

The interpreter accepts things the compiler rejects (dot shapes, dtype mixes, constexpr rules), and the
GPU time to find out is scarce, so this builds the PTX/cubin of the main variants on the CPU. Must run
without TRITON_INTERPRET (the kernels are defined as compiled functions at import). Prints one line per
variant with its shared memory, exits non-zero on the first failure.
"""

from __future__ import annotations

import itertools
import os
import sys

TARGET = ("cuda", 90, 32)


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


def compile_one(kernel, values, num_warps=4, num_stages=3):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, constexprs, attrs = _signature(kernel, values)
    src = ASTSource(kernel, sig, constexprs, attrs)
    return triton.compile(src, target=GPUTarget(*TARGET), options={"num_warps": num_warps, "num_stages": num_stages})


def main(quick: bool = False) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("0", ""):
        print("unset TRITON_INTERPRET: this compiles the kernels for sm_90", file=sys.stderr)
        return 2
    import torch

    from prefixattn.kernels import _decode_kernels as kern
    from prefixattn.kernels._triton_config import decode_config

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
            cfg = decode_config(hd, dtypes[dtype])
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
        cfg = decode_config(hd, dtypes[dtype])
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
    bf = decode_config(128, torch.bfloat16)
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
    failures = 0
    for name, cfg, kw in variants:
        try:
            c = compile_one(kern.decode_kernel, decode_variant(**kw), cfg.num_warps, cfg.num_stages)
            print(f"ok   decode {name}: shared {c.metadata.shared} B")
        except Exception as exc:  # report and go on, so one run shows every broken variant
            failures += 1
            print(f"FAIL decode {name}: {type(exc).__name__}: {str(exc)[:2000]}")
    for dtype, hd, pool_slot0 in (
        (("fp16", 96, True),) if quick else (("bf16", 128, False), ("fp32", 64, True), ("fp16", 96, True))
    ):
        try:
            c = compile_one(kern.merge_kernel, merge_variant(dtype=dtype, head_dim=hd, pool_slot0=pool_slot0))
            print(f"ok   merge {dtype} D={hd} pool_slot0={pool_slot0}: shared {c.metadata.shared} B")
        except Exception as exc:
            failures += 1
            print(f"FAIL merge {dtype} D={hd}: {type(exc).__name__}: {str(exc)[:2000]}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(quick="--quick" in sys.argv))
