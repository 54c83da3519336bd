"""Save and load one adapter: safetensors for the tensors, JSON for the config, geometry and metadata.

Loading reads and validates everything (format, config, geometry against the model, every tensor name and
shape) before anything in the model changes, so a truncated or mismatched checkpoint never half-loads. Sizes
come from the config, so nothing is allocated until they agree with the tensor shapes in the safetensors
header (read without the data): the adapter is planned on the meta device, checked, and only then given the
loaded tensors. A crafted config can therefore not make the loader allocate more than the file holds.
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


def _weights_path(directory: str) -> str:
    path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.exists(path):
        raise FileNotFoundError(f"load_adapter: no {WEIGHTS_NAME} in {directory!r}")
    return path


def _unreadable(path: str, e: Exception) -> ValueError:
    return ValueError(f"load_adapter: cannot read {path} (truncated or corrupt?): {e}")


def _header_shapes(path: str) -> dict[str, tuple[tuple[int, ...], bool]]:
    """{name: (shape, is floating)} from the safetensors header, without reading any tensor data."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            out = {}
            for key in f.keys():
                sl = f.get_slice(key)
                out[key] = (tuple(sl.get_shape()), sl.get_dtype().startswith(("F", "BF")))
            return out
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise _unreadable(path, e) from None


def _read_tensors(path: str) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise _unreadable(path, e) from None


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


def _check_listed_shapes(listed, header: dict, path: str) -> None:
    """The JSON's tensor list (name -> shape) must describe the safetensors file it sits next to."""
    if listed is None:
        return
    if not isinstance(listed, dict):
        raise ValueError(f"load_adapter: {path}: 'tensors' must map tensor names to shapes, got {listed!r}")
    saved = {k: tuple(v) if isinstance(v, list) else v for k, v in listed.items()}
    actual = {k: shape for k, (shape, _) in header.items()}
    if saved != actual:
        differ = sorted(k for k in set(saved) | set(actual) if saved.get(k) != actual.get(k))
        raise ValueError(
            f"load_adapter: {path} lists tensors that the weights file does not hold as listed (differing: "
            f"{differ[:5]}{' ...' if len(differ) > 5 else ''}); the config and weights do not belong together"
        )


def _check_num_layers(saved: dict, geometry: ModelGeometry) -> None:
    count = saved.get("num_layers")
    if count is not None and count != geometry.num_layers:
        raise ValueError(
            f"load_adapter: the checkpoint was made for a model with {count} layers ({saved.get('model_class')}); "
            f"this {geometry.model_class} has {geometry.num_layers}"
        )


def read_adapter(directory: str, geometry: ModelGeometry, name: str | None = None) -> PrefixAdapter:
    """Build a fully loaded, validated PrefixAdapter from `directory` without touching any model."""
    meta = _read_json(directory)
    config_path = os.path.join(directory, CONFIG_NAME)
    try:
        config = PrefixTuningConfig.from_dict(meta["config"])
    except KeyError:
        raise ValueError(f"load_adapter: {config_path} has no 'config'") from None
    rows = {loc: list(r) for loc, r in meta.get("rows", {}).items()}
    saved_model = meta.get("model", {})
    _check_geometry(saved_model, geometry, rows)
    _check_num_layers(saved_model, geometry)
    path = _weights_path(directory)
    header = _header_shapes(path)
    adapter = plan_adapter(name or meta.get("name"), config, geometry, metadata=meta.get("metadata") or {})
    planned = {loc: list(r) for loc, r in adapter.rows.items()}
    if planned != rows:
        raise ValueError(
            f"load_adapter: the checkpoint's prefixed layers {rows} differ from what its config gives "
            f"on this {geometry.model_class}: {planned}"
        )
    check_state_shapes(adapter, header, who="load_adapter", model=geometry.model_class)
    _check_listed_shapes(meta.get("tensors"), header, config_path)
    return load_checked_state(adapter, _read_tensors(path), who="load_adapter", model=geometry.model_class)


def plan_adapter(name, config: PrefixTuningConfig, geometry: ModelGeometry, metadata: dict | None = None):
    """The adapter `config` gives on `geometry`, on the meta device: every shape, no memory. A loader checks
    the checkpoint against it and then hands it the loaded tensors (load_checked_state)."""
    with torch.device("meta"):
        return PrefixAdapter(name, config, geometry, metadata=metadata)


# The config fields each parameter's shape comes from, to name them when a checkpoint disagrees.
_SHAPE_FIELDS = {
    "wte.weight": "prefix_length (rows) and the model's hidden size",
    "control_trans.0.weight": "bottleneck_size (rows) and the model's hidden size",
    "control_trans.0.bias": "bottleneck_size",
    "control_trans.2.weight": "bottleneck_size (columns) and the model's layers x KV heads x head dim",
    "control_trans.2.bias": "the model's layers x KV heads x head dim",
    "prefix": "prefix_length and the model's layers, KV heads and head dim",
    "linear.weight": "shared_gating and the model's hidden size",
    "linear.bias": "shared_gating",
}


def _shape_source(key: str) -> str:
    for suffix, fields in _SHAPE_FIELDS.items():
        if key.endswith("." + suffix):
            return f" (its shape comes from config field(s) {fields})"
    return ""


def check_state_shapes(
    adapter: PrefixAdapter, shapes: dict[str, tuple[tuple[int, ...], bool]], *, who: str, model: str, origin: str = ""
) -> None:
    """Every tensor the adapter needs is in the checkpoint, with its shape and a floating dtype, and nothing else
    is. `shapes`: {name: (shape, is floating)}; `origin` adds where the checkpoint came from."""
    expected = adapter.state_dict()
    missing, unexpected = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{who}: the checkpoint's tensors do not match its config on this {model} (missing "
            f"{missing}, unexpected {unexpected})"
        )
    for key, want in expected.items():
        shape, floating = shapes[key]
        if tuple(shape) != tuple(want.shape):
            raise ValueError(
                f"{who}: tensor {key!r} has shape {list(shape)} in the checkpoint, but the config gives "
                f"{list(want.shape)} on this {model}{_shape_source(key)}{origin}"
            )
        if not floating:
            raise ValueError(f"{who}: tensor {key!r} has a non-floating dtype, expected a floating dtype")


def load_checked_state(adapter: PrefixAdapter, state: dict, *, who: str, model: str, origin: str = "") -> PrefixAdapter:
    """Give `adapter` (planned on the meta device by plan_adapter) the tensors of `state`, after checking every
    name, shape and dtype against it and that every value is finite, so a checkpoint that does not fit fails
    before anything is allocated for it. Returns the adapter, now holding float32 copies of the tensors."""
    check_state_shapes(
        adapter,
        {k: (tuple(v.shape), v.is_floating_point()) for k, v in state.items()},
        who=who,
        model=model,
        origin=origin,
    )
    expected = adapter.state_dict()
    bad = sorted(k for k, v in state.items() if not bool(torch.isfinite(v).all()))
    if bad:
        raise ValueError(f"{who}: tensor(s) {bad} hold non-finite values (NaN or inf)")
    converted = {k: v.to(expected[k].dtype).contiguous() for k, v in state.items()}
    adapter.load_state_dict(converted, strict=True, assign=True)
    left = [n for n, t in [*adapter.named_parameters(), *adapter.named_buffers()] if t.is_meta]
    if left:  # e.g. an activation with a buffer that is not saved: it would have no value
        raise ValueError(f"{who}: the checkpoint gives no value for {left}")
    return adapter
