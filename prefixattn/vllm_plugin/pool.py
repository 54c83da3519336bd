"""The prefix pool: every configured adapter read once, checked against the served model, held in one buffer.

An adapter directory is what `model.save_adapter(dir, name)` writes (flat or MLP form; an MLP is run once
here and only its output is kept) or a PEFT prefix-tuning directory (read through prefixattn's PEFT
importer, so the logits equal PEFT's forward). Each is checked against the served model (layers, KV heads,
head dim, and that its values fit the model's dtype) before anything is allocated, with errors naming the
adapter and the field.

The pool holds, for every decoder layer l, `k[l], v[l]` [N, Hkv_local, P, D] and `lengths[l]` int32 [N]
(0 where an adapter leaves layer l out), in the model's dtype on the model's device. With tensor
parallelism each rank keeps only its KV heads, sliced the way vLLM shards them (replicated when TP > Hkv).
Prefix keys carry no position (prefixattn's convention): they are used as stored, next to vLLM's post-RoPE
keys. One pool per process, built on first use while the model's attention layers are constructed, i.e.
before vLLM measures memory for its KV cache.
"""

from __future__ import annotations

import json
import os
import re
import threading
from dataclasses import dataclass

import torch
from torch import Tensor

from . import config as plugin_config

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_index(layer_name: str) -> int:
    """The decoder layer number in vLLM's `layer.layer_name`, e.g. "model.layers.12.self_attn.attn" -> 12."""
    match = _LAYER_RE.search(layer_name)
    if match is None:
        raise ValueError(f"layer_name: expected a name containing 'layers.<i>.', got {layer_name!r}")
    return int(match.group(1))


def kv_head_range(total_kv_heads: int, tp_size: int, tp_rank: int) -> tuple[int, int]:
    """(first KV head, count) held by one tensor-parallel rank, as vLLM's QKVParallelLinear shards them."""
    if tp_size >= total_kv_heads:
        replicas = tp_size // total_kv_heads
        return tp_rank // replicas, 1
    per_rank = total_kv_heads // tp_size
    return tp_rank * per_rank, per_rank


@dataclass(frozen=True)
class ServedModel:
    """What an adapter must fit: the served model's decoder geometry and dtype."""

    model_type: str
    architecture: str
    num_layers: int
    num_kv_heads: int  # all ranks together
    head_dim: int
    hidden_size: int
    dtype: torch.dtype
    hf_config: object = None

    @classmethod
    def from_vllm(cls, vllm_config) -> ServedModel:
        model_config = vllm_config.model_config
        hf = model_config.hf_text_config
        model_type = getattr(hf, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"prefixattn: served model type {model_type!r} is not supported; supported: "
                f"{list(SUPPORTED_MODEL_TYPES)}"
            )
        architectures = getattr(model_config, "architectures", None) or getattr(hf, "architectures", None) or []
        return cls(
            model_type=model_type,
            architecture=architectures[0] if architectures else model_type,
            num_layers=int(hf.num_hidden_layers),
            num_kv_heads=int(model_config.get_total_num_kv_heads()),
            head_dim=int(model_config.get_head_size()),
            hidden_size=int(hf.hidden_size),
            dtype=model_config.dtype,
            hf_config=hf,
        )

    def geometry(self):
        from ..tuning.adapter import SELF, LocationSpec, ModelGeometry

        spec = LocationSpec(SELF, tuple(range(self.num_layers)), self.num_kv_heads, self.head_dim, self.hidden_size)
        return ModelGeometry(self.model_type, self.architecture, self.num_layers, {SELF: spec})


@dataclass(frozen=True)
class AdapterPrefix:
    """One adapter's decoder prefix, float32 on the CPU: `prefix` [len(layers), 2, Hkv, P, D]."""

    name: str
    directory: str
    layers: tuple[int, ...]
    prefix: Tensor

    @property
    def length(self) -> int:
        return self.prefix.shape[3]


class AdapterError(ValueError):
    """An adapter that does not fit the served model; the message names the adapter and the field."""


def _fail(name: str, directory: str, field: str, message: str):
    raise AdapterError(f"prefixattn adapter {name!r} ({directory}): {field}: {message}")


