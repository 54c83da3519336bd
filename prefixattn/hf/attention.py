"""The "prefixattn" attention implementation for transformers, and its mask function.

Registered in transformers' AttentionInterface and AttentionMaskInterface under the name "prefixattn"
(a name free of "flash", "sdpa", "flex_attention" and "org/repo" patterns, which transformers treats
specially; docs/design.md, "transformers' attention interface").

Masks. The mask function returns a LightMask (2-D key padding + query offset + causal flag) whenever the
mask is plain causal or bidirectional, so padding reaches the kernel as key_padding_mask [B, Sk] and no
[B, 1, Sq, Sk] tensor is built. Anything else (sliding windows, packed sequences, custom overlays) falls
back to transformers' own sdpa_mask, materialised as a boolean [B, 1, Sq, Sk] tensor, which the attention
function turns into an additive 0/-inf attn_bias on the sequence keys (the prefix stays visible).
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import bidirectional_mask_function, causal_mask_function, sdpa_mask

from ..ops import prefix_attention
from ._keys import CONTEXT_KWARG, HIDDEN_ATTR, SITE_ATTR, STORE_ATTR, T5_BIAS_ATTR
from .positions import t5_prefix_columns

NAME = "prefixattn"


class LightMask:
    """What a plain causal / bidirectional mask needs, without materialising it.

    padding: bool [B, kv_length] (True = real token) or None; q_offset: position of the first query in the
    keys (an int); causal: causal over the sequence keys.
    `ndim` lets transformers feed a prepared mask back into its mask code (generate() builds the mask in
    advance for compileable caches and passes it as attention_mask); the mask function then returns
    it unchanged.
    """

    ndim = 4
    __slots__ = ("padding", "q_offset", "q_length", "kv_length", "causal")

    def __init__(self, padding: Tensor | None, q_offset, q_length: int, kv_length: int, causal: bool):
        self.padding, self.q_offset, self.q_length, self.kv_length, self.causal = (
            padding,
            q_offset,
            q_length,
            kv_length,
            causal,
        )

    def __repr__(self):
        pad = None if self.padding is None else list(self.padding.shape)
        return (
            f"LightMask(padding={pad}, q_offset={self.q_offset}, q_length={self.q_length}, "
            f"kv_length={self.kv_length}, causal={self.causal})"
        )


def _fit_padding(padding: Tensor | None, kv_length: int) -> Tensor | None:
    """The 2-D mask indexed by absolute key position, cut or padded (with False) to kv_length keys."""
    if padding is None:
        return None
    padding = padding.to(torch.bool)
    if padding.shape[-1] > kv_length:
        return padding[:, :kv_length]
    if padding.shape[-1] < kv_length:
        return torch.nn.functional.pad(padding, (0, kv_length - padding.shape[-1]), value=False)
    return padding


def _drop_if_all_real(padding: Tensor | None) -> Tensor | None:
    """None for a mask with no padded key (what a tokenizer returns for an unpadded batch), so kernels skip the
    mask and backend "sdpa", which takes none, can run. One host sync per mask, i.e. per forward, as
    transformers' sdpa path does; skipped while compiling or capturing a CUDA graph (the mask stays)."""
    if padding is None or torch.compiler.is_compiling():
        return padding
    if padding.is_cuda and torch.cuda.is_current_stream_capturing():
        return padding
    return None if bool(padding.all()) else padding


def prefixattn_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset=0,
    kv_offset=0,
    mask_function=causal_mask_function,
    attention_mask=None,
    **kwargs,
):
    """Mask function for AttentionMaskInterface (called by create_causal_mask / create_bidirectional_mask)."""
    plain = mask_function is causal_mask_function or mask_function is bidirectional_mask_function
    if isinstance(attention_mask, LightMask):
        if plain:
            return attention_mask  # a prepared mask fed back by generate()
        attention_mask = attention_mask.padding
    if plain and not isinstance(kv_offset, Tensor) and kv_offset == 0:
        # A StaticCache hands q_offset over as its own length counter, which the first layer's cache update
        # then increments in place: take its value now (one host sync per forward, none per layer).
        q_offset = int(q_offset)
        return LightMask(
            _drop_if_all_real(_fit_padding(attention_mask, kv_length)),
            q_offset,
            q_length,
            kv_length,
            causal=mask_function is causal_mask_function,
        )
    kwargs.pop("allow_is_causal_skip", None)
    kwargs.pop("allow_is_bidirectional_skip", None)
    mask = sdpa_mask(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        mask_function=mask_function,
        attention_mask=attention_mask,
        allow_is_causal_skip=False,
        allow_is_bidirectional_skip=False,
        **kwargs,
    )
    dtype = kwargs.get("dtype")
    if isinstance(mask, Tensor) and mask.dtype == torch.bool and dtype is not None and dtype.is_floating_point:
        # Additive 0/-inf once per forward here, rather than once per layer in the attention function.
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    return mask


