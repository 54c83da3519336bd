"""prefixattn.init(model): switch a transformers model to prefixattn and give it adapters-style methods.

init() validates everything it needs first (the family, the module layout, the backend), then changes the
model: it registers a PrefixStore as `model.prefix_tuning`, tags every prefixable attention module with
its (location, layer), sets the attention implementation of the model and all its sub-models (T5 stacks
hold their own config copies) to "prefixattn", hooks the entry modules so each forward builds its
prefix context once, and binds the methods below to the instance (the class is not touched, so
save_pretrained and `type(model)` stay as they were).
"""

from __future__ import annotations

import contextlib
import os
import types

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from ..tuning import io as tuning_io
from ..tuning.config import PrefixTuningConfig
from ..tuning.store import PrefixStore
from ..validation import check_backend_name, check_flag
from . import attention as attn
from . import positions
from .families import entry_modules, find_sites
from .position_table import check_offset_fits

STORE_NAME = "prefix_tuning"  # the registered child module holding the adapters (as in adapters)


def get_store(model) -> PrefixStore:
    """The PrefixStore of a model prepared with prefixattn.init (raises if it was not)."""
    store = getattr(model, "_modules", {}).get(STORE_NAME) if isinstance(model, nn.Module) else None
    if not isinstance(store, PrefixStore):
        raise ValueError(
            f"{type(model).__name__} was not prepared for prefix tuning; call prefixattn.init(model) first"
        )
    return store


def check_path(name: str, path) -> None:
    """A checkpoint directory argument: a str or os.PathLike (its existence is the reader's to check)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name}: expected a directory path (str or os.PathLike), got {type(path).__name__}")


def get_flat_prefix(model, name: str) -> dict:
    """{location: [L_loc, 2, Hkv, P, D]} of adapter `name` (rows: `get_store(model).get(name).rows[location]`,
    global layer ids in order; axis 1: 0 = keys, 1 = values). Keys are post-RoPE (unrotated) for RoPE models."""
    return get_store(model).flat_prefix(name)


def set_flat_prefix(model, name: str, prefixes: dict) -> None:
    """Replace adapter `name`'s generators by these flat prefixes (same form as get_flat_prefix); every shape
    is checked before anything changes. For importers: add_adapter(name, PrefixTuningConfig(flat=True, ...))
    with the right prefix_length / leave_out / locations first, then call this."""
    get_store(model).set_flat_prefix(name, prefixes)


def init(model: PreTrainedModel, backend: str = "auto", deterministic: bool = True) -> PreTrainedModel:
    """Prepare `model` for prefix tuning through prefixattn; returns the same model.

    backend, deterministic: passed to every prefixattn.prefix_attention call (backend "auto", "triton", "cuda",
    "sdpa" or "torch"; training on "sdpa" needs deterministic=False, see prefix_attention).
    Calling init again on a prepared model only changes these two settings.
    """
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"prefixattn.init: expected a transformers PreTrainedModel, got {type(model).__name__}")
    check_backend_name(backend)
    if not isinstance(deterministic, bool):
        raise TypeError(f"prefixattn.init: deterministic: expected a bool, got {type(deterministic).__name__}")
    existing = model._modules.get(STORE_NAME)
    if isinstance(existing, PrefixStore):
        existing.backend, existing.deterministic = backend, deterministic
        return model
    if existing is not None or STORE_NAME in model.__dict__:
        raise ValueError(
            f"prefixattn.init: {type(model).__name__} already has an attribute {STORE_NAME!r} "
            f"(was it prepared by another prefix-tuning library?)"
        )
    sites, geometry = find_sites(model)  # raises before anything changes
    attn.register()

    store = PrefixStore(geometry, backend=backend, deterministic=deterministic)
    _set_attn_implementation(model)
    model.add_module(STORE_NAME, store)
    store.train(model.training)  # a new module starts in train mode; adapters added later copy the store's mode
    probe = sites[0].module
    store.__dict__["_probe_module"] = probe  # plain attribute: a child module would make a reference cycle
    store.__dict__["_gc_probe"] = next(
        (
            m
            for m in model.modules()
            if hasattr(m, "_gradient_checkpointing_func") or hasattr(m, "gradient_checkpointing")
        ),
        None,
    )
    for site in sites:
        site.module.__dict__[attn.SITE_ATTR] = (site.location, site.layer)
        site.module.__dict__[attn.STORE_ATTR] = store
        site.module.register_forward_pre_hook(_site_pre_hook, with_kwargs=True)
    for entry in entry_modules(model):
        entry.__dict__[attn.STORE_ATTR] = store
        entry.register_forward_pre_hook(_entry_pre_hook, with_kwargs=True)
        entry.register_forward_hook(_entry_post_hook, with_kwargs=True, always_call=True)
    positions.install(model, store)  # GPT-2 / BART: adapters may shift real-token positions (PEFT imports)
    for name, fn in _METHODS.items():
        setattr(model, name, types.MethodType(fn, model))
    return model


def _set_attn_implementation(model: PreTrainedModel) -> None:
    """Set "prefixattn" on every config reachable from the model's modules; undo all of it on failure."""
    configs = {}
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if isinstance(cfg, PretrainedConfig) and id(cfg) not in configs:
            configs[id(cfg)] = (cfg, cfg._attn_implementation_internal)
    try:
        model.set_attn_implementation(attn.NAME)
        for cfg, _ in configs.values():
            if cfg._attn_implementation != attn.NAME:
                cfg._attn_implementation = attn.NAME
    except Exception:
        for cfg, previous in configs.values():
            cfg._attn_implementation_internal = previous
        raise


