"""Compile the Triton training kernels for sm_90 (H100/H200) on a machine without a GPU, and report resources.

Nothing is launched: a stand-in driver reports an sm_90 target, every kernel launch becomes a compile-only
warmup, and the cubin is inspected with the cuobjdump that ships with Triton (registers, stack = spills,
shared memory, whether wgmma (HGMMA) was emitted). This catches what the interpreter cannot (constexpr/type
rules of the compiler, tl.dot shape limits, register spills) before any GPU time is spent.

Run as a script (TRITON_INTERPRET must be unset):  python tests/triton_sm90_compile.py [--json] [scenario ...]
tests/test_triton_sm90_compile.py runs it in a subprocess.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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


def _resources(kernel, cuobjdump):
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


def main(only=None) -> list:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("0", ""):
        raise SystemExit("unset TRITON_INTERPRET: this script compiles for a real GPU target")
    sys.path.insert(0, ROOT)
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import torch
    import triton
    from triton.runtime.jit import JITFunction

    triton.runtime.driver.set_active(_Sm90Driver())
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
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
                    scenario=label,
                    kernel=name,
                    deterministic=deterministic,
                    sdpa=i >= n_fused,
                    num_warps=warps,
                    num_stages=stages,
                    **_resources(kernel, cuobjdump),
                )
            )
    return results


if __name__ == "__main__":
    rows = main([a for a in sys.argv[1:] if not a.startswith("--")])
    if "--json" in sys.argv:
        print(json.dumps(rows))
    else:
        for r in rows:
            tag = "" if r["deterministic"] else " (fast)"
            print(
                f"{r['scenario']:26s} {r['kernel'] + tag:30s} warps={r['num_warps']} stages={r['num_stages']} "
                f"regs={r['registers']} stack={r['stack']} smem={r['shared']} wgmma={r['wgmma']}"
            )
