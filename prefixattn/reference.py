"""Plain PyTorch prefix attention: the specification every backend is tested against.

Semantics (docs/design.md, "Semantics"): query i of Sq attends to every valid prefix key and, when causal, to the
sequence keys j <= i + (Sk - Sq) (bottom-right alignment); the prefix is always visible. A row with
nothing to attend outputs zeros and has lse = -inf. Gradients flow through autograd, so this path is
also the float64 gradcheck target.

This is written for clarity, not speed: it materialises the per-sequence prefix and repeated KV heads.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def gather_prefix(
    prefix: Tensor,
    batch: int,
    prefix_index: Tensor | None,
) -> Tensor:
    """Per-sequence view of a shared [Hkv, P, D] or pooled [N, Hkv, P, D] prefix -> [B, Hkv, P, D]."""
    if prefix.dim() == 3:
        return prefix.unsqueeze(0).expand(batch, *prefix.shape)
    # Entries with index -1 (or out of range, when values were not validated) get row 0 here;
    # prefix_valid_mask() masks them out.
    idx = prefix_index.long()
    return prefix[torch.where((idx >= 0) & (idx < prefix.shape[0]), idx, torch.zeros_like(idx))]


def prefix_valid_mask(
    batch: int,
    plen: int,
    device: torch.device,
    pool_size: int,
    prefix_index: Tensor | None,
    prefix_lengths: Tensor | None,
) -> Tensor:
    """bool [B, P]: which prefix slots each sequence may attend to."""
    slots = torch.arange(plen, device=device)
    if prefix_lengths is None:
        lengths = torch.full((pool_size,), plen, device=device, dtype=torch.long)
    else:
        # Unvalidated lengths are clamped to [0, P], as the kernels do.
        lengths = prefix_lengths.to(device=device, dtype=torch.long).clamp(0, plen)
    if prefix_index is None:
        per_seq = lengths[0].expand(batch)
    else:
        # An index outside [0, N) (only possible when values were not validated) means "no prefix".
        idx = prefix_index.to(device=device, dtype=torch.long)
        inside = (idx >= 0) & (idx < pool_size)
        per_seq = torch.where(inside, lengths[torch.where(inside, idx, torch.zeros_like(idx))], torch.zeros_like(idx))
    return slots[None, :] < per_seq[:, None]


def sequence_visible_mask(
    batch: int,
    sq: int,
    sk: int,
    device: torch.device,
    causal: bool,
    key_padding_mask: Tensor | None,
) -> Tensor:
    """bool [B, 1, Sq, Sk]: which sequence keys each query may attend to."""
    visible = torch.ones(batch, 1, sq, sk, dtype=torch.bool, device=device)
    if causal:
        i = torch.arange(sq, device=device)[:, None]
        j = torch.arange(sk, device=device)[None, :]
        visible = visible & (j <= i + (sk - sq))
    if key_padding_mask is not None:
        visible = visible & key_padding_mask[:, None, None, :].to(device=device, dtype=torch.bool)
    return visible


def prefix_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prefix_k: Tensor | None = None,
    prefix_v: Tensor | None = None,
    *,
    prefix_index: Tensor | None = None,
    prefix_lengths: Tensor | None = None,
    causal: bool = True,
    key_padding_mask: Tensor | None = None,
    softmax_scale: float | None = None,
    attn_bias: Tensor | None = None,
    dropout_p: float = 0.0,
    return_lse: bool = False,
):
    """Attention over [prefix; sequence] keys. Shapes as in prefixattn.prefix_attention.

    attn_bias (optional, float, broadcastable to [B, Hq, Sq, Sk]) is added to the scaled scores of the
    sequence keys only (T5's relative position bias, or a dense mask as 0/-inf); prefix columns get none.
    dropout_p drops attention probabilities (training only; this backend alone supports it).
    """
    batch, hq, sq, dim = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    group = hq // hkv
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(dim)
    cdt = _compute_dtype(q.dtype)

    def rep(x: Tensor) -> Tensor:  # [B, Hkv, L, D] -> [B, Hq, L, D]
        return x.to(cdt).repeat_interleave(group, dim=1) if group > 1 else x.to(cdt)

    qf = q.to(cdt)
    scores = torch.matmul(qf, rep(k).transpose(-1, -2)) * scale
    if attn_bias is not None:
        scores = scores + attn_bias.to(cdt)
    seq_visible = sequence_visible_mask(batch, sq, sk, q.device, causal, key_padding_mask)
    scores = scores.masked_fill(~seq_visible, float("-inf"))
    values = rep(v)

    has_prefix = prefix_k is not None and prefix_k.shape[-2] > 0
    if has_prefix:
        plen = prefix_k.shape[-2]
        pool_size = 1 if prefix_k.dim() == 3 else prefix_k.shape[0]
        pk = gather_prefix(prefix_k, batch, prefix_index)
        pv = gather_prefix(prefix_v, batch, prefix_index)
        pre_scores = torch.matmul(qf, rep(pk).transpose(-1, -2)) * scale
        valid = prefix_valid_mask(batch, plen, q.device, pool_size, prefix_index, prefix_lengths)
        pre_scores = pre_scores.masked_fill(~valid[:, None, None, :], float("-inf"))
        scores = torch.cat([pre_scores, scores], dim=-1)
        values = torch.cat([rep(pv), values], dim=-2)

    # Softmax that is exact for rows with nothing to attend: zeros out, lse = -inf, finite gradients.
    row_max = scores.amax(dim=-1, keepdim=True)
    empty = torch.isinf(row_max) & (row_max < 0)
    row_max = torch.where(empty, torch.zeros_like(row_max), row_max).detach()
    weights = torch.exp(scores - row_max)
    denom = weights.sum(dim=-1, keepdim=True)
    safe_denom = torch.where(empty, torch.ones_like(denom), denom)
    probs = weights / safe_denom
    if dropout_p > 0.0:
        probs = torch.nn.functional.dropout(probs, p=dropout_p, training=True)
    out = torch.matmul(probs, values).to(q.dtype)
    if not return_lse:
        return out
    lse = (row_max + torch.log(safe_denom)).squeeze(-1)
    lse = torch.where(empty.squeeze(-1), torch.full_like(lse, float("-inf")), lse)
    return out, lse.float() if cdt != torch.float64 else lse
