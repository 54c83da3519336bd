"""The Triton training kernels compile for sm_90 (H100/H200) to wgmma without register spills.

Runs tests/triton_sm90_compile.py in a subprocess (the interpreter must be off to compile): no GPU is needed,
only the ptxas and cuobjdump that ship with Triton. Guards the config table against spills and against code
the interpreter accepts but the compiler rejects.
"""

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
# The training hot path (bf16, D=128) with and without every optional feature, and a GQA/D=64 variant.
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
def compiled():
    if not (_bundled_tool("ptxas") and _bundled_tool("cuobjdump")):
        pytest.skip("Triton's bundled ptxas/cuobjdump are not available")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "triton_sm90_compile.py"), "--json", *SCENARIOS],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


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
