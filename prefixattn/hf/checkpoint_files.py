"""Reading other libraries' checkpoint files with errors that say what is wrong (for the importers).

Every reader raises FileNotFoundError for a missing file and ValueError for one that cannot be parsed
(truncated, corrupt, not JSON), naming the file and the importer; nothing here touches a model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import torch


def require_dir(path, who: str) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{who}: path: expected a directory path, got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{who}: {path!r} is not a directory")
    return path


def read_json(directory: str, name: str, who: str) -> dict:
    path = os.path.join(directory, name)
    if not os.path.exists(path):
        present = sorted(os.listdir(directory))
        raise FileNotFoundError(f"{who}: no {name} in {directory!r} (it holds {present or 'nothing'})")
    try:
        with open(path) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{who}: {path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{who}: {path} holds a JSON {type(data).__name__}, expected an object")
    return data


def find_weights(directory: str, names: Sequence[str], who: str) -> str:
    """The first of `names` present in `directory` (safetensors names first by convention)."""
    for name in names:
        path = os.path.join(directory, name)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"{who}: no weights file in {directory!r}; expected one of {', '.join(names)}")


def read_tensors(path: str, who: str) -> dict:
    """All tensors of a .safetensors file or a torch.save'd state dict (loaded with weights_only=True), on CPU."""
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(path, device="cpu")
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise ValueError(f"{who}: cannot read {path} (truncated or corrupt?): {e}") from None
    else:
        import pickle

        try:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, EOFError, OSError, RuntimeError, ValueError) as e:
            raise ValueError(f"{who}: cannot read {path} (truncated or corrupt?): {e}") from None
    if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise ValueError(f"{who}: {path} does not hold a dict of tensors")
    return tensors