# -- hooks -----------------------------------------------------------------------------------------------
def compute_dtype(store: PrefixStore) -> tuple[torch.dtype, torch.device]:
    """The dtype attention will see: autocast's if it is on, else the model's weights'."""
    weight = next(store.__dict__["_probe_module"].parameters())
    device = weight.device
    if device.type in ("cuda", "cpu") and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type), device
    return weight.dtype, device


def _entry_pre_hook(module, args, kwargs):
    store: PrefixStore = module.__dict__[attn.STORE_ATTR]
    choice = kwargs.pop("prefix_choice", None)
    if kwargs.get(attn.CONTEXT_KWARG) is not None:
        if choice is not None:
            raise ValueError("prefix_choice: pass it to the outermost forward (or generate) call only")
        return args, kwargs
    if store._entered and store._current is not None and choice is None:
        ctx = store._current  # an inner entry called without the kwarg: keep the outer forward's prefixes
    else:
        if module.training and torch.is_grad_enabled():
            _check_checkpointing(store)
        dtype, device = compute_dtype(store)
        ctx = store.begin_forward(choice, dtype=dtype, device=device)
    if not store._entered:
        store._current = ctx
        # the outermost call: positions from the mask, as generate() derives them (hf/positions.py)
        args, kwargs = positions.mask_position_ids(module, store.geometry.model_type, args, kwargs)
    # Entries that set the context are stacked, so the post-hook of exactly those ends it (an entry that
    # received the context from its caller, or whose pre-hook raised, leaves the stack alone).
    store._entered.append(id(module))
    kwargs[attn.CONTEXT_KWARG] = ctx
    return args, kwargs


def _check_checkpointing(store: PrefixStore) -> None:
    """Reentrant checkpointing runs a nested backward per layer that cannot see the prefix tensors (they are no
    input of the checkpointed layer), so the shared MLP graph would be walked once per layer; refuse it."""
    if not any(p.requires_grad for name in store.active for p in store.adapters[name].parameters()):
        return
    layer = store.__dict__.get("_gc_probe")
    func = getattr(layer, "_gradient_checkpointing_func", None)
    if layer is None or not getattr(layer, "gradient_checkpointing", False) or func is None:
        return
    keywords = getattr(func, "keywords", None)
    if keywords is not None and keywords.get("use_reentrant", True):  # torch's default is reentrant
        raise ValueError(
            "prefixattn: gradient checkpointing with use_reentrant=True cannot train prefixes; enable it with "
            "use_reentrant=False (transformers' default): model.gradient_checkpointing_enable("
            "gradient_checkpointing_kwargs={'use_reentrant': False})"
        )


def _entry_post_hook(module, args, kwargs, output):
    store: PrefixStore = module.__dict__[attn.STORE_ATTR]
    if store._entered and store._entered[-1] == id(module):
        store._entered.pop()
        if not store._entered:
            store._current = None
    return None


def _site_pre_hook(module, args, kwargs):
    # Gates read the attention input (adapters' residual_input); capture it only when a gate exists.
    store: PrefixStore = module.__dict__[attn.STORE_ATTR]
    if store.any_gating:
        module.__dict__[attn.HIDDEN_ATTR] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    return None


# -- methods bound to the model ------------------------------------------------------------------------
def _model_device(store: PrefixStore) -> torch.device:
    return next(store.__dict__["_probe_module"].parameters()).device


def install_adapter(store: PrefixStore, adapter, set_active: bool) -> str:
    """Put a fully built and checked adapter (loaded or imported) on the model's device and into the store."""
    adapter = adapter.to(_model_device(store))
    adapter.train(store.training)
    store.insert(adapter)
    if set_active:
        store.set_active([adapter.name])
    return adapter.name


