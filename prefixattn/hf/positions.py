"""Per-adapter position offsets: PEFT's position frame for GPT-2, BART's decoder and T5's decoder.

PEFT stores its prefix in the KV cache: the prefix occupies positions 0..P-1 and real tokens start at P.
For RoPE models the importer turns that into a rotation of the prefix keys (prefixattn.hf.peft_compat),
but other position schemes have no such equivalent, so an adapter can ask to run in that frame with
`metadata["position_offset"] = P` (saved with it by save_adapter, so it survives a reload):
- GPT-2 and BART (learned absolute positions): a pre-hook on the position embedding adds P to the
  positions the model computed (plain forwards, given position_ids and generate alike).
- T5 (relative bias): real-to-real distances do not change, but the prefix columns get the relative bias
  of tokens just before the sequence (memory positions -P..-1 for a query at its own position), computed
  from the decoder's relative_attention_bias. The kernel has no bias input for prefix columns, so in this
  mode the prefix is concatenated before the sequence keys of each decoder self-attention call (a copy per
  sequence, the cost prefixattn otherwise avoids; import with positions="prefixattn" to keep the shared
  buffer). Only the offset's being positive matters here (relative positions do not depend on its value).

With a per-sequence choice of adapters (prefix_choice), all chosen sequences must agree on the offset
(sequences without a prefix count as offset 0); a mix raises a ValueError naming the adapters.

Positions from the attention mask (decoder-only families): prefix keys carry no position, so a prefixed
model's output depends on the queries' absolute positions. generate() derives them from the attention mask
(`cumsum(mask) - 1`, real tokens start at 0 in every row), while a plain forward without position_ids counts
from the first column, padding included. So when a forward of a prepared model gets an attention_mask
but no position_ids, mask_position_ids gives it generate's positions: a left-padded training batch then
trains in the frame generation uses. This holds with or without an active adapter, so the frame never depends
on which adapters are active or chosen (for RoPE models without a prefix it changes nothing: scores depend only
on distances; GPT-2's learned positions then follow the mask as in its generate()).
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn

from ._keys import STORE_ATTR, T5_BIAS_ATTR

METADATA_KEY = "position_offset"
_OFFSET_ATTR = "_prefixattn_position_offset"  # cached on the ForwardContext: one host sync per forward at most


OFFSET_MODEL_TYPES = ("gpt2", "bart", "t5", "mt5")
# Decoder-only families whose forward takes position_ids and whose generate() derives them from the mask.
# Encoder-decoders need nothing: BART's encoder and T5 count positions the same way in training and generate.
MASK_POSITION_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gpt2")
_PARAMS_ATTR = "_prefixattn_forward_params"  # cached forward parameter names of an entry module


def position_module(model) -> nn.Module | None:
    """The module whose input holds the (decoder) positions that PEFT shifts (GPT-2 / BART), else None."""
    model_type = getattr(model.config, "model_type", None)
    base = getattr(model, "base_model", model)
    if model_type == "gpt2":
        return getattr(base, "wpe", None)
    if model_type == "bart":
        decoder = getattr(base, "decoder", None)
        return getattr(decoder, "embed_positions", None)
    return None


def supports_offset(model) -> bool:
    return getattr(model.config, "model_type", None) in OFFSET_MODEL_TYPES


def _t5_decoder_self_attention(model) -> list:
    decoder = getattr(getattr(model, "base_model", model), "decoder", None)
    blocks = getattr(decoder, "block", None)
    if blocks is None:
        return []
    return [block.layer[0].SelfAttention for block in blocks]


def install(model, store) -> None:
    """Hook the position embedding of `model` (GPT-2 wpe, BART decoder embed_positions), or tag T5's decoder
    self-attention modules with the module that owns the relative bias; no-op for other families."""
    if getattr(model.config, "model_type", None) in ("t5", "mt5"):
        attns = _t5_decoder_self_attention(model)
        for a in attns:
            a.__dict__[T5_BIAS_ATTR] = attns[0]  # layer 0 owns relative_attention_bias (shared by the stack)
        return
    module = position_module(model)
    if module is None:
        return
    module.__dict__[STORE_ATTR] = store
    module.register_forward_pre_hook(_shift_positions, with_kwargs=True)


def check_offset(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{where}: metadata[{METADATA_KEY!r}] must be a non-negative int, got {value!r}")
    return value


def check_metadata(model, metadata, who: str) -> None:
    """A position_offset must be a non-negative int, and only families with an offset hook honour it."""
    if not metadata or METADATA_KEY not in metadata:
        return
    offset = check_offset(metadata[METADATA_KEY], who)
    if offset and not supports_offset(model):
        raise ValueError(
            f"{who}: metadata[{METADATA_KEY!r}] = {offset}, but {type(model).__name__} (model type "
            f"{getattr(model.config, 'model_type', None)!r}) has no position offset; it is honoured for "
            f"{', '.join(OFFSET_MODEL_TYPES)}. RoPE models reach PEFT's position frame by rotating the prefix keys "
            f"by -P instead (load_peft_prefix does it)"
        )


def adapter_offset(adapter) -> int:
    return check_offset(adapter.metadata.get(METADATA_KEY, 0), f"adapter {adapter.name!r}")


def current_offset(store) -> int:
    """The position offset of the forward in progress (0 when no active adapter asks for one)."""
    ctx = store._current
    active = ctx.active if ctx is not None else tuple(store.active)
    if not active:
        return 0
    offsets = [adapter_offset(store.adapters[name]) for name in active]
    if not any(offsets):
        return 0
    if ctx is None or ctx.choice is None:
        return offsets[0]
    cached = ctx.__dict__.get(_OFFSET_ATTR)
    if cached is not None:
        return cached
    chosen = sorted(set(ctx.choice.tolist()))
    used = {(active[i] if i >= 0 else None): (offsets[i] if i >= 0 else 0) for i in chosen}
    if len(set(used.values())) > 1:
        raise ValueError(
            "prefix_choice: the chosen adapters shift real-token positions differently "
            f"({', '.join(f'{n or None!r}: +{o}' for n, o in used.items())}; metadata[{METADATA_KEY!r}], set by "
            "load_peft_prefix for GPT-2 / BART). Sequences with different position offsets cannot share a "
            "batch; run them in separate calls"
        )
    offset = next(iter(used.values()))
    ctx.__dict__[_OFFSET_ATTR] = offset
    return offset


def _input(name: str, params: list, args: tuple, kwargs: dict):
    """The value of forward argument `name`, given by keyword or position (None if absent)."""
    if name in kwargs:
        return kwargs[name]
    i = params.index(name) if name in params else len(args)
    return args[i] if i < len(args) else None


def mask_position_ids(module, model_type: str, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Give a decoder-only forward with an attention_mask and no position_ids the positions generate() uses:
    `cumsum(mask) - 1` at real tokens, 0 at padding, the last S columns for S new tokens. Left alone: other
    families, a given position_ids, no mask or a 4-D one, and a mask that does not cover the cached tokens."""
    if model_type not in MASK_POSITION_MODEL_TYPES:
        return args, kwargs
    params = module.__dict__.get(_PARAMS_ATTR)
    if params is None:
        params = list(inspect.signature(module.forward).parameters)
        module.__dict__[_PARAMS_ATTR] = params
    if "position_ids" not in params or _input("position_ids", params, args, kwargs) is not None:
        return args, kwargs
    mask = _input("attention_mask", params, args, kwargs)
    if not isinstance(mask, Tensor) or mask.dim() != 2:
        return args, kwargs
    tokens = _input("input_ids", params, args, kwargs)
    if not isinstance(tokens, Tensor):
        tokens = _input("inputs_embeds", params, args, kwargs)
    if not isinstance(tokens, Tensor) or tokens.dim() < 2:
        return args, kwargs
    s = tokens.shape[1]
    if mask.shape[1] < s or (mask.shape[1] == s and _past_length(params, args, kwargs) > 0):
        return args, kwargs  # not a mask over cache + new tokens: keep the model's own positions
    ids = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)[:, -s:]
    i = params.index("position_ids")
    if i < len(args):  # passed positionally as None
        return (*args[:i], ids, *args[i + 1 :]), kwargs
    return args, {**kwargs, "position_ids": ids}


