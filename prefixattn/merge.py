"""Fold a prefix into an attention result that was computed over the sequence keys alone, token by token.

This is the entry point for serving engines: they keep their own attention kernel and KV cache (FlashAttention
over paged K/V in vLLM), ask it for the log-sum-exp, and hand both here. Every query token sees the whole prefix
(no causality inside it), so a ragged batch of T tokens is a batch of T rows with one query each; a token's
pool entry is its sequence's (`token_prefix_index` below builds that [T] index from the batch's cu_seqlens).

    softmax over [prefix; sequence] = merge of (out_seq, lse_seq) with the prefix's own (out_p, lse_p):
    lse = log(exp(lse_seq) + exp(lse_p)),  out = out_seq * exp(lse_seq - lse) + out_p * exp(lse_p - lse)

The "triton" backend does this in one pass without materialising (out_p, lse_p): it starts the online softmax
from the sequence state and runs the prefix tiles (prefixattn/kernels/_triton_prefix_merge.py, the "sdpa"
backend's forward kernel), with the query heads that share a KV head packed into one tile. The "torch" backend
is plain PyTorch, for CPUs and as a readable statement of the same arithmetic.

No host synchronisation and no value-dependent allocation: safe inside CUDA graph capture.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .validation import FLOAT_DTYPES, INDEX_DTYPES

MERGE_BACKENDS = ("auto", "triton", "torch")


def merge_prefix(
    q: Tensor,
    out: Tensor,
    lse: Tensor,
    prefix_k: Tensor,
    prefix_v: Tensor,
    token_prefix_index: Tensor | None = None,
    prefix_lengths: Tensor | None = None,
    *,
    softmax_scale: float | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Fold a pooled or shared prefix into a token-major attention result; `out` is updated in place.

    Args:
        q: [T, Hq, D] queries (one row per token, any mix of sequences).
        out: [T, Hq, D] attention output over the sequence keys only, same dtype as q, last dim contiguous.
            Overwritten with the attention over [prefix; sequence].
        lse: [T, Hq] natural-log log-sum-exp of the sequence scores (softmax_scale applied), any strides, any
            float dtype; -inf where a token saw no sequence key (its result is then the prefix alone). Read
            only. FlashAttention's varlen kernels return [Hq, T]: pass `lse.t()` (a view, no copy).
        prefix_k, prefix_v: [N, Hkv, P, D] pool (or [Hkv, P, D], one prefix shared by every token), dtype of q.
            Hq must be a multiple of Hkv (grouped-query attention).
        token_prefix_index: [T] int32/int64 pool entry of each token (pool form only); -1 (or any value outside
            [0, N)) means no prefix: the token's out is left as it was (up to rounding in out's dtype).
        prefix_lengths: optional [N] int32/int64 valid length of each entry ([1] for the shared form); keys past
            it are ignored, 0 leaves the token unchanged. Values are clamped to [0, P].
        softmax_scale: the scale the sequence scores were computed with; default 1/sqrt(D).
        backend: "triton" (CUDA, or the Triton interpreter), "torch", or "auto" (triton for CUDA tensors when
            Triton is installed, else torch).

    Returns:
        (out, merged lse): `out` itself, and a new [T, Hq] contiguous lse over [prefix; sequence] (float32; float64
        for float64 inputs). -inf only where neither part had a key (out is 0 there).

    Index values are not range-checked on the GPU (that would synchronise); on the CPU they are.
    """
    scale = _validate(q, out, lse, prefix_k, prefix_v, token_prefix_index, prefix_lengths, softmax_scale, backend)
    return fold_unchecked(q, out, lse, prefix_k, prefix_v, token_prefix_index, prefix_lengths, scale, backend)


def fold_unchecked(q, out, lse, prefix_k, prefix_v, token_prefix_index, prefix_lengths, scale: float, backend="auto"):
    """merge_prefix without the argument checks, for a caller that has validated the same shapes once already
    (a serving engine's attention layer, every step: the checks are host work on its critical path)."""
    if backend == "auto":
        backend = _auto_backend(q.device)
    if backend == "triton":
        return _merge_triton(q, out, lse, prefix_k, prefix_v, token_prefix_index, prefix_lengths, scale)
    return _merge_torch(q, out, lse, prefix_k, prefix_v, token_prefix_index, prefix_lengths, scale)


