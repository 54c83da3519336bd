"""Kernel backends and the rules for choosing one.

Each backend module exposes forward(...) -> (out, lse) and backward(...) -> (dq, dk, dv, dpk, dpv) with
the argument order used by prefixattn.ops, unsupported_reason(problem, *, needs_grad, deterministic) -> str | None
(deterministic: whether the caller needs a deterministic backward), and
new_out(q), the empty output its forward writes into (the custom op's fake implementation returns it too).
Modules are imported lazily: Triton reads TRITON_INTERPRET when a kernel is defined, so tests can set
it after importing prefixattn but before the first kernel call.
"""

from __future__ import annotations

import os
from types import ModuleType

from ..validation import Problem

_MODULES = {"triton": ".triton_backend", "cuda": ".cuda_backend", "sdpa": ".sdpa_backend"}


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


def get_backend(name: str) -> ModuleType:
    # Plain import statements rather than importlib.import_module: torch.compile(fullgraph=True) traces
    # through backend selection and refuses importlib (a graph break).
    if name == "triton":
        from . import triton_backend

        return triton_backend
    if name == "cuda":
        from . import cuda_backend

        return cuda_backend
    if name == "sdpa":
        from . import sdpa_backend

        return sdpa_backend
    raise ValueError(f"backend: expected one of {sorted(_MODULES)}, got {name!r}")


def unsupported_reason(name: str, problem: Problem, *, needs_grad: bool, deterministic: bool = True) -> str | None:
    """Why backend `name` cannot run this problem, or None if it can."""
    return get_backend(name).unsupported_reason(problem, needs_grad=needs_grad, deterministic=deterministic)


def check_backend(name: str, problem: Problem, *, needs_grad: bool, deterministic: bool = True) -> None:
    reason = unsupported_reason(name, problem, needs_grad=needs_grad, deterministic=deterministic)
    if reason is not None:
        raise ValueError(f"backend: {name!r} cannot run this call: {reason}")


def auto_backend(problem: Problem, *, needs_grad: bool) -> str:
    """The fastest backend that can run this problem; the reference on the CPU."""
    if problem.device.type != "cuda":
        return "torch"
    if unsupported_reason("cuda", problem, needs_grad=needs_grad) is None:
        cuda = get_backend("cuda")
        if cuda.preferred(problem):
            return "cuda"
    if unsupported_reason("triton", problem, needs_grad=needs_grad) is None:
        return "triton"
    return "torch"
