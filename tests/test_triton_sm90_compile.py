"""prefixattn's Triton kernels compile for sm_90 (H100/H200): training kernels to wgmma without register spills,
decode kernels of every kind, with tensor cores and without spills on the 16-bit hot path.

Runs tools/sm90_compile.py --quick in a subprocess (the interpreter must be off to compile): no GPU is needed,
only the ptxas and cuobjdump that ship with Triton. Guards the config tables against spills and against code
the interpreter accepts but the compiler rejects (constexpr rules, dot shapes, dtype mixes).
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The training scenarios of --quick: the hot path (bf16, D=128) with and without every optional feature, and a
# GQA/D=64 variant.
SCENARIOS = ["bf16-d128-causal", "bf16-d128-pool-pad-bias", "fp16-d64-noncausal-gqa"]
MAIN_KERNELS = {"_prefix_attention_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel", "_prefix_partial_kernel"}


def _bundled_tool(name):
    try:
        import triton
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.path.exists(path) else None


@pytest.fixture(scope="module")
def rows():
    if not (_bundled_tool("ptxas") and _bundled_tool("cuobjdump")):
        pytest.skip("Triton's bundled ptxas/cuobjdump are not available")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "sm90_compile.py"), "--quick", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert proc.stdout.strip(), proc.stderr[-4000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0, [r for r in found if "error" in r] or proc.stderr[-4000:]
    return found


@pytest.fixture(scope="module")
def compiled(rows):
    return [r for r in rows if r["family"] == "training"]


@pytest.fixture(scope="module")
def decode(rows):
    return [r for r in rows if r["family"] == "decode"]


def test_every_kernel_compiles(compiled):
    for scenario in SCENARIOS:
        names = {r["kernel"] for r in compiled if r["scenario"] == scenario and r["deterministic"]}
        assert MAIN_KERNELS | {"_bwd_preprocess_kernel", "_prefix_reduce_kernel"} <= names, (scenario, names)


def test_fused_dq_variants_compile_with_atomics(compiled):
    """deterministic=False compiles its own dK/dV and prefix kernels, which add dQ with fp32 atomics (and
    the deterministic ones have none)."""
    for scenario in SCENARIOS:
        rows = [r for r in compiled if r["scenario"] == scenario]
        fused = {r["kernel"]: r for r in rows if not r["deterministic"]}
        assert set(fused) == {"_bwd_dkdv_kernel", "_prefix_partial_kernel"}, (scenario, set(fused))
        assert all(r["atomics"] > 0 for r in fused.values()), fused
        assert all(r["atomics"] == 0 for r in rows if r["deterministic"]), scenario


def test_sdpa_backend_kernels_compile(compiled):
    """The sdpa backend's Triton parts (prefix merge forward, prefix-keys-only dQ) in every scenario; on the
    hot path they use wgmma without spills."""
    for scenario in SCENARIOS:
        rows = {r["kernel"]: r for r in compiled if r["scenario"] == scenario and r.get("sdpa")}
        assert set(rows) == {"_prefix_merge_fwd_kernel", "_bwd_dq_kernel"}, (scenario, set(rows))
        if scenario == "bf16-d128-causal":
            assert all(r["wgmma"] and r["stack"] == 0 for r in rows.values()), rows


def test_hot_path_uses_wgmma_without_spills(compiled):
    """Both backward variants: the deterministic kernels and the fused-dQ ones of deterministic=False."""
    for r in compiled:
        if r.get("sdpa"):
            continue  # test_sdpa_backend_kernels_compile
        if r["kernel"] not in MAIN_KERNELS or r["scenario"] == "bf16-d128-pool-pad-bias":
            continue
        if r["kernel"] == "_prefix_partial_kernel" and r["scenario"] == "fp16-d64-noncausal-gqa":
            continue  # P=16: a 16-row prefix block is below wgmma's 64-row minimum (mma.sync instead)
        assert r["wgmma"], r
        assert r["stack"] == 0, r  # no register spills


def test_decode_kernels_compile(decode):
    """One decode program of each kind (fused with a shared prefix; cascade over a paged cache with a pool,
    prefix lengths, G=8 and Sq=4; fused pool with a padding mask and splits) and the split merge."""
    assert not [r for r in decode if "error" in r], decode
    kinds = sorted(r["kernel"] for r in decode)
    assert kinds == ["decode_kernel"] * 3 + ["merge_kernel"], kinds


def test_decode_16bit_paths_use_tensor_cores_without_spills(decode):
    """bf16/fp16 decode programs run their dots on tensor cores (mma.sync or wgmma) and keep everything in
    registers. (The fp32 variant computes in full precision without tensor cores and is not held to this.)"""
    half = [r for r in decode if r["kernel"] == "decode_kernel" and not r["scenario"].startswith("fp32")]
    assert len(half) == 2, decode
    for r in half:
        assert r["mma"] or r["wgmma"], r
        assert r["stack"] == 0, r  # no register spills