def _auto_backend(device: torch.device) -> str:
    from .kernels import triton_unavailable_reason

    return "triton" if device.type == "cuda" and triton_unavailable_reason(device) is None else "torch"


def _shape(t: Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def _tensor(name: str, t, rank: int | tuple[int, ...]) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"merge_prefix: {name}: expected a torch.Tensor, got {type(t).__name__}")
    ranks = (rank,) if isinstance(rank, int) else rank
    if t.dim() not in ranks:
        want = " or ".join(f"{r}-d" for r in ranks)
        raise ValueError(f"merge_prefix: {name}: expected a {want} tensor, got shape {_shape(t)}")


def _validate(q, out, lse, prefix_k, prefix_v, index, lengths, softmax_scale, backend) -> float:
    """Shape/dtype/device checks (no device reads except range checks of CPU index tensors); returns the scale."""
    if backend not in MERGE_BACKENDS:
        raise ValueError(
            f"merge_prefix: backend: expected one of {', '.join(map(repr, MERGE_BACKENDS))}, got {backend!r}"
        )
    _tensor("q", q, 3)
    if q.dtype not in FLOAT_DTYPES:
        raise TypeError(f"merge_prefix: q: expected dtype float16, bfloat16, float32 or float64, got {q.dtype}")
    tokens, heads_q, dim = q.shape
    if heads_q == 0 or dim == 0:
        raise ValueError(f"merge_prefix: q: expected [T, Hq, D] with Hq > 0 and D > 0, got shape {_shape(q)}")
    _tensor("out", out, 3)
    if out.shape != q.shape:
        raise ValueError(f"merge_prefix: out: expected q's shape {_shape(q)}, got {_shape(out)}")
    if out.dtype != q.dtype:
        raise TypeError(f"merge_prefix: out: expected dtype {q.dtype} (same as q), got {out.dtype}")
    if out.numel() and out.stride(-1) != 1:
        raise ValueError(
            f"merge_prefix: out: last dimension must be contiguous (stride 1; it is written in place), "
            f"got strides {out.stride()}"
        )
    _tensor("lse", lse, 2)
    if tuple(lse.shape) != (tokens, heads_q):
        hint = " (FlashAttention's [Hq, T] lse: pass lse.t())" if tuple(lse.shape) == (heads_q, tokens) else ""
        raise ValueError(f"merge_prefix: lse: expected shape [{tokens}, {heads_q}] ([T, Hq]), got {_shape(lse)}{hint}")
    if not lse.is_floating_point():
        raise TypeError(f"merge_prefix: lse: expected a floating dtype, got {lse.dtype}")

    for name, t in (("prefix_k", prefix_k), ("prefix_v", prefix_v)):
        _tensor(name, t, (3, 4))
    if prefix_v.shape != prefix_k.shape:
        raise ValueError(
            f"merge_prefix: prefix_v: expected prefix_k's shape {_shape(prefix_k)}, got {_shape(prefix_v)}"
        )
    pooled = prefix_k.dim() == 4
    heads_kv, plen, pdim = prefix_k.shape[-3:]
    if pdim != dim:
        raise ValueError(
            f"merge_prefix: prefix_k: expected head dim {dim} (q's last dim), got shape {_shape(prefix_k)}"
        )
    if heads_kv == 0 or heads_q % heads_kv:
        raise ValueError(
            f"merge_prefix: prefix_k: expected a number of KV heads dividing Hq={heads_q}, got {heads_kv} "
            f"(shape {_shape(prefix_k)})"
        )
    if pooled and prefix_k.shape[0] == 0:
        raise ValueError(f"merge_prefix: prefix_k: the pool must hold at least one entry, got shape {_shape(prefix_k)}")
    for name, t in (("out", out), ("lse", lse), ("prefix_k", prefix_k), ("prefix_v", prefix_v)):
        if t.device != q.device:
            raise ValueError(f"merge_prefix: {name}: expected device {q.device} (same as q), got {t.device}")
    for name, t in (("prefix_k", prefix_k), ("prefix_v", prefix_v)):
        if t.dtype != q.dtype:
            raise TypeError(f"merge_prefix: {name}: expected dtype {q.dtype} (same as q), got {t.dtype}")

    pool_size = prefix_k.shape[0] if pooled else 1
    if pooled and index is None:
        raise ValueError(
            f"merge_prefix: token_prefix_index: required with a pool-form prefix (shape {_shape(prefix_k)}): "
            "one entry per token, -1 for none"
        )
    if not pooled and index is not None:
        raise ValueError(
            f"merge_prefix: token_prefix_index: only valid with a pool-form prefix [N, Hkv, P, D], got prefix_k "
            f"of shape {_shape(prefix_k)}"
        )
    for name, t, size, what in (
        ("token_prefix_index", index, tokens, "one entry per token"),
        ("prefix_lengths", lengths, pool_size, "one length per pool entry"),
    ):
        if t is None:
            continue
        _tensor(name, t, 1)
        if t.dtype not in INDEX_DTYPES:
            raise TypeError(f"merge_prefix: {name}: expected dtype int32 or int64, got {t.dtype}")
        if t.shape[0] != size:
            raise ValueError(f"merge_prefix: {name}: expected shape [{size}] ({what}), got {_shape(t)}")
        if t.device != q.device:
            raise ValueError(f"merge_prefix: {name}: expected device {q.device} (same as q), got {t.device}")
    if q.device.type == "cpu":  # values are cheap to check here; on a GPU this would synchronise
        if index is not None and index.numel():
            lo, hi = int(index.min()), int(index.max())
            if lo < -1 or hi >= pool_size:
                raise ValueError(
                    f"merge_prefix: token_prefix_index: expected values in [-1, {pool_size - 1}] (pool of "
                    f"{pool_size}), got min {lo}, max {hi}"
                )
        if lengths is not None and lengths.numel():
            lo, hi = int(lengths.min()), int(lengths.max())
            if lo < 0 or hi > plen:
                raise ValueError(
                    f"merge_prefix: prefix_lengths: expected values in [0, {plen}] (P), got min {lo}, max {hi}"
                )

    if softmax_scale is None:
        return 1.0 / math.sqrt(dim)
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
        raise TypeError(f"merge_prefix: softmax_scale: expected a float or None, got {type(softmax_scale).__name__}")
    if not math.isfinite(softmax_scale) or softmax_scale <= 0:
        raise ValueError(f"merge_prefix: softmax_scale: expected a finite positive number, got {softmax_scale}")
    return float(softmax_scale)


