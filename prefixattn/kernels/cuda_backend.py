"""The "cuda" backend: the CUDA C++ decode kernels in prefixattn._C. Placeholder until they land."""

from __future__ import annotations

from typing import Optional

from ..validation import Problem


def unsupported_reason(problem: Problem, *, needs_grad: bool) -> Optional[str]:
    return "the CUDA extension prefixattn._C is not built in this installation"


def preferred(problem: Problem) -> bool:
    return False
