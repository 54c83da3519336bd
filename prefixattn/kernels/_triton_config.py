"""Fixed launch configurations of every Triton kernel (no autotune sweeps: GPU compile time is scarce).

Training kernels: one small table per (kernel, dtype class, head-dim bucket), config_for(); the reasoning
behind each entry is in benchmarks/NOTES.md ("Triton training kernels"). Under the interpreter every training
kernel uses 16 x 16 tiles so that tiny test shapes still run several tiles per loop (prefix tail, causal band,
multi-tile sequences). Decode kernels: decode_config(), a rule per (head dim, dtype) (NOTES.md, "Decode
kernels"); their query tile follows the problem (triton_decode's plan), and tests choose small key blocks
through an explicit plan.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import triton_interpreting

MIN_HEAD_DIM = 16  # the decode kernels: tl.dot needs K >= 16 (the training kernels pad smaller head dims)
MAX_HEAD_DIM = 256  # every Triton kernel: 256 keeps the tiles within shared memory


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch parameters of one kernel.

    block_m: query rows per tile; block_n: key rows per tile (for the prefix dK/dV kernel, prefix rows).
    """

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def head_dim_block(head_dim: int) -> int:
    """The head dim padded to a power of two (tl.arange needs one; tl.dot needs >= 16)."""
    return max(16, next_pow2(head_dim))


def _bucket(head_dim: int) -> int:
    block = head_dim_block(head_dim)
    return 64 if block <= 64 else block  # 16/32/64 -> 64, 128, 256


def _dtype_class(dtype: torch.dtype) -> str:
    if dtype in (torch.float16, torch.bfloat16):
        return "16bit"
    return "fp32" if dtype == torch.float32 else "fp64"


C = KernelConfig
# Hopper (sm_90), 16-bit inputs: tl.dot lowers to wgmma when a warpgroup (4 warps) owns >= 64 rows of M.
# fp32 inputs use input_precision="ieee" (no tensor cores), fp64 is for exact checks: small tiles, no pressure.
_TABLE: dict[str, dict[str, dict[int, KernelConfig]]] = {
    "fwd": {
        "16bit": {64: C(128, 64, 4, 3), 128: C(128, 128, 8, 2), 256: C(64, 64, 8, 2)},
        "fp32": {64: C(64, 32, 8, 2), 128: C(16, 32, 4, 2), 256: C(16, 32, 4, 2)},
        "fp64": {64: C(32, 32, 4, 1), 128: C(16, 16, 4, 1), 256: C(16, 16, 4, 1)},
    },
    # dQ: one query tile against all key tiles (block_m queries resident, block_n keys per step).
    "bwd_dq": {
        "16bit": {64: C(128, 64, 8, 2), 128: C(128, 64, 8, 2), 256: C(64, 32, 8, 2)},
        "fp32": {64: C(64, 32, 8, 2), 128: C(32, 32, 4, 2), 256: C(16, 16, 4, 2)},
        "fp64": {64: C(32, 32, 4, 1), 128: C(16, 16, 4, 1), 256: C(16, 16, 4, 1)},
    },
    # dK/dV of sequence keys: block_n keys resident (dK, dV accumulators), block_m queries per step.
    "bwd_dkdv": {
        "16bit": {64: C(32, 128, 8, 2), 128: C(32, 128, 8, 2), 256: C(32, 32, 8, 1)},
        "fp32": {64: C(16, 32, 4, 2), 128: C(16, 32, 4, 2), 256: C(16, 32, 8, 2)},
        "fp64": {64: C(16, 32, 4, 1), 128: C(16, 16, 4, 1), 256: C(16, 16, 4, 1)},
    },
    # deterministic=False: the dK/dV kernel also computes dQ = dS K for each query step (atomics). The extra
    # [block_m, D] fp32 product spills at D=128 with 32 queries per step (48 B); 16 per step does not (232 regs).
    "bwd_dkdv_fused": {
        "16bit": {64: C(32, 128, 8, 2), 128: C(16, 128, 8, 2), 256: C(32, 32, 8, 1)},
        "fp32": {64: C(16, 32, 4, 2), 128: C(16, 32, 4, 2), 256: C(16, 32, 8, 2)},
        "fp64": {64: C(16, 32, 4, 1), 128: C(16, 16, 4, 1), 256: C(16, 16, 4, 1)},
    },
    # dK/dV of the prefix (partials per chunk): block_n prefix rows resident, block_m queries per step.
    "bwd_prefix": {
        "16bit": {64: C(32, 128, 8, 2), 128: C(32, 128, 8, 2), 256: C(32, 32, 4, 1)},
        "fp32": {64: C(32, 64, 8, 2), 128: C(32, 32, 4, 2), 256: C(16, 32, 4, 2)},
        "fp64": {64: C(32, 32, 4, 1), 128: C(16, 16, 4, 1), 256: C(16, 16, 4, 1)},
    },
}

_INTERPRETER = KernelConfig(16, 16, 4, 1)

# Benchmarks may pin a config per kernel name to compare candidates without editing the table.
OVERRIDES: dict[str, KernelConfig] = {}


def config_for(kernel: str, head_dim: int, dtype: torch.dtype, *, interpreting: bool | None = None) -> KernelConfig:
    """The launch configuration of `kernel` ("fwd", "bwd_dq", "bwd_dkdv", "bwd_dkdv_fused", "bwd_prefix")."""
    if kernel in OVERRIDES:
        return OVERRIDES[kernel]
    if interpreting if interpreting is not None else triton_interpreting():
        return _INTERPRETER
    return _TABLE[kernel][_dtype_class(dtype)][_bucket(head_dim)]


def dot_precision(dtype: torch.dtype) -> str:
    """fp32/fp64 dots in full precision (no tf32), so fp32 results meet the fp32 tolerance."""
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation / statistics dtype: fp32, or fp64 for fp64 inputs (exact interpreter checks)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class DecodeConfig:
    """Key tile and launch parameters of the decode kernel (its query tile, block_m, comes from the plan)."""

    block_n: int
    num_warps: int
    num_stages: int


def decode_config(head_dim: int, dtype: torch.dtype) -> DecodeConfig:
    """Fixed table per (head dim, dtype): K and V tiles of BLOCK_N x D; 3 stages (2 for the big tiles)
    keep shared memory at 22-140 KB (compile check), so 1-3 programs fit an SM."""
    block_d = head_dim_block(head_dim)
    elem = 4 if dtype == torch.float32 else 2
    tile_bytes = 2 * block_d * elem  # K + V bytes per key
    block_n = 64 if tile_bytes * 64 <= 32 * 1024 else 32
    stages = 3 if tile_bytes * block_n <= 32 * 1024 else 2
    # D = 256: a 64-row fp32 accumulator is 64 KB; 8 warps keep it at 64 registers a thread (no spills).
    return DecodeConfig(block_n=block_n, num_warps=8 if block_d > 128 else 4, num_stages=stages)
