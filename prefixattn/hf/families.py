"""Per-family facts: where the attention modules are, which location each is, and their KV geometry.

Head geometry comes from the model config (num_key_value_heads, an explicit head_dim when the config has
one; T5's d_kv) and is cross-checked against the attention module's own projection sizes, so a config
that does not describe the modules is reported instead of producing wrongly shaped prefixes.
Global layer ids: decoder-only models 0..L-1; encoder-decoder models number the encoder layers first
(0..Le-1) and the decoder layers after them (Le..Le+Ld-1); a decoder layer's self- and cross-attention share
its id (as in adapters).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from ..tuning.adapter import CROSS, ENCODER, SELF, LocationSpec, ModelGeometry


@dataclass(frozen=True)
class Site:
    """One attention module that can take a prefix."""

    location: str
    layer: int  # global layer id
    module: nn.Module


class UnsupportedModelError(ValueError):
    pass


def _config_attr(config, *names, default=None):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def _model_name(model) -> str:
    return f"{type(model).__name__} (model_type {getattr(model.config, 'model_type', None)!r})"


def _require(obj, path: str, model):
    cur = obj
    for part in path.split("."):
        if part.isdigit():
            cur = cur[int(part)]
        else:
            if not hasattr(cur, part):
                raise UnsupportedModelError(
                    f"prefixattn: {_model_name(model)} has no `{path}`; this model structure is not supported"
                )
            cur = getattr(cur, part)
    return cur


def _check_proj(model, module: nn.Module, proj_out: int | None, heads: int, head_dim: int, where: str):
    if proj_out is not None and proj_out != heads * head_dim:
        raise UnsupportedModelError(
            f"prefixattn: {_model_name(model)}: the config gives {heads} KV heads x head dim {head_dim} = "
            f"{heads * head_dim} for {where}, but the module projects keys to {proj_out} features"
        )


# -- decoder-only families with GQA (Llama, Mistral, Qwen2, Qwen3) -------------------------------------------
def _llama_sites(model) -> tuple[list[Site], ModelGeometry]:
    config = model.config
    layers = _require(model.base_model, "layers", model)
    heads = config.num_attention_heads
    hkv = _config_attr(config, "num_key_value_heads", default=heads)
    head_dim = _config_attr(config, "head_dim", default=config.hidden_size // heads)
    sites = []
    for i, layer in enumerate(layers):
        attn = _require(layer, "self_attn", model)
        _check_proj(
            model, attn, getattr(getattr(attn, "k_proj", None), "out_features", None), hkv, head_dim, f"layer {i}"
        )
        sites.append(Site(SELF, i, attn))
    geometry = ModelGeometry(
        config.model_type,
        type(model).__name__,
        len(sites),
        {SELF: LocationSpec(SELF, tuple(range(len(sites))), hkv, head_dim, config.hidden_size)},
    )
    return sites, geometry


# -- GPT-2 ------------------------------------------------------------------------------------------------
def _gpt2_sites(model) -> tuple[list[Site], ModelGeometry]:
    config = model.config
    blocks = _require(model.base_model, "h", model)
    heads = config.n_head
    head_dim = config.n_embd // heads
    sites = []
    for i, block in enumerate(blocks):
        attn = _require(block, "attn", model)
        if getattr(attn, "head_dim", head_dim) != head_dim or getattr(attn, "num_heads", heads) != heads:
            raise UnsupportedModelError(f"prefixattn: {_model_name(model)}: layer {i} heads disagree with the config")
        sites.append(Site(SELF, i, attn))
    # GPT-2's optional cross-attention (add_cross_attention) is left without a prefix.
    geometry = ModelGeometry(
        config.model_type,
        type(model).__name__,
        len(sites),
        {SELF: LocationSpec(SELF, tuple(range(len(sites))), heads, head_dim, config.n_embd)},
    )
    return sites, geometry


# -- encoder-decoders ---------------------------------------------------------------------------------------
def _encdec_geometry(model, enc: list, dec_self: list, dec_cross: list, heads_of: Callable, hidden: int):
    """Build sites and geometry from per-stack lists of attention modules (encoder first)."""
    sites, locations = [], {}
    offset = len(enc)
    for loc, modules, base in ((ENCODER, enc, 0), (SELF, dec_self, offset), (CROSS, dec_cross, offset)):
        if not modules:
            continue
        geo = {heads_of(loc, m) for m in modules}
        if len(geo) != 1:
            raise UnsupportedModelError(
                f"prefixattn: {_model_name(model)}: {loc} layers have different head shapes {sorted(geo)}"
            )
        hkv, head_dim = geo.pop()
        layers = tuple(base + i for i in range(len(modules)))
        locations[loc] = LocationSpec(loc, layers, hkv, head_dim, hidden)
        sites += [Site(loc, base + i, m) for i, m in enumerate(modules)]
    total = len(enc) + max(len(dec_self), len(dec_cross))
    return sites, ModelGeometry(model.config.model_type, type(model).__name__, total, locations)


def _t5_sites(model) -> tuple[list[Site], ModelGeometry]:
    config = model.config
    base = model.base_model
    heads, head_dim = config.num_heads, config.d_kv
    enc, dec_self, dec_cross = [], [], []
    if getattr(base, "encoder", None) is not None:
        for block in _require(base, "encoder.block", model):
            enc.append(_require(block, "layer.0.SelfAttention", model))
    if getattr(base, "decoder", None) is not None:
        for block in _require(base, "decoder.block", model):
            dec_self.append(_require(block, "layer.0.SelfAttention", model))
            dec_cross.append(_require(block, "layer.1.EncDecAttention", model))
    if not enc and not dec_self:
        raise UnsupportedModelError(f"prefixattn: {_model_name(model)} has neither an encoder nor a decoder stack")

    def heads_of(loc, m):
        _check_proj(model, m, m.k.out_features, heads, head_dim, loc)
        return (m.n_heads, m.key_value_proj_dim)

    return _encdec_geometry(model, enc, dec_self, dec_cross, heads_of, config.d_model)


def _bart_sites(model) -> tuple[list[Site], ModelGeometry]:
    config = model.config
    base = model.base_model
    enc, dec_self, dec_cross = [], [], []
    if getattr(base, "encoder", None) is not None:
        enc = [_require(layer, "self_attn", model) for layer in _require(base, "encoder.layers", model)]
    decoder = getattr(base, "decoder", None)
    if decoder is not None:
        for layer in _require(decoder, "layers", model):
            dec_self.append(_require(layer, "self_attn", model))
            if getattr(base, "encoder", None) is not None:  # BartForCausalLM has no encoder to attend to
                dec_cross.append(_require(layer, "encoder_attn", model))

    def heads_of(loc, m):
        _check_proj(model, m, m.k_proj.out_features, m.num_heads, m.head_dim, loc)
        return (m.num_heads, m.head_dim)

    return _encdec_geometry(model, enc, dec_self, dec_cross, heads_of, config.d_model)


_FAMILIES = {
    "llama": _llama_sites,
    "mistral": _llama_sites,
    "qwen2": _llama_sites,
    "qwen3": _llama_sites,
    "gpt2": _gpt2_sites,
    "t5": _t5_sites,
    "mt5": _t5_sites,
    "bart": _bart_sites,
}

SUPPORTED_MODEL_TYPES = tuple(sorted(_FAMILIES))


def find_sites(model) -> tuple[list[Site], ModelGeometry]:
    """The prefixable attention modules of `model` and its geometry; raises UnsupportedModelError otherwise."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in _FAMILIES:
        raise UnsupportedModelError(
            f"prefixattn: model type {model_type!r} ({type(model).__name__}) is not supported; supported model "
            f"types: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    sites, geometry = _FAMILIES[model_type](model)
    if not sites:
        raise UnsupportedModelError(f"prefixattn: {_model_name(model)} has no attention layers to prefix")
    return sites, geometry


def entry_modules(model) -> list[nn.Module]:
    """Modules whose forward starts a prefix context: the model, its base model, and the encoder / decoder
    stacks (generate() calls the encoder on its own)."""
    out = [model]
    base = getattr(model, "base_model", model)
    for m in (base, getattr(base, "encoder", None), getattr(base, "decoder", None)):
        if isinstance(m, nn.Module) and all(m is not o for o in out):
            out.append(m)
    return out