def _merge_triton(q, out, lse, prefix_k, prefix_v, index, lengths, scale: float):
    """One program per (token, KV head): its query heads form the tile's rows, so the prefix K/V tiles are read
    once per KV head, not once per query head. Views only: [T, Hq, .] -> [T, Hkv, group, .]."""
    import triton

    from .kernels import _triton_prefix_merge
    from .kernels._triton_config import acc_dtype
    from .kernels.triton_backend import pool_args_in_range

    tokens, heads_q, _ = q.shape
    heads_kv = prefix_k.shape[-3]
    group = heads_q // heads_kv
    if tokens == 0:
        return out, torch.empty((0, heads_q), dtype=acc_dtype(q.dtype), device=q.device)
    if q.stride(-1) != 1:
        q = q.contiguous()
    prefix_k = prefix_k if prefix_k.stride(-1) == 1 else prefix_k.contiguous()
    prefix_v = prefix_v if prefix_v.stride(-1) == 1 else prefix_v.contiguous()
    index, lengths = pool_args_in_range(prefix_k, index, lengths)
    q4, out4 = q.unflatten(1, (heads_kv, group)), out.unflatten(1, (heads_kv, group))
    _, merged = _triton_prefix_merge.merge_prefix(
        q4,
        prefix_k,
        prefix_v,
        index,
        lengths,
        out4,
        lse.unflatten(1, (heads_kv, group)),
        scale,
        out4,
        block_m=max(16, triton.next_power_of_2(group)),  # tl.dot needs >= 16 rows
    )
    return out, merged.view(tokens, heads_q)


