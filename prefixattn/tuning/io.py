"""Save and load one adapter: safetensors for the tensors, JSON for the config, geometry and metadata.

Loading reads and validates everything (format, config, geometry against the model, every tensor name and
shape) before anything in the model changes, so a truncated or mismatched checkpoint never half-loads.
"""

from __future__ import annotations

import json
import os

import torch

from .adapter import ModelGeometry, PrefixAdapter
from .config import PrefixTuningConfig

CONFIG_NAME = "prefixattn_config.json"
WEIGHTS_NAME = "prefixattn_adapter.safetensors"
FORMAT = "prefixattn.prefix_tuning"
FORMAT_VERSION = 1

# Files other libraries write, to name them in the error when someone loads one of those directly (the most
# telling first: adapter_config.json is in both PEFT's and adapters' folders).
_FOREIGN = {
    "adapter_model.safetensors": "a PEFT checkpoint (import it with prefixattn.load_peft_prefix(model, path, name))",
    "pytorch_adapter.bin": "an adapters (AdapterHub) checkpoint (import it with prefixattn.load_adapters_prefix(model, "
    "path))",
    "adapter.safetensors": "an adapters (AdapterHub) checkpoint (import it with prefixattn.load_adapters_prefix(model, "
    "path))",
    "adapter_config.json": "a PEFT or adapters checkpoint (import it with prefixattn.load_peft_prefix(model, path, "
    "name) or prefixattn.load_adapters_prefix(model, path))",
}


def checkpoint_bytes(directory: str) -> int:
    """Size on disk of a saved adapter (its JSON and safetensors files), in bytes."""
    return sum(
        os.path.getsize(os.path.join(directory, f))
        for f in (CONFIG_NAME, WEIGHTS_NAME)
        if os.path.exists(os.path.join(directory, f))
    )


def save_adapter(adapter: PrefixAdapter, directory: str) -> int:
    """Write `adapter` to `directory`; returns the checkpoint size in bytes."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in adapter.state_dict().items()}
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": adapter.name,
        "config": adapter.config.to_dict(),
        "model": adapter.geometry.to_dict(),
        "rows": {loc: list(rows) for loc, rows in adapter.rows.items()},
        "tensors": {k: list(v.shape) for k, v in tensors.items()},
        "metadata": adapter.metadata,
    }
    save_file(tensors, os.path.join(directory, WEIGHTS_NAME), metadata={"format": FORMAT})
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
    return checkpoint_bytes(directory)


def _read_json(directory: str) -> dict:
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"load_adapter: {directory!r} is not a directory")
    if not os.path.exists(path):
        foreign = [desc for name, desc in _FOREIGN.items() if os.path.exists(os.path.join(directory, name))]
        hint = f"; it looks like {foreign[0]}" if foreign else ""
        raise FileNotFoundError(f"load_adapter: no {CONFIG_NAME} in {directory!r}{hint}")
    try:
        with open(path) as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"load_adapter: {path} is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(
            f"load_adapter: {path} is not a prefixattn adapter config (format "
            f"{meta.get('format') if isinstance(meta, dict) else None!r}, expected {FORMAT!r})"
        )
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"load_adapter: {path} has format_version {meta.get('format_version')!r}; this prefixattn "
            f"reads version {FORMAT_VERSION}"
        )
    return meta


def _read_tensors(directory: str) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.exists(path):
        raise FileNotFoundError(f"load_adapter: no {WEIGHTS_NAME} in {directory!r}")
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise ValueError(f"load_adapter: cannot read {path} (truncated or corrupt?): {e}") from None


def _check_geometry(saved: dict, geometry: ModelGeometry, rows: dict) -> None:
    """The saved geometry must match the model at every location the adapter uses."""
    locs = saved.get("locations", {})
    for loc, layer_ids in rows.items():
        if loc not in geometry.locations:
            raise ValueError(
                f"load_adapter: the checkpoint has a prefix at {loc!r}, which {geometry.model_class} "
                f"({geometry.model_type}) does not have; it was made for {saved.get('model_class')} "
                f"({saved.get('model_type')})"
            )
        spec = geometry.locations[loc]
        s = locs.get(loc, {})
        for field in ("num_kv_heads", "head_dim", "hidden_size"):
            if s.get(field) != getattr(spec, field):
                raise ValueError(
                    f"load_adapter: {loc} {field} is {s.get(field)} in the checkpoint (made for "
                    f"{saved.get('model_class')}) but {getattr(spec, field)} in this {geometry.model_class}"
                )
        missing = [layer for layer in layer_ids if layer not in spec.layers]
        if missing:
            raise ValueError(
                f"load_adapter: the checkpoint has {loc} prefixes for layer(s) {missing}, which this "
                f"{geometry.model_class} does not have (its layers: {list(spec.layers)})"
            )


def read_adapter(directory: str, geometry: ModelGeometry, name: str | None = None) -> PrefixAdapter:
    """Build a fully loaded, validated PrefixAdapter from `directory` without touching any model."""
    meta = _read_json(directory)
    try:
        config = PrefixTuningConfig.from_dict(meta["config"])
    except KeyError:
        raise ValueError(f"load_adapter: {os.path.join(directory, CONFIG_NAME)} has no 'config'") from None
    rows = {loc: list(r) for loc, r in meta.get("rows", {}).items()}
    _check_geometry(meta.get("model", {}), geometry, rows)
    tensors = _read_tensors(directory)
    adapter = PrefixAdapter(name or meta.get("name"), config, geometry, metadata=meta.get("metadata") or {})
    planned = {loc: list(r) for loc, r in adapter.rows.items()}
    if planned != rows:
        raise ValueError(
            f"load_adapter: the checkpoint's prefixed layers {rows} differ from what its config gives "
            f"on this {geometry.model_class}: {planned}"
        )
    return load_checked_state(adapter, tensors, who="load_adapter", model=geometry.model_class)


def load_checked_state(adapter: PrefixAdapter, state: dict, *, who: str, model: str, origin: str = "") -> PrefixAdapter:
    """Load `state` into a freshly built adapter after checking every name, shape and dtype against it, so a
    checkpoint that does not fit fails before anything is loaded. `origin` adds where the checkpoint came from."""
    expected = adapter.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{who}: the checkpoint's tensors do not match its config on this {model} (missing "
            f"{missing}, unexpected {unexpected})"
        )
    for key, want in expected.items():
        got = state[key]
        if tuple(got.shape) != tuple(want.shape):
            raise ValueError(
                f"{who}: tensor {key!r} has shape {list(got.shape)} in the checkpoint, expected "
                f"{list(want.shape)} for this {model}{origin}"
            )
        if not got.is_floating_point():
            raise ValueError(f"{who}: tensor {key!r} has dtype {got.dtype}, expected a floating dtype")
    with torch.no_grad():
        adapter.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)
    return adapter