def _past_length(params: list, args: tuple, kwargs: dict) -> int:
    for name in ("cache", "past_key_values"):  # transformers >= 5.24 / 5.17
        cache = _input(name, params, args, kwargs) if name in params or name in kwargs else None
        if cache is not None and hasattr(cache, "get_seq_length"):
            return int(cache.get_seq_length())
    return 0


def _shift_positions(module, args, kwargs):
    store = module.__dict__[STORE_ATTR]
    offset = current_offset(store)
    if offset == 0:
        return None
    if isinstance(kwargs.get("position_ids"), Tensor):  # BART passes position_ids (5.17 and 5.24)
        kwargs["position_ids"] = kwargs["position_ids"] + offset
        return args, kwargs
    if isinstance(module, nn.Embedding) and type(module) is nn.Embedding:  # GPT-2 wpe(position_ids)
        return (args[0] + offset, *args[1:]), kwargs
    # BART without position_ids: forward(input_ids, cache_length / past_key_values_length)
    if len(args) >= 2:
        return (args[0], args[1] + offset, *args[2:]), kwargs
    for key in ("cache_length", "past_key_values_length"):
        if key in kwargs:
            kwargs[key] = kwargs[key] + offset
            return args, kwargs
    return (args[0], offset), kwargs


def t5_prefix_columns(module, store, query: Tensor, key: Tensor, value: Tensor, kpm, bias, prefix):
    """T5 decoder self-attention with an adapter in PEFT's frame: concatenate the prefix before the keys, with
    the relative bias of memory positions -P..-1. Returns (key, value, kpm, bias, prefix) for the op."""
    if current_offset(store) == 0:
        return key, value, kpm, bias, prefix
    pk, pv, pidx, plen = prefix
    if pidx is not None or pk.dim() != 3:
        raise ValueError(
            "T5 adapters with metadata position_offset (PEFT's position frame) run only as the single "
            "active adapter, without prefix_choice or gating"
        )
    source = module.__dict__[T5_BIAS_ATTR]
    b, hq, sq, _ = query.shape
    p, sk = pk.shape[1], key.shape[2]
    past = sk - sq  # cached real tokens before the first query
    device = query.device
    context = torch.arange(sq, device=device)[:, None] + past
    memory = torch.arange(p, device=device)[None, :] - p
    bucket = source._relative_position_bucket(
        memory - context,
        bidirectional=not source.is_decoder,
        num_buckets=source.relative_attention_num_buckets,
        max_distance=source.relative_attention_max_distance,
    )
    prefix_bias = source.relative_attention_bias(bucket).permute(2, 0, 1).unsqueeze(0).to(query.dtype)
    seq_bias = bias if bias is not None else query.new_zeros(1, 1, sq, sk)
    lead = (max(prefix_bias.shape[0], seq_bias.shape[0]), hq, sq)
    bias = torch.cat([prefix_bias.expand(*lead, p), seq_bias.to(query.dtype).expand(*lead, sk)], dim=-1)
    key = torch.cat([pk.unsqueeze(0).expand(b, *pk.shape).to(key.dtype), key], dim=2)
    value = torch.cat([pv.unsqueeze(0).expand(b, *pv.shape).to(value.dtype), value], dim=2)
    if kpm is not None:
        kpm = torch.cat([torch.ones(b, p, dtype=torch.bool, device=kpm.device), kpm.to(torch.bool)], dim=1)
    return key, value, kpm, bias, None
