"""Import and export PEFT prefix-tuning checkpoints (adapter_config.json + adapter_model.safetensors).

PEFT's format (docs/hf.md, "PEFT"): one tensor `prompt_embeddings` [P, num_layers*2*token_dim]
(post-MLP; token_dim = KV heads x head dim). `view(P, 2N, H_kv, d)`: slot 2l holds layer l's keys and
slot 2l+1 its values. Seq2seq models (num_transformer_submodules=2) prefix only the decoder self-attention,
and PEFT's `cat([pkv, pkv]).split(4)` gives decoder layer l the slots (4l mod 2N, 4l+1 mod 2N).

Positions. PEFT keeps the prefix in the KV cache, so real tokens sit at positions P.. and the prefix keys
carry no rotation; prefixattn starts real tokens at 0. With positions="peft" the importer reproduces
PEFT's forward:
- RoPE families (llama, mistral, qwen2, qwen3): prefix keys are rotated by -P with the model's own
  inverse frequencies, so (R(t) q) . R(-P) k == (R(t+P) q) . k for every query position t; real-to-real
  scores depend only on distances and do not change. The model keeps its whole context length.
- Learned absolute positions (gpt2, bart's decoder) and T5's relative bias: no change of the prefix can
  express PEFT's frame, so the adapter gets metadata["position_offset"] = P and prefixattn.hf.positions runs
  it in that frame while it is active: real-token positions shifted by P (GPT-2, BART), or the prefix
  columns given the relative bias of the P tokens before the sequence (T5, which then concatenates).
positions="prefixattn" takes the prefix as it is (for users who adopt prefixattn's convention and will
train further). Export applies the inverse conversions, and refuses what PEFT cannot represent.
"""

from __future__ import annotations

import json
import os
import warnings

import torch
from torch import Tensor

from ..tuning.adapter import CROSS, ENCODER, SELF, PrefixAdapter
from ..tuning.config import PrefixTuningConfig
from . import positions as pos
from .checkpoint_files import find_weights, read_json, read_tensors, require_dir
from .install import get_store, install_adapter

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_KEY = "prompt_embeddings"

ROPE_TYPES = ("llama", "mistral", "qwen2", "qwen3")
OFFSET_TYPES = pos.OFFSET_MODEL_TYPES  # gpt2, bart, t5, mt5
POSITION_MODES = ("peft", "prefixattn")
_UNSUPPORTED_ROPE = ("dynamic", "longrope")  # frequencies depend on the sequence length


# -- geometry ---------------------------------------------------------------------------------------------
def _is_seq2seq(geometry) -> bool:
    return ENCODER in geometry.locations or CROSS in geometry.locations


def decoder_slots(n_layers: int, seq2seq: bool) -> list[tuple[int, int]]:
    """(key slot, value slot) of `view(P, 2N, H, d)` that PEFT feeds to each decoder layer."""
    if not seq2seq:
        return [(2 * l, 2 * l + 1) for l in range(n_layers)]
    return [((4 * l) % (2 * n_layers), (4 * l + 1) % (2 * n_layers)) for l in range(n_layers)]


def _model_type(model) -> str:
    return getattr(model.config, "model_type", None)


def _check_positions(positions) -> None:
    if positions not in POSITION_MODES:
        raise ValueError(f"positions: expected one of {', '.join(map(repr, POSITION_MODES))}, got {positions!r}")


# -- RoPE -------------------------------------------------------------------------------------------------
def rope_inverse_frequencies(model, who: str) -> Tensor:
    """The model's RoPE inverse frequencies [D/2] (float64), refusing rope types that depend on the length."""
    rotary = getattr(getattr(model, "base_model", model), "rotary_emb", None)
    inv_freq = getattr(rotary, "inv_freq", None)
    if not isinstance(inv_freq, Tensor):
        raise ValueError(
            f"{who}: {type(model).__name__} has no rotary embedding with inv_freq at "
            f"base_model.rotary_emb; cannot convert positions (use positions='prefixattn')"
        )
    rope_type = getattr(rotary, "rope_type", "default")
    if not isinstance(rope_type, str) or rope_type in _UNSUPPORTED_ROPE:
        raise ValueError(
            f"{who}: rope_type {rope_type!r} changes its frequencies with the sequence length, so no fixed "
            f"rotation of the prefix keys reproduces PEFT's +P positions; use positions='prefixattn'"
        )
    return inv_freq.detach().to("cpu", torch.float64)