def add_adapter(
    self,
    adapter_name: str,
    config=None,
    overwrite_ok: bool = False,
    set_active: bool = False,
    metadata: dict | None = None,
):
    """Add a prefix-tuning adapter (adapters' signature). config: PrefixTuningConfig, dict, preset name or None.

    Parameters are created in float32 on the model's device; each forward casts the prefix to the compute
    dtype. `metadata` is a free dict stored with the adapter and written by save_adapter.
    """
    store = get_store(self)
    config = PrefixTuningConfig.coerce(config)
    check_flag("overwrite_ok", overwrite_ok)
    check_flag("set_active", set_active)
    if metadata is not None and not isinstance(metadata, dict):
        raise TypeError(f"metadata: expected a dict or None, got {type(metadata).__name__}")
    positions.check_metadata(self, metadata, "add_adapter")
    check_offset_fits(self, metadata, "add_adapter")
    if overwrite_ok and isinstance(adapter_name, str) and adapter_name in store.adapters:
        from ..tuning.adapter import PrefixAdapter

        PrefixAdapter(adapter_name, config, store.geometry)  # validate before deleting the old one
        store.delete(adapter_name)
    store.add(adapter_name, config, device=_model_device(store), metadata=metadata)
    if set_active:
        store.set_active([adapter_name])


def train_adapter(self, adapter_setup, train_embeddings: bool = False):
    """Freeze every other parameter, make these adapters' parameters trainable and active, set train mode."""
    store = get_store(self)
    names = [adapter_setup] if isinstance(adapter_setup, str) else list(adapter_setup)
    for n in names:
        store.get(n)
    store.set_active(names)
    self.train()
    for p in self.parameters():
        p.requires_grad_(False)
    for n in names:
        for p in store.adapters[n].parameters():
            p.requires_grad_(True)
    if train_embeddings:
        for p in self.get_input_embeddings().parameters():
            p.requires_grad_(True)


def eject_prefix_tuning(self, name: str):
    """Run the MLP once, keep its output as the flat prefix and drop the MLP; outputs do not change."""
    store = get_store(self)
    store.get(name).eject()
    store.changed()


def set_active_adapters(self, adapter_setup):
    """Activate one adapter (a name), several (a list: choose per sequence with prefix_choice), or none (None)."""
    get_store(self).set_active(adapter_setup)


def delete_adapter(self, adapter_name: str):
    get_store(self).delete(adapter_name)


def save_adapter(self, save_directory: str, adapter_name: str) -> int:
    """Write the adapter (safetensors + JSON) to save_directory; returns the checkpoint size in bytes."""
    return tuning_io.save_adapter(get_store(self).get(adapter_name), save_directory)


def load_adapter(self, adapter_name_or_path: str, load_as: str | None = None, set_active: bool = False) -> str:
    """Load an adapter saved by save_adapter; returns its name. Everything is read and checked against this
    model before the model changes, so a bad checkpoint leaves the model as it was."""
    store = get_store(self)
    check_path("adapter_name_or_path", adapter_name_or_path)
    if load_as is not None and (not isinstance(load_as, str) or not load_as):
        raise TypeError(f"load_as: expected a non-empty str or None, got {load_as!r}")
    check_flag("set_active", set_active)
    adapter = tuning_io.read_adapter(adapter_name_or_path, store.geometry, name=load_as)
    store.check_new_name(adapter.name)
    positions.check_metadata(self, adapter.metadata, "load_adapter")
    check_offset_fits(self, adapter.metadata, "load_adapter")
    return install_adapter(store, adapter, set_active)


@contextlib.contextmanager
def prefix_choice(self, choice):
    """Within the block, every forward / generate uses this per-sequence choice of the active adapters."""
    store = get_store(self)
    with store.choice_override(choice, _model_device(store)):
        yield


def generate(self, *args, prefix_choice=None, **kwargs):
    """transformers' generate, plus prefix_choice: one active adapter name (or index, or None) per input
    sequence; beams and num_return_sequences repeat each sequence's choice."""
    generate_fn = type(self).generate
    if prefix_choice is None:
        return generate_fn(self, *args, **kwargs)
    store = get_store(self)
    with store.choice_override(prefix_choice, _model_device(store)):
        return generate_fn(self, *args, **kwargs)


_METHODS = {
    "add_adapter": add_adapter,
    "train_adapter": train_adapter,
    "eject_prefix_tuning": eject_prefix_tuning,
    "set_active_adapters": set_active_adapters,
    "delete_adapter": delete_adapter,
    "save_adapter": save_adapter,
    "load_adapter": load_adapter,
    "prefix_choice": prefix_choice,
    "generate": generate,
}