def _translate_mask(module, query: Tensor, key: Tensor, value: Tensor, attention_mask, kwargs):
    """-> (key, value, causal, key_padding_mask, attn_bias) in prefix_attention's terms."""
    sq, sk = query.shape[2], key.shape[2]
    kpm = bias = None
    if isinstance(attention_mask, LightMask):
        lm = attention_mask
        keep = min(sk, lm.kv_length)
        causal = lm.causal
        if causal:
            # A StaticCache hands over all max_cache_len slots; the ones after the current tokens are empty.
            # Cropping to q_offset + Sq makes the op's bottom-right causal alignment exact.
            keep = min(keep, lm.q_offset + sq)
        if lm.padding is not None:
            kpm = lm.padding[:, :keep]
    elif attention_mask is None:
        keep = sk
        causal = bool(kwargs.get("is_causal", getattr(module, "is_causal", False))) and sq > 1
    elif isinstance(attention_mask, Tensor) and attention_mask.dim() == 4:
        keep = min(sk, attention_mask.shape[-1])
        mask = attention_mask[..., :keep]
        if mask.dtype == torch.bool:
            bias = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(~mask, float("-inf"))
        else:
            bias = mask.to(query.dtype)
        causal = False  # the dense mask already holds the causal pattern
    elif isinstance(attention_mask, Tensor) and attention_mask.dim() == 2:
        keep = min(sk, attention_mask.shape[-1])
        kpm = attention_mask[:, :keep].to(torch.bool)
        causal = bool(getattr(module, "is_causal", False)) and sq > 1
    else:
        raise TypeError(
            f"prefixattn attention: unsupported attention_mask {type(attention_mask).__name__} "
            f"of shape {getattr(attention_mask, 'shape', None)}"
        )
    if keep < sk:
        key, value = key[:, :, :keep], value[:, :, :keep]
    position_bias = kwargs.get("position_bias")  # T5: relative position bias on the sequence keys only
    if position_bias is not None:
        pb = position_bias[..., :keep]
        if pb.requires_grad and pb.grad_fn is None:
            # T5 makes its all-zero bias a grad-requiring leaf under gradient checkpointing; it is no
            # parameter, so detaching it loses nothing and keeps the kernel backends usable.
            pb = pb.detach()
        bias = pb if bias is None else pb + bias
    if causal and query.shape[2] > key.shape[2]:
        causal = False  # cannot happen with transformers' masks; bottom-right would hide everything
    return key, value, causal, kpm, bias


def prefixattn_attention(
    module, query: Tensor, key: Tensor, value: Tensor, attention_mask, scaling=None, dropout: float = 0.0, **kwargs
):
    """AttentionInterface function: q [B, Hq, Sq, D], k/v [B, Hkv, Sk, D] -> ([B, Sq, Hq, D], None)."""
    device_type = query.device.type
    if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
        # Autocast leaves RoPE'd q/k in float32 next to a low-precision v; do what autocast does for SDPA.
        dtype = torch.get_autocast_dtype(device_type)
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    ctx = kwargs.get(CONTEXT_KWARG)
    store = module.__dict__.get(STORE_ATTR)
    if store is None and ctx is not None:
        store = ctx.store
    if ctx is None and store is not None:
        ctx = store_context(store, query)
    key, value, causal, kpm, bias = _translate_mask(module, query, key, value, attention_mask, kwargs)
    prefix = None
    site = module.__dict__.get(SITE_ATTR)
    if ctx is not None and site is not None:
        prefix = ctx.layer_prefix(
            site[0],
            site[1],
            dtype=query.dtype,
            batch=query.shape[0],
            hidden_states=module.__dict__.pop(HIDDEN_ATTR, None),
        )
    if prefix is not None and T5_BIAS_ATTR in module.__dict__:  # T5 in PEFT's position frame: prefix columns get a bias
        key, value, kpm, bias, prefix = t5_prefix_columns(module, store, query, key, value, kpm, bias, prefix)
    pk, pv, pidx, plen = prefix if prefix is not None else (None, None, None, None)
    out = prefix_attention(
        query,
        key,
        value,
        pk,
        pv,
        prefix_index=pidx,
        prefix_lengths=plen,
        causal=causal,
        key_padding_mask=kpm,
        softmax_scale=scaling,
        backend=store.backend if store is not None else "auto",
        attn_bias=bias,
        dropout_p=float(dropout or 0.0),
        deterministic=store.deterministic if store is not None else True,
    )
    return out.transpose(1, 2), None


def store_context(store, query: Tensor):
    """The context of the forward in progress, or (an attention module called outside any model forward)
    a fresh one."""
    if store._current is not None:
        return store._current
    return store.begin_forward(None, dtype=query.dtype, device=query.device)


def register() -> None:
    """Register "prefixattn" with transformers (idempotent; class-level, so every model instance sees it)."""
    AttentionInterface.register(NAME, prefixattn_attention)
    AttentionMaskInterface.register(NAME, prefixattn_mask)  # .register: item assignment is not seen by the mask code


register()