def _check_saved_geometry(name: str, directory: str, model: ServedModel) -> None:
    """Compare the geometry a `save_adapter` directory records with the served model, field by field."""
    from ..tuning.adapter import SELF
    from ..tuning.io import CONFIG_NAME

    try:
        with open(os.path.join(directory, CONFIG_NAME)) as f:
            saved = json.load(f).get("model", {})
    except (OSError, ValueError, AttributeError):
        return  # read_adapter reports unreadable files with its own message
    loc = saved.get("locations", {}).get(SELF, {})
    have = {
        "num_layers": saved.get("num_layers"),
        "num_kv_heads": loc.get("num_kv_heads"),
        "head_dim": loc.get("head_dim"),
    }
    want = {"num_layers": model.num_layers, "num_kv_heads": model.num_kv_heads, "head_dim": model.head_dim}
    for field, value in have.items():
        if value is not None and value != want[field]:
            _fail(
                name,
                directory,
                field,
                f"the adapter was made for {value}, the served {model.architecture} has {want[field]}",
            )


def _read_prefixattn_dir(name: str, directory: str, model: ServedModel) -> AdapterPrefix:
    from ..hf.positions import METADATA_KEY
    from ..tuning.adapter import SELF
    from ..tuning.io import read_adapter

    _check_saved_geometry(name, directory, model)
    try:
        adapter = read_adapter(directory, model.geometry(), name)
    except (ValueError, FileNotFoundError) as e:
        _fail(name, directory, "checkpoint", str(e))
    if adapter.config.use_gating:
        _fail(name, directory, "use_gating", "gated prefixes scale per sequence from hidden states; not served")
    if set(adapter.rows) != {SELF}:
        _fail(name, directory, "locations", f"expected only {SELF!r}, got {sorted(adapter.rows)}")
    if adapter.metadata.get(METADATA_KEY):
        _fail(name, directory, METADATA_KEY, "position offsets exist only for non-RoPE families")
    prefix = adapter.flat_prefix()[SELF].float()  # the MLP, if any, runs once here
    return AdapterPrefix(name, directory, tuple(adapter.rows[SELF]), prefix.contiguous())