def rotate_keys(keys: Tensor, inv_freq: Tensor, shift: int) -> Tensor:
    """Rotate keys [..., D] by `shift` positions with transformers' rotate_half RoPE convention (float64 math)."""
    d = keys.shape[-1]
    if 2 * inv_freq.numel() != d:
        raise ValueError(
            f"RoPE: the rotary embedding covers {2 * inv_freq.numel()} dims but the head dim is {d}; "
            f"partial rotary embeddings are not supported (use positions='prefixattn')"
        )
    angles = float(shift) * inv_freq
    emb = torch.cat([angles, angles])
    cos, sin = emb.cos(), emb.sin()
    k = keys.double()
    rotated_half = torch.cat([-k[..., d // 2 :], k[..., : d // 2]], dim=-1)
    return (k * cos + rotated_half * sin).to(keys.dtype)


def _sliding_window(config) -> int | None:
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None) or ()
    if window and (getattr(config, "model_type", None) == "mistral" or "sliding_attention" in layer_types):
        return window
    return None


def _position_plan(model, positions: str, p: int, who: str):
    """-> (key rotation shift or None, position offset, warning or None) for converting PEFT's frame."""
    if positions == "prefixattn":
        return None, 0, None
    model_type = _model_type(model)
    if model_type in ROPE_TYPES:
        window = _sliding_window(model.config)
        note = None
        if window:
            note = (
                f"{who}: {type(model).__name__} uses a sliding window of {window}; PEFT's prefix sits at "
                f"positions 0..{p - 1} and leaves the window as the sequence grows, while prefixattn's stays "
                f"visible, so logits match PEFT only for the first {max(window - p, 0)} tokens (padding "
                f"included)"
            )
        return -p, 0, note
    if model_type in OFFSET_TYPES:
        return None, p, None
    raise ValueError(
        f"{who}: no position conversion is known for model type {model_type!r}; use positions='prefixattn'"
    )


# -- import -----------------------------------------------------------------------------------------------
def _int_field(cfg: dict, key: str, path: str, minimum: int = 1) -> int:
    value = cfg.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"load_peft_prefix: {path}: {key} must be an int >= {minimum}, got {value!r}")
    return value


def read_peft_checkpoint(path, geometry, who: str = "load_peft_prefix") -> tuple[dict, Tensor, list]:
    """Read and validate a PEFT prefix checkpoint against a model geometry; touches no model.

    Returns (config, per-decoder-layer prefix [L, 2, Hkv, P, D] in PEFT's frame, the layer ids)."""
    directory = require_dir(path, who)
    cfg_path = os.path.join(directory, PEFT_CONFIG)
    cfg = read_json(directory, PEFT_CONFIG, who)
    if "config" in cfg and "peft_type" not in cfg:
        raise ValueError(
            f"{who}: {cfg_path} looks like an adapters (AdapterHub) checkpoint; use prefixattn.load_adapters_prefix"
        )
    if cfg.get("peft_type") != "PREFIX_TUNING":
        raise ValueError(
            f"{who}: {cfg_path} has peft_type {cfg.get('peft_type')!r}; only 'PREFIX_TUNING' checkpoints hold a prefix"
        )
    p = _int_field(cfg, "num_virtual_tokens", cfg_path)
    n_layers = _int_field(cfg, "num_layers", cfg_path)
    token_dim = _int_field(cfg, "token_dim", cfg_path)
    heads = _int_field(cfg, "num_attention_heads", cfg_path)
    submodules = (
        _int_field(cfg, "num_transformer_submodules", cfg_path)
        if "num_transformer_submodules" in cfg
        else (2 if cfg.get("task_type") == "SEQ_2_SEQ_LM" else 1)
    )

    seq2seq = _is_seq2seq(geometry)
    model = f"{geometry.model_class} ({geometry.model_type})"
    if SELF not in geometry.locations:
        raise ValueError(f"{who}: {model} has no decoder self-attention, the only place PEFT puts a prefix")
    if seq2seq and submodules != 2:
        raise ValueError(
            f"{who}: the checkpoint has num_transformer_submodules={submodules} (task_type "
            f"{cfg.get('task_type')!r}), a decoder-only layout, but {model} is an encoder-decoder "
            f"model (PEFT writes 2 and task_type 'SEQ_2_SEQ_LM' for those)"
        )
    if not seq2seq and submodules != 1:
        raise ValueError(
            f"{who}: the checkpoint has num_transformer_submodules={submodules} (an encoder-decoder "
            f"layout, task_type {cfg.get('task_type')!r}), but {model} is decoder-only"
        )
    spec = geometry.locations[SELF]
    if n_layers != len(spec.layers):
        raise ValueError(
            f"{who}: the checkpoint has num_layers={n_layers} but {model} has {len(spec.layers)} "
            f"{'decoder ' if seq2seq else ''}layers; it was made for another model"
        )
    if token_dim % heads or heads != spec.num_kv_heads or token_dim // heads != spec.head_dim:
        raise ValueError(
            f"{who}: the checkpoint's prefix has num_attention_heads={heads} KV heads and token_dim={token_dim} "
            f"(head dim {token_dim / heads:g}), but {model} has {spec.num_kv_heads} KV heads x head dim "
            f"{spec.head_dim} = {spec.num_kv_heads * spec.head_dim}; it was made for another model"
        )

    weights = find_weights(directory, PEFT_WEIGHTS, who)
    tensors = read_tensors(weights, who)
    if PEFT_KEY not in tensors:
        raise ValueError(f"{who}: {weights} has no {PEFT_KEY!r} tensor (it holds {sorted(tensors)})")
    extra = sorted(set(tensors) - {PEFT_KEY})
    if extra:
        raise ValueError(f"{who}: {weights} also holds {extra} (modules_to_save?); only the prefix can be imported")
    raw = tensors[PEFT_KEY]
    want = (p, n_layers * 2 * token_dim)
    if tuple(raw.shape) != want:
        raise ValueError(
            f"{who}: {PEFT_KEY} has shape {list(raw.shape)}, expected {list(want)} = [num_virtual_tokens, "
            f"num_layers*2*token_dim] from {cfg_path}"
        )
    if not raw.is_floating_point():
        raise ValueError(f"{who}: {PEFT_KEY} has dtype {raw.dtype}, expected a floating dtype")
    if not torch.isfinite(raw).all():
        raise ValueError(f"{who}: {PEFT_KEY} holds non-finite values")

    slots = raw.float().view(p, 2 * n_layers, heads, token_dim // heads).permute(1, 2, 0, 3)  # [2N, H, P, d]
    per_layer = torch.stack([torch.stack([slots[k], slots[v]]) for k, v in decoder_slots(n_layers, seq2seq)])
    return cfg, per_layer.contiguous(), list(spec.layers)


def load_peft_prefix(model, path, adapter_name: str, *, positions: str = "peft", set_active: bool = False) -> str:
    """Import a PEFT prefix-tuning checkpoint as a flat prefixattn adapter named `adapter_name`.

    positions="peft" converts PEFT's position frame so the forward logits match PEFT's (RoPE: prefix keys
    rotated by -P; GPT-2 / BART / T5: metadata position_offset=P). positions="prefixattn"
    takes the prefix unchanged. Everything is read and checked before the model changes. Returns the name.
    """
    who = "load_peft_prefix"
    store = get_store(model)
    store.check_new_name(adapter_name)
    _check_positions(positions)
    cfg, prefix, layers = read_peft_checkpoint(path, store.geometry, who)
    p = prefix.shape[3]
    shift, offset, note = _position_plan(model, positions, p, who)
    if shift is not None:
        inv_freq = rope_inverse_frequencies(model, who)
        prefix[:, 0] = rotate_keys(prefix[:, 0], inv_freq, shift)
    metadata = {
        "source": "peft",
        "positions": positions,
        "peft": {
            k: cfg.get(k)
            for k in (
                "peft_version",
                "task_type",
                "num_virtual_tokens",
                "num_layers",
                "token_dim",
                "num_attention_heads",
                "num_transformer_submodules",
                "prefix_projection",
                "base_model_name_or_path",
            )
            if k in cfg
        },
    }
    if offset:
        metadata[pos.METADATA_KEY] = offset
    config = PrefixTuningConfig(flat=True, prefix_length=p, encoder_prefix=False, cross_prefix=False)
    adapter = PrefixAdapter(adapter_name, config, store.geometry, metadata=metadata)
    adapter.set_flat_prefix({SELF: prefix})
    if note:
        warnings.warn(note, stacklevel=2)
    return install_adapter(store, adapter, set_active)


# -- export -----------------------------------------------------------------------------------------------
def _export_prefix(model, adapter: PrefixAdapter, positions: str, who: str) -> Tensor:
    """adapter's decoder prefix [L, 2, Hkv, P, D] converted to PEFT's frame; refuses what PEFT cannot hold."""
    geometry = adapter.geometry
    name = adapter.name
    if adapter.config.use_gating:
        raise ValueError(f"{who}: adapter {name!r} uses gating, which PEFT prefix tuning does not have")
    other = sorted(set(adapter.rows) - {SELF})
    if other:
        raise ValueError(
            f"{who}: adapter {name!r} has prefixes at {other}; PEFT prefixes only the decoder "
            f"self-attention of encoder-decoder models (its encoder and cross-attention prefixes are "
            f"dropped), so this adapter cannot be exported"
        )
    all_layers = list(geometry.locations[SELF].layers)
    if SELF not in adapter.rows or list(adapter.rows[SELF]) != all_layers:
        raise ValueError(
            f"{who}: adapter {name!r} leaves out layers (leave_out={list(adapter.config.leave_out)}); "
            f"PEFT puts a prefix in every layer, so this adapter cannot be exported"
        )
    prefix = adapter.flat_prefix()[SELF].detach().to("cpu", torch.float32)
    p = adapter.config.prefix_length
    if positions == "prefixattn":
        return prefix
    model_type = _model_type(model)
    if model_type in ROPE_TYPES:
        inv_freq = rope_inverse_frequencies(model, who)
        prefix[:, 0] = rotate_keys(prefix[:, 0], inv_freq, p)
        window = _sliding_window(model.config)
        if window:
            warnings.warn(
                f"{who}: with a sliding window of {window}, PEFT's prefix leaves the window as the "
                f"sequence grows; the export matches prefixattn only for the first {max(window - p, 0)} "
                f"tokens (padding included)",
                stacklevel=3,
            )
    elif model_type in OFFSET_TYPES:
        offset = pos.adapter_offset(adapter)
        if offset != p:
            kind = "a relative position bias" if model_type in ("t5", "mt5") else "learned absolute positions"
            raise ValueError(
                f"{who}: adapter {name!r} runs with real tokens at positions +{offset}, but PEFT puts them at +{p} "
                f"(its prefix length). {type(model).__name__} has {kind}, so no change of the prefix makes PEFT "
                f"compute the same logits; an exact export needs an adapter trained with metadata "
                f"{{'{pos.METADATA_KEY}': {p}}} (as load_peft_prefix sets). positions='prefixattn' writes the "
                f"prefix unchanged (PEFT's logits will differ)"
            )
    else:
        raise ValueError(
            f"{who}: no position conversion is known for model type {model_type!r}; use positions='prefixattn'"
        )
    return prefix


def save_peft_prefix(model, adapter_name: str, path, *, positions: str = "peft") -> int:
    """Write adapter `adapter_name` as a PEFT prefix-tuning checkpoint that `PeftModel.from_pretrained(base,
    path)` loads (adapter_config.json + adapter_model.safetensors). Returns the bytes written."""
    from safetensors.torch import save_file

    who = "save_peft_prefix"
    _check_positions(positions)
    store = get_store(model)
    adapter = store.get(adapter_name)
    prefix = _export_prefix(model, adapter, positions, who)  # [N, 2, H, P, d]
    n, _, heads, p, d = prefix.shape
    seq2seq = _is_seq2seq(adapter.geometry)
    slots = prefix.new_zeros(2 * n, heads, p, d)
    filled: dict[int, int] = {}
    for layer, (k, v) in enumerate(decoder_slots(n, seq2seq)):
        if k in filled:
            if not (torch.equal(slots[k], prefix[layer, 0]) and torch.equal(slots[v], prefix[layer, 1])):
                raise ValueError(
                    f"{who}: PEFT feeds decoder layers {filled[k]} and {layer} of this {n}-layer encoder-decoder "
                    f"the same prefix (its cat+split scrambling), but adapter {adapter_name!r} "
                    f"has different prefixes there; with an even decoder layer count only adapters whose layers "
                    f"l and l+{n // 2} agree can be exported"
                )
            continue
        filled[k] = layer
        slots[k], slots[v] = prefix[layer, 0], prefix[layer, 1]
    prompt = slots.permute(2, 0, 1, 3).reshape(p, 2 * n * heads * d).contiguous()
    config = {
        "peft_type": "PREFIX_TUNING",
        "task_type": "SEQ_2_SEQ_LM" if seq2seq else "CAUSAL_LM",
        "num_virtual_tokens": p,
        "num_layers": n,
        "token_dim": heads * d,
        "num_attention_heads": heads,
        "num_transformer_submodules": 2 if seq2seq else 1,
        "encoder_hidden_size": heads * d,
        "prefix_projection": False,
        "inference_mode": True,
        "base_model_name_or_path": getattr(model.config, "_name_or_path", None) or None,
        "revision": None,
        "modules_to_save": None,
        "auto_mapping": None,
    }
    directory = os.fspath(path)
    os.makedirs(directory, exist_ok=True)
    weights = os.path.join(directory, PEFT_WEIGHTS[0])
    save_file({PEFT_KEY: prompt}, weights, metadata={"format": "pt"})
    with open(os.path.join(directory, PEFT_CONFIG), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    return os.path.getsize(weights) + os.path.getsize(os.path.join(directory, PEFT_CONFIG))
