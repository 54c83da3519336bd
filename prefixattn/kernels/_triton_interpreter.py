"""Compatibility shim for Triton 3.6's CPU interpreter under NumPy >= 2.4.

The interpreter holds kernel scalars as 1-element arrays and converts them with int(array) when they bound a
Python range() (e.g. `for start in range(0, seq_len, BLOCK)`); NumPy 2.4 refuses int() of arrays with ndim > 0.
We re-register the conversion to take the single element. Applied only when interpreting and only if NumPy
refuses the conversion; compiled kernels are untouched.
"""

from __future__ import annotations

import numpy as np

_APPLIED = False


def _numpy_refuses_int_of_1d() -> bool:
    try:
        int(np.array([1]))
    except TypeError:
        return True
    return False


def apply() -> None:
    global _APPLIED
    if _APPLIED or not _numpy_refuses_int_of_1d():
        _APPLIED = True
        return
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patch_lang_tensor
    _APPLIED = True
