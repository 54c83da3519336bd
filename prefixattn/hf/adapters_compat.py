"""Import AdapterHub `adapters` prefix-tuning checkpoints (adapter_config.json + pytorch_adapter.bin or
adapter.safetensors); docs/hf.md, "adapters (AdapterHub)".

Tensor names: `<base>.prefix_tuning.prefix_tunings.<name>.<loc>.{wte.weight, control_trans.{0,2}.{weight,bias}}`
(MLP form) or `...<loc>.control_trans` (1-D, flat or ejected form), gates
`<attention module>.prefix_tuning.prefix_gates.<name>.{weight,bias}`, and duplicates of the pool under every
layer (`...prefix_tuning.pool.prefix_tunings.<name>...`), which must agree and are read once.
Layout: the MLP output and the flat vector are `view(P, 2L, H_kv, d)`, [p, 2l+kv, h, j], l counting the
prefixed layers of the location in order; prefixattn's PrefixMLP produces the same order, so the MLP maps
one to one, and the flat vector is viewed and permuted to [L, 2, H_kv, P, d].
Positions: adapters uses prefixattn's convention (real tokens from 0, prefix unrotated), so nothing is
converted. T5: adapters shifts every real-to-real distance by P (its concatenation puts the prefix inside the
relative-bias window); prefixattn does not reproduce that quirk (docs/hf.md).
"""

from __future__ import annotations

import torch

from ..tuning.adapter import LOCATIONS, PrefixAdapter
from ..tuning.config import PrefixTuningConfig
from ..tuning.io import load_checked_state
from . import attention as attn
from .checkpoint_files import find_weights, read_json, read_tensors, require_dir
from .install import get_store, install_adapter

ADAPTERS_CONFIG = "adapter_config.json"
ADAPTERS_WEIGHTS = ("adapter.safetensors", "pytorch_adapter.bin")
MLP_PARAMS = (
    "wte.weight",
    "control_trans.0.weight",
    "control_trans.0.bias",
    "control_trans.2.weight",
    "control_trans.2.bias",
)
FLAT_PARAM = "control_trans"
_CONFIG_FIELDS = (
    "flat",
    "prefix_length",
    "bottleneck_size",
    "non_linearity",
    "dropout",
    "encoder_prefix",
    "cross_prefix",
    "leave_out",
    "use_gating",
    "shared_gating",
)
_IGNORED_FIELDS = ("architecture", "init_weights_seed")  # no effect on a trained adapter
_SAME_FAMILY = {"mt5": "t5"}

WHO = "load_adapters_prefix"


def _config(cfg: dict, path: str) -> PrefixTuningConfig:
    unknown = sorted(set(cfg) - set(_CONFIG_FIELDS) - set(_IGNORED_FIELDS))
    if unknown:
        raise ValueError(
            f"{WHO}: {path} has config fields {unknown} that prefixattn does not know; refusing to guess "
            f"what they change"
        )
    try:
        return PrefixTuningConfig(**{k: cfg[k] for k in _CONFIG_FIELDS if k in cfg})
    except (TypeError, ValueError) as e:
        raise ValueError(f"{WHO}: {path}: {e}") from None


def _split_keys(tensors: dict, saved_name: str, path: str) -> tuple[dict, dict]:
    """-> ({(location, param): tensor}, {(attention module path, param): tensor}); pool duplicates merged."""
    gens, gates = {}, {}
    gen_mark, gate_mark = f"prefix_tunings.{saved_name}.", f".prefix_tuning.prefix_gates.{saved_name}."
    unexpected = []
    for key, t in tensors.items():
        if gen_mark in key and (key.startswith(gen_mark) or f".{gen_mark}" in key):
            loc, _, param = key.split(gen_mark, 1)[1].partition(".")
            slot, target = (loc, param), gens
        elif gate_mark in key:
            module, param = key.split(gate_mark, 1)
            slot, target = (module, param), gates
        else:
            unexpected.append(key)
            continue
        if slot in target:
            if target[slot].shape != t.shape or not torch.equal(target[slot], t):
                raise ValueError(
                    f"{WHO}: {path}: the copies of {slot[0]}.{slot[1]} disagree ({key}); the file is inconsistent"
                )
            continue
        target[slot] = t
    if unexpected:
        raise ValueError(
            f"{WHO}: {path} holds tensors that are not prefix tuning of adapter {saved_name!r}: "
            f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
        )
    if not gens:
        raise ValueError(
            f"{WHO}: {path} holds no prefix tensors of adapter {saved_name!r} (keys like "
            f"'...prefix_tunings.{saved_name}.self_prefix...'); it holds {sorted(tensors)[:5]}"
        )
    return gens, gates


def _form(gens: dict, path: str) -> dict[str, str]:
    """{location: 'mlp' | 'flat'}, checking each location holds exactly one complete form."""
    forms = {}
    for loc in sorted({loc for loc, _ in gens}):
        if loc not in LOCATIONS:
            raise ValueError(f"{WHO}: {path} has a prefix at location {loc!r}; prefixattn knows {list(LOCATIONS)}")
        params = sorted(p for l, p in gens if l == loc)
        if params == [FLAT_PARAM]:
            forms[loc] = "flat"
        elif params == sorted(MLP_PARAMS):
            forms[loc] = "mlp"
        else:
            raise ValueError(
                f"{WHO}: {path}: location {loc!r} has tensors {params}; expected either the MLP "
                f"({list(MLP_PARAMS)}) or the flat vector ({FLAT_PARAM!r})"
            )
    if len(set(forms.values())) > 1:
        raise ValueError(f"{WHO}: {path} mixes MLP and flat locations ({forms})")
    return forms


