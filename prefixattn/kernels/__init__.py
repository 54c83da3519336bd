"""Kernel backends: one table of what each can do, and the one rule for choosing among them (choose).

A backend module exposes, for the dense entry (prefixattn.prefix_attention, kind "dense"):
  forward(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask, attn_bias, causal,
      scale) -> (out, lse)
  backward(dout, dlse, q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask, attn_bias,
      out, lse, causal, scale, *, deterministic) -> (dq, dk, dv, dprefix_k, dprefix_v)
  unsupported_reason(problem: validation.Problem, *, needs_grad, deterministic) -> str | None
and, if it serves the paged entry (prefixattn.prefix_attention_paged, kind "paged"):
  paged_forward(q, k_cache, v_cache, block_table, seq_lens, prefix_k, prefix_v, prefix_index, prefix_lengths,
      scale) -> (out, lse)
  unsupported_reason_paged(problem: paged.PagedProblem, *, needs_grad) -> str | None
plus new_out(q), the empty output its forwards write into (the custom ops' fake implementations return it too).
"torch" is the reference (prefixattn.reference, plain autograd) and has no module here.

Modules are imported lazily: Triton reads TRITON_INTERPRET when a kernel is defined, so tests can set
it after importing prefixattn but before the first kernel call.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..paged import PagedProblem
    from ..validation import Problem

KINDS = ("dense", "paged")


def bshd_empty(q):
    """The kernels' output buffer: [B, Sq, Hq, D] memory viewed as [B, Hq, Sq, D], so the transpose every
    transformers model does next is free. Backends expose their choice as new_out(q); the custom op's fake
    implementation calls the same function, so the declared and the real layouts cannot drift apart."""
    b, hq, sq, d = q.shape
    return q.new_empty((b, sq, hq, d)).transpose(1, 2)


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_unavailable_reason(device) -> str | None:
    """Why the Triton kernels cannot run on tensors on `device` (contiguous and paged ops alike), or None."""
    if not triton_importable():
        return "triton is not installed"
    if device.type != "cuda" and not triton_interpreting():
        return (
            f"the tensors are on {device} and Triton needs a CUDA device "
            f"(or TRITON_INTERPRET=1 to run its interpreter on the CPU)"
        )
    return None


# ---------------------------------------------------------------------------------------------------
# The table


@dataclass(frozen=True)
class Rule:
    """A region of shapes where a backend was measured faster than the ones after it ("auto" picks it there)."""

    dtypes: tuple = (torch.float16, torch.bfloat16)
    head_dims: tuple = (64, 128)
    max_seqlen_q: int = 16
    min_batch: int = 1
    max_batch: int = 1 << 30
    min_keys: int = 0  # prefix + sequence keys (paged: P + max_pages * page_size)
    max_keys: int = 1 << 30

    def matches(self, dtype: torch.dtype, head_dim: int, seqlen_q: int, batch: int, keys: int) -> bool:
        return (
            dtype in self.dtypes
            and head_dim in self.head_dims
            and seqlen_q <= self.max_seqlen_q
            and self.min_batch <= batch <= self.max_batch
            and self.min_keys <= keys <= self.max_keys
        )


EVERYWHERE = "everywhere it can run"  # an auto entry: no measured region, every supported call


@dataclass(frozen=True)
class Backend:
    """One backend's capabilities.

    load: returns its module (None for the reference). kinds: the entry points it serves. trainable: it
    has a backward. devices: where it runs, in words. auto: per kind, where "auto" picks it: EVERYWHERE,
    or the measured Rules (an empty tuple or a missing kind: never); records are tried in table order.
    """

    name: str
    load: Callable[[], ModuleType] | None
    kinds: tuple[str, ...]
    trainable: bool
    devices: str
    auto: tuple[tuple[str, object], ...] = ()

    def auto_rule(self, kind: str):
        return dict(self.auto).get(kind, ())


# Plain import statements rather than importlib.import_module: torch.compile(fullgraph=True) traces
# through backend selection and refuses importlib (a graph break).
def _load_cuda() -> ModuleType:
    from . import cuda_backend

    return cuda_backend


def _load_triton() -> ModuleType:
    from . import triton_backend

    return triton_backend


def _load_sdpa() -> ModuleType:
    from . import sdpa_backend

    return sdpa_backend


# Why "auto" picks CUDA only in one corner (H200, bf16, Hq=32, Hkv=8, D=128, Sq=1, CUDA-graph timing,
# 2026-11-30, benchmarks/results/h200-2026-11-30/decode.json). CUDA vs Triton, microseconds:
#   B=1   Sk=256  P=16/128/512:   9.8/10.0/12.6  vs  7.9/7.9/8.7      (Triton 1.2-1.4x faster)
#   B=1   Sk=2048 P=16/128/512:  19.2/20.2/20.1  vs  9.4/9.6/9.5      (Triton ~2x faster)
#   B=128 Sk=256  P=16/128/512:  55.4/61.3/93.9  vs 44.8/47.0/47.9    (Triton 1.2-2.0x faster)
#   B=128 Sk=2048 P=16/128/512: 283.6/289.7/323.3 vs 252.0/256.8/252.9 (Triton 1.1-1.3x faster)
#   paged (page 16): Triton faster at 10 of 12 points (e.g. B=128 Sk=256 P=512: 76.4 vs 109.4); CUDA
#   faster only at B=1 Sk=256 P=128/512: 11.3 vs 12.9 and 14.8 vs 15.7 (384 and 768 keys).
# So the dense rule is empty and the paged rule is that B=1 corner, limited to what was measured;
# backend="cuda" runs anywhere it is supported. Why it loses (benchmarks/NOTES.md, "CUDA decode kernels"):
# one 128-thread block per (sequence, KV head, split) with K/V streamed straight from global memory keeps
# too few bytes in flight per SM at 2 blocks/SM.
_CUDA_PAGED_FASTER = (
    Rule(dtypes=(torch.bfloat16,), head_dims=(128,), max_seqlen_q=1, max_batch=1, min_keys=384, max_keys=768),
)

# In table order, which is the order "auto" tries them in. Triton runs every call it supports on a GPU: it is
# the fastest backend that trains, and beats concat + SDPA at decode (benchmarks/NOTES.md, "Measured on the
# H200"). "sdpa" is never picked: it trains only with deterministic=False and is not faster than Triton at
# head dim 128 (prefix_attention's docstring). "torch" takes the rest, and every call on the CPU (the Triton
# interpreter is a test tool, far slower than the reference).
REGISTRY: tuple[Backend, ...] = (
    Backend(
        "cuda",
        _load_cuda,
        kinds=("dense", "paged"),
        trainable=False,
        devices="CUDA GPUs, with prefixattn._C built",
        auto=(("dense", ()), ("paged", _CUDA_PAGED_FASTER)),
    ),
    Backend(
        "triton",
        _load_triton,
        kinds=("dense", "paged"),
        trainable=True,
        devices="CUDA GPUs; the CPU under TRITON_INTERPRET=1",
        auto=(("dense", EVERYWHERE), ("paged", EVERYWHERE)),
    ),
    Backend(
        "sdpa",
        _load_sdpa,
        kinds=("dense",),
        trainable=True,
        devices="CUDA GPUs; the CPU under TRITON_INTERPRET=1",
    ),
    Backend(
        "torch",
        None,
        kinds=("dense", "paged"),
        trainable=True,
        devices="any",
        auto=(("dense", EVERYWHERE), ("paged", EVERYWHERE)),
    ),
)
_BY_NAME = {b.name: b for b in REGISTRY}
KERNEL_BACKENDS = tuple(b.name for b in REGISTRY if b.load is not None)


def record(name: str) -> Backend:
    if name not in _BY_NAME:
        raise ValueError(f"backend: expected one of {sorted(_BY_NAME)}, got {name!r}")
    return _BY_NAME[name]


def get_backend(name: str) -> ModuleType:
    """The module of kernel backend `name` ("torch", the reference, has none)."""
    load = record(name).load
    if load is None:
        raise ValueError(f"backend: expected one of {sorted(KERNEL_BACKENDS)}, got {name!r}")
    return load()


# ---------------------------------------------------------------------------------------------------
# Choosing


def unsupported_reason(
    name: str, problem: Problem | PagedProblem, kind: str = "dense", *, needs_grad: bool, deterministic: bool = True
) -> str | None:
    """Why backend `name` cannot run this problem of entry `kind`, or None if it can."""
    rec = record(name)
    if kind not in rec.kinds:
        return f"it has no {kind} entry (it serves {' and '.join(rec.kinds)} calls)"
    if rec.load is None:
        return None
    impl = get_backend(name)
    if kind == "paged":
        return impl.unsupported_reason_paged(problem, needs_grad=needs_grad)
    return impl.unsupported_reason(problem, needs_grad=needs_grad, deterministic=deterministic)


def _keys(problem, kind: str) -> int:
    if kind == "paged":
        return problem.prefix_len + problem.max_pages * problem.page_size
    return problem.prefix_len + problem.seqlen_k


def preferred(name: str, problem: Problem | PagedProblem, kind: str = "dense") -> bool:
    """Whether "auto" may pick backend `name` for this problem (its auto entry in the table)."""
    rule = record(name).auto_rule(kind)
    if rule == EVERYWHERE:
        return True
    keys = _keys(problem, kind)
    return any(r.matches(problem.dtype, problem.head_dim, problem.seqlen_q, problem.batch, keys) for r in rule)


def choose(
    requested: str,
    problem: Problem | PagedProblem,
    kind: str = "dense",
    *,
    needs_grad: bool = False,
    deterministic: bool = True,
    dropout_p: float = 0.0,
    bias_needs_grad: bool = False,
) -> str:
    """The backend that runs this call: `requested` itself, or for "auto" the first backend in REGISTRY whose
    auto entry covers the problem and that can run it ("torch" for every call on the CPU).

    An explicitly requested backend that cannot run the call is refused with a ValueError that names
    `backend` (or the argument at fault) and the reason; it is never silently replaced. Only "auto" chooses.
    problem: validation.Problem (kind "dense") or paged.PagedProblem (kind "paged"). dropout_p and
    bias_needs_grad describe dense calls: only the reference has dropout and an attn_bias gradient.
    """
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
    if requested == "auto":
        if dropout_p > 0.0 or bias_needs_grad or problem.device.type != "cuda":
            return "torch"
        for rec in REGISTRY:
            if kind in rec.kinds and preferred(rec.name, problem, kind):
                reason = unsupported_reason(rec.name, problem, kind, needs_grad=needs_grad, deterministic=deterministic)
                if reason is None:
                    return rec.name
        return "torch"
    if requested == "torch":
        return "torch"
    if dropout_p > 0.0:
        raise ValueError(
            f"dropout_p: backend {requested!r} has no attention dropout; got dropout_p={dropout_p} "
            f"(use backend='torch' or 'auto')"
        )
    if bias_needs_grad:
        raise ValueError(
            f"attn_bias: backend {requested!r} does not compute a gradient for attn_bias, but it "
            f"requires grad (detach it, or use backend='torch')"
        )
    reason = unsupported_reason(requested, problem, kind, needs_grad=needs_grad, deterministic=deterministic)
    if reason is not None:
        raise ValueError(f"backend: {requested!r} cannot run this call: {reason}")
    return requested
