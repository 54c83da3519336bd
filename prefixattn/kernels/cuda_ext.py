"""Loader of the CUDA extension prefixattn._C (built from csrc/ by setup.py when nvcc is found)."""

from __future__ import annotations

import importlib
from types import ModuleType

_loaded = False
_module: ModuleType | None = None
_reason = ""


def load() -> ModuleType | None:
    """The extension module, or None when it is not built or cannot be imported (see why_unavailable)."""
    global _loaded, _module, _reason
    if not _loaded:
        _loaded = True
        try:
            _module = importlib.import_module("prefixattn._C")
        except ModuleNotFoundError as err:
            if err.name != "prefixattn._C":
                _reason = f"prefixattn._C could not be imported: {err}"
            else:
                _reason = (
                    "prefixattn._C is not built in this installation (it is compiled at install time when "
                    "nvcc is found; reinstall with nvcc on PATH or CUDA_HOME set, e.g. "
                    "`pip install --no-build-isolation -e .`, or PREFIXATTN_BUILD_CUDA=1 to make it required)"
                )
        except ImportError as err:  # built, but not for this Python / platform
            _reason = f"prefixattn._C is present but failed to import: {err}"
    return _module


def why_unavailable() -> str:
    """Why load() returns None; the empty string when the extension is available."""
    load()
    return _reason