def _skeleton_with_rope(model: ServedModel):
    """The served architecture in transformers, weights on the meta device, real RoPE frequencies on the CPU:
    what the PEFT importer's position conversion reads (model.config, base_model.rotary_emb.inv_freq)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model.hf_config)
    base = skeleton.base_model
    base.rotary_emb = type(base.rotary_emb)(config=model.hf_config)  # built outside the meta context
    return skeleton


def _read_peft_dir(name: str, directory: str, model: ServedModel, positions: str) -> AdapterPrefix:
    from ..hf.peft_compat import _position_plan, read_peft_checkpoint, rope_inverse_frequencies, rotate_keys

    who = f"prefixattn adapter {name!r}"
    try:
        _, prefix, layers = read_peft_checkpoint(directory, model.geometry(), who)
        p = prefix.shape[3]
        if positions == "peft":
            skeleton = _skeleton_with_rope(model)
            shift, _, _ = _position_plan(skeleton, positions, p, who)
            prefix[:, 0] = rotate_keys(prefix[:, 0], rope_inverse_frequencies(skeleton, who), shift)
    except (ValueError, FileNotFoundError) as e:
        _fail(name, directory, "peft checkpoint", str(e))
    return AdapterPrefix(name, directory, tuple(layers), prefix.float().contiguous())


def read_adapter_prefix(name: str, directory: str, model: ServedModel, peft_positions: str = "peft") -> AdapterPrefix:
    """Read one adapter directory (prefixattn or PEFT format) and check it against the served model."""
    from ..hf.peft_compat import PEFT_CONFIG
    from ..tuning.io import CONFIG_NAME

    if os.path.exists(os.path.join(directory, CONFIG_NAME)):
        entry = _read_prefixattn_dir(name, directory, model)
    elif os.path.exists(os.path.join(directory, PEFT_CONFIG)):
        entry = _read_peft_dir(name, directory, model, peft_positions)
    else:
        present = sorted(os.listdir(directory))
        _fail(name, directory, "format", f"no {CONFIG_NAME} (prefixattn) or {PEFT_CONFIG} (PEFT); it holds {present}")
    cast = entry.prefix.to(model.dtype)
    if not torch.isfinite(cast).all():
        worst = float(entry.prefix.abs().max())
        _fail(name, directory, "dtype", f"its values (max |x| = {worst:g}) do not fit the model's {model.dtype}")
    return entry


def read_all(cfg: plugin_config.PluginConfig, model: ServedModel) -> list[AdapterPrefix]:
    """Every configured adapter, read and checked (nothing allocated on the device)."""
    entries = [read_adapter_prefix(name, directory, model, cfg.peft_positions) for name, directory in cfg.adapters]
    if cfg.max_prefix_length is not None:
        for e in entries:
            if e.length > cfg.max_prefix_length:
                _fail(
                    e.name,
                    e.directory,
                    "prefix_length",
                    f"{e.length} exceeds the configured max_prefix_length {cfg.max_prefix_length}",
                )
    return entries


class PrefixPool:
    """All adapters of one engine on one rank: per layer `k[l], v[l]` [N, Hkv_local, P, D], `lengths[l]` [N]."""

    def __init__(self, names: list[str], k: Tensor, v: Tensor, lengths: Tensor):
        self.names = list(names)
        self.k, self.v, self.lengths = k, v, lengths

    @classmethod
    def build(
        cls,
        entries: list[AdapterPrefix],
        model: ServedModel,
        *,
        device: torch.device,
        heads: tuple[int, int],
        max_prefix_length: int | None = None,
    ) -> PrefixPool:
        first, count = heads
        p_max = max_prefix_length or max(e.length for e in entries)
        shape = (model.num_layers, len(entries), count, p_max, model.head_dim)
        k = torch.zeros(shape, dtype=model.dtype, device=device)
        v = torch.zeros(shape, dtype=model.dtype, device=device)
        lengths = torch.zeros(model.num_layers, len(entries), dtype=torch.int32, device=device)
        for n, e in enumerate(entries):
            sliced = e.prefix[:, :, first : first + count].to(device=device, dtype=model.dtype)
            for row, layer in enumerate(e.layers):
                k[layer, n, :, : e.length] = sliced[row, 0]
                v[layer, n, :, : e.length] = sliced[row, 1]
                lengths[layer, n] = e.length
        return cls([e.name for e in entries], k, v, lengths)

    def __len__(self) -> int:
        return len(self.names)

    def index(self, name: str) -> int:
        """The pool entry of a prefix name; ValueError naming it and the ones that exist."""
        if not isinstance(name, str) or name not in self.names:
            raise ValueError(f"unknown prefix {name!r}; this server has {self.names}")
        return self.names.index(name)

    def layer(self, i: int) -> tuple[Tensor, Tensor, Tensor]:
        """(prefix_k [N, Hkv_local, P, D], prefix_v, lengths int32 [N]) of decoder layer i."""
        return self.k[i], self.v[i], self.lengths[i]


_lock = threading.Lock()
_pool: PrefixPool | None = None
_pool_key: tuple | None = None


def current_pool() -> PrefixPool | None:
    """This process's pool, or None when the plugin is inactive (or the pool is not built yet)."""
    return _pool


def _tp_rank_and_size() -> tuple[int, int]:
    try:
        from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

        return get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
    except (AssertionError, ImportError, RuntimeError):  # no model-parallel group in this process
        return 0, 1


def _default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def ensure_pool(vllm_config, device: torch.device | None = None) -> PrefixPool | None:
    """Build this process's pool for `vllm_config` once (None when the plugin is inactive). Call it while the
    model is built (attention layers, logits processors), so vLLM's memory profile includes the pool."""
    global _pool, _pool_key
    cfg = plugin_config.from_vllm_config(vllm_config)
    if cfg is None:
        return None
    device = torch.device(device) if device is not None else _default_device()
    rank, size = _tp_rank_and_size()
    key = (cfg, str(device), rank, size)
    with _lock:
        if _pool is None or _pool_key != key:
            model = ServedModel.from_vllm(vllm_config)
            entries = read_all(cfg, model)
            heads = kv_head_range(model.num_kv_heads, size, rank)
            _pool = PrefixPool.build(
                entries, model, device=device, heads=heads, max_prefix_length=cfg.max_prefix_length
            )
            _pool_key = key
    return _pool


def check_adapters(vllm_config) -> list[str] | None:
    """Read and check every configured adapter against the model of `vllm_config` without allocating the pool
    (at engine start-up, in the user's process, so a bad adapter fails there with its name)."""
    cfg = plugin_config.from_vllm_config(vllm_config)
    if cfg is None:
        return None
    read_all(cfg, ServedModel.from_vllm(vllm_config))
    return cfg.names
