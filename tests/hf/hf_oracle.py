"""A hand-made oracle for the transformers integration, independent of prefixattn's op.

It is registered as its own attention implementation ("prefix_oracle", with transformers' eager_mask as
mask function) and concatenates [prefix; K/V] by hand, adds the mask (and T5's position bias, zero on the
prefix columns), and runs an eager float64 softmax. Prefixes are attached per attention module by
`attach_prefixes` from an adapter's flat prefix.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface, AttentionMaskInterface, PretrainedConfig
from transformers.masking_utils import eager_mask

ORACLE = "prefix_oracle"
_PREFIX_ATTR = "_oracle_prefix"


def oracle_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    b, hq, sq, d = query.shape
    hkv = key.shape[1]
    scale = d**-0.5 if scaling is None else scaling
    q, k, v = query.double(), key.double(), value.double()
    bias = torch.zeros(b, 1, sq, k.shape[2], dtype=torch.float64)
    if attention_mask is not None:
        bias = bias + attention_mask.double()
    if kwargs.get("position_bias") is not None:
        bias = bias + kwargs["position_bias"].double()
    prefix = module.__dict__.get(_PREFIX_ATTR)
    if prefix is not None:
        pk, pv = prefix[0].double(), prefix[1].double()
        p = pk.shape[-2]
        k = torch.cat([pk.unsqueeze(0).expand(b, *pk.shape), k], dim=2)
        v = torch.cat([pv.unsqueeze(0).expand(b, *pv.shape), v], dim=2)
        bias = torch.cat([torch.zeros(*bias.shape[:-1], p, dtype=torch.float64), bias], dim=-1)
    k = k.repeat_interleave(hq // hkv, dim=1)
    v = v.repeat_interleave(hq // hkv, dim=1)
    scores = q @ k.transpose(-1, -2) * scale + bias
    probs = torch.softmax(scores, dim=-1)
    out = (probs @ v).to(query.dtype)
    return out.transpose(1, 2), None


AttentionInterface.register(ORACLE, oracle_attention)
AttentionMaskInterface.register(ORACLE, eager_mask)


def attach_prefixes(model, adapter_name: str | None) -> None:
    """Give every tagged attention module of `model` its (K, V) from the adapter's flat prefix (or none)."""
    from prefixattn.hf import get_store
    from prefixattn.hf.attention import SITE_ATTR

    flat, rows = {}, {}
    if adapter_name is not None:
        adapter = get_store(model).adapters[adapter_name]
        flat, rows = adapter.flat_prefix(), adapter.row_of
    for m in model.modules():
        site = m.__dict__.get(SITE_ATTR)
        if site is None:
            continue
        loc, layer = site
        row = rows.get(loc, {}).get(layer)
        m.__dict__[_PREFIX_ATTR] = None if row is None else (flat[loc][row, 0], flat[loc][row, 1])


def set_impl(model, name: str) -> None:
    """Switch the attention implementation of the model and every sub-config (T5 stacks have copies)."""
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if isinstance(cfg, PretrainedConfig):
            cfg._attn_implementation = name