def _merge_torch(q, out, lse, prefix_k, prefix_v, index, lengths, scale: float):
    """The same merge in PyTorch: the prefix's own (out_p, lse_p) per token, then the log-sum-exp combination."""
    tokens, heads_q, dim = q.shape
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    if prefix_k.dim() == 3:  # shared: a pool of one that every token uses
        prefix_k, prefix_v = prefix_k.unsqueeze(0), prefix_v.unsqueeze(0)
        index = torch.zeros(tokens, dtype=torch.long, device=q.device)
    pool_size, heads_kv, plen, _ = prefix_k.shape
    group = heads_q // heads_kv

    idx = index.long()
    inside = (idx >= 0) & (idx < pool_size)
    entry = torch.where(inside, idx, torch.zeros_like(idx))
    if lengths is None:
        entry_len = torch.full((pool_size,), plen, dtype=torch.long, device=q.device)
    else:
        entry_len = lengths.long().clamp(0, plen)
    valid = torch.arange(plen, device=q.device)[None, :] < torch.where(inside, entry_len[entry], 0)[:, None]

    qg = q.to(cdt).reshape(tokens, heads_kv, group, dim)
    scores = torch.einsum("thgd,thpd->thgp", qg, prefix_k[entry].to(cdt)) * scale
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    lse_p = torch.logsumexp(scores, dim=-1)  # -inf where the token has no prefix key
    has_p = lse_p > float("-inf")
    probs = torch.where(has_p[..., None], torch.exp(scores - torch.where(has_p, lse_p, 0)[..., None]), 0)
    out_p = torch.einsum("thgp,thpd->thgd", probs, prefix_v[entry].to(cdt))

    lse_s = lse.to(cdt).reshape(tokens, heads_kv, group)
    has_s = lse_s > float("-inf")
    top = torch.maximum(lse_s, lse_p)
    top = torch.where(top > float("-inf"), top, 0)
    w_s, w_p = torch.exp(lse_s - top), torch.exp(lse_p - top)  # exp(-inf) = 0: an empty part weighs nothing
    total = w_s + w_p
    merged_lse = torch.where(total > 0, top + torch.log(torch.where(total > 0, total, 1)), float("-inf"))
    out_s = torch.where(has_s[..., None], out.to(cdt).reshape(tokens, heads_kv, group, dim), 0)
    merged = (out_s * w_s[..., None] + out_p * w_p[..., None]) / torch.where(total > 0, total, 1)[..., None]
    out.copy_(merged.reshape(tokens, heads_q, dim))
    return out, merged_lse.reshape(tokens, heads_q).contiguous()


def token_prefix_index(row_index: Tensor, query_start_loc: Tensor, num_tokens: int) -> Tensor:
    """[num_tokens] int32 pool entry of each token of a ragged batch, on the batch's device, without a host sync.

    row_index: [R] pool entry of each batch row (sequence), -1 for none. query_start_loc: [R + 1] non-decreasing
    offsets of each row's tokens (cu_seqlens; vLLM's `query_start_loc`). Token t belongs to the row r with
    query_start_loc[r] <= t < query_start_loc[r + 1]; tokens at or past query_start_loc[R] (padding a batch up
    to a CUDA-graph size) get -1. Empty rows own no token. num_tokens is a host int (a shape, not a value).
    """
    if not isinstance(row_index, Tensor) or row_index.dim() != 1:
        raise ValueError(f"token_prefix_index: row_index: expected a 1-d tensor [R], got {_describe(row_index)}")
    rows = row_index.shape[0]
    if not isinstance(query_start_loc, Tensor) or tuple(query_start_loc.shape) != (rows + 1,):
        raise ValueError(
            f"token_prefix_index: query_start_loc: expected shape [{rows + 1}] (R + 1 for row_index's R = {rows}), "
            f"got {_describe(query_start_loc)}"
        )
    if query_start_loc.device != row_index.device:
        raise ValueError(
            f"token_prefix_index: query_start_loc: expected device {row_index.device} (row_index's), "
            f"got {query_start_loc.device}"
        )
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 0:
        raise ValueError(f"token_prefix_index: num_tokens: expected a non-negative int, got {num_tokens!r}")
    device = row_index.device
    if rows == 0:
        return torch.full((num_tokens,), -1, dtype=torch.int32, device=device)
    ends = query_start_loc[1:]
    tokens = torch.arange(num_tokens, device=device, dtype=ends.dtype)
    owner = torch.searchsorted(ends, tokens, right=True)  # rows whose end is <= t: the owner's position
    entry = row_index[owner.clamp(max=rows - 1)].to(torch.int32)
    return torch.where(owner < rows, entry, -1)


def _describe(x) -> str:
    return f"shape {_shape(x)}" if isinstance(x, Tensor) else type(x).__name__