def _site_paths(model) -> dict[str, tuple]:
    """{module path: (location, layer)} for every prefixable attention module, under both the model's names and
    the base model's names (adapters saves from either)."""
    out = {}
    prefix = getattr(model, "base_model_prefix", "")
    for name, m in model.named_modules():
        site = m.__dict__.get(attn.SITE_ATTR)
        if site is None:
            continue
        out[name] = site
        if prefix and name.startswith(prefix + "."):
            out.setdefault(name[len(prefix) + 1 :], site)
    return out


def read_adapters_checkpoint(model, path, adapter_name: str | None) -> PrefixAdapter:
    """Build a validated PrefixAdapter from an adapters checkpoint; touches no model."""
    store = get_store(model)
    geometry = store.geometry
    directory = require_dir(path, WHO)
    meta = read_json(directory, ADAPTERS_CONFIG, WHO)
    cfg_path = f"{directory}/{ADAPTERS_CONFIG}"
    if "peft_type" in meta:
        raise ValueError(
            f"{WHO}: {cfg_path} is a PEFT checkpoint (peft_type {meta['peft_type']!r}); use prefixattn.load_peft_prefix"
        )
    cfg = meta.get("config")
    if not isinstance(cfg, dict):
        raise ValueError(f"{WHO}: {cfg_path} has no 'config' object; not an adapters checkpoint")
    if cfg.get("architecture") != "prefix_tuning":
        raise ValueError(
            f"{WHO}: {cfg_path} holds an adapter of architecture {cfg.get('architecture')!r}; only "
            f"'prefix_tuning' adapters can be imported"
        )
    saved_name = meta.get("name")
    if not isinstance(saved_name, str) or not saved_name:
        raise ValueError(f"{WHO}: {cfg_path} has no adapter 'name' (needed to find its tensors)")
    name = adapter_name if adapter_name is not None else saved_name
    store.check_new_name(name)
    made_for = f"{meta.get('model_class')} ({meta.get('model_type')})"
    here = f"{geometry.model_class} ({geometry.model_type})"
    saved_type = meta.get("model_type")
    if saved_type is not None and _SAME_FAMILY.get(saved_type, saved_type) != _SAME_FAMILY.get(
        geometry.model_type, geometry.model_type
    ):
        raise ValueError(f"{WHO}: the checkpoint was made for {made_for}, not for this {here}")
    hidden = {spec.hidden_size for spec in geometry.locations.values()}
    if meta.get("hidden_size") is not None and meta["hidden_size"] not in hidden:
        raise ValueError(
            f"{WHO}: the checkpoint was made for hidden size {meta['hidden_size']} ({made_for}); this "
            f"{here} has {sorted(hidden)}"
        )
    config = _config(cfg, cfg_path)

    weights = find_weights(directory, ADAPTERS_WEIGHTS, WHO)
    gens, gates = _split_keys(read_tensors(weights, WHO), saved_name, weights)
    forms = _form(gens, weights)
    flat = set(forms.values()) == {"flat"}
    if config.flat and not flat:
        raise ValueError(f"{WHO}: {cfg_path} says flat=true but {weights} holds the MLP form")
    metadata = {"source": "adapters", "adapters_version": meta.get("version"), "adapters_name": saved_name}
    if flat and not config.flat:
        metadata["note"] = "saved by adapters with flat=false after eject; read as the flat prefix it holds"
    config = config.replace(flat=flat)
    try:
        adapter = PrefixAdapter(name, config, geometry, metadata=metadata)
    except ValueError as e:
        raise ValueError(f"{WHO}: the checkpoint's config does not fit this {here}: {e}") from None
    if sorted(forms) != sorted(adapter.rows):
        raise ValueError(
            f"{WHO}: the checkpoint has prefixes at {sorted(forms)}, but its config on this {here} "
            f"gives {sorted(adapter.rows)}; it was made for another model ({made_for})"
        )

    state = {}
    for loc in adapter.rows:
        if flat:
            vec = gens[(loc, FLAT_PARAM)]
            n, _, h, p, d = adapter.prefix_shape(loc)
            if vec.dim() != 1 or vec.numel() != p * n * 2 * h * d:
                raise ValueError(
                    f"{WHO}: {loc}.{FLAT_PARAM} has shape {list(vec.shape)}; expected a vector of P*L*2*H*d = "
                    f"{p}*{n}*2*{h}*{d} = {p * n * 2 * h * d} values for this {here}"
                )
            state[f"generators.{loc}.prefix"] = vec.view(p, n, 2, h, d).permute(1, 2, 3, 0, 4)
        else:
            for param in MLP_PARAMS:
                state[f"generators.{loc}.{param}"] = gens[(loc, param)]
    sites = _site_paths(model)
    for (module, param), t in gates.items():
        site = sites.get(module)
        if site is None:
            raise ValueError(
                f"{WHO}: the checkpoint has a gate at {module!r}, which is no attention module of this "
                f"{here}; it was made for another model ({made_for})"
            )
        state[f"gates.{site[0]}_{site[1]}.linear.{param}"] = t
    return load_checked_state(
        adapter, state, who=WHO, model=here, origin=f"; it was made for another model ({made_for})"
    )


def load_adapters_prefix(model, path, adapter_name: str | None = None, *, set_active: bool = False) -> str:
    """Import an adapters (AdapterHub) prefix-tuning checkpoint, MLP or flat form, gates included, as adapter
    `adapter_name` (default: the name saved in the checkpoint). Everything is read and checked before the
    model changes. Returns the adapter's name."""
    store = get_store(model)
    adapter = read_adapters_checkpoint(model, path, adapter_name)
    return install_adapter(store, adapter, set_active)
