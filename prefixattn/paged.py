"""prefix_attention_paged(): decode / short queries against a paged KV cache, the prefix in its own buffer.

The layout serving engines use: sequence K/V live in pages k_cache/v_cache [num_pages, page_size, Hkv, D],
block_table [B, max_pages] (int32) maps each sequence's i-th page to a page id and seq_lens [B] (int32)
counts its valid cache tokens, including the Sq new ones. The prefix never enters the cache: it stays in
its own [Hkv, P, D] buffer (or pool [N, Hkv, P, D] + prefix_index), read once per step.

Query i of Sq sees every valid prefix key and the cache tokens j <= seq_len - Sq + i (bottom-right causal).

Bad tables on the GPU: values are range-checked only for CPU tensors or with validate_values=True (that
check syncs with the host). Unchecked, the kernels still never read out of bounds: a sequence length
is clamped to [0, max_pages * page_size], and a token whose page id is outside [0, num_pages) is masked
(the row attends to the rest; a row left with nothing returns zeros and lse = -inf). paged_reference
implements the same rule.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import kernels
from .reference import prefix_attention_reference
from .validation import FLOAT_DTYPES, _check_tensor, _shape, check_backend_name, check_flag, validate, values_checked

MAX_QUERY_LEN = 16


@dataclass(frozen=True)
class PagedProblem:
    """The validated shape of one paged call; what backend choice and the kernels need to know."""

    batch: int
    heads_q: int
    heads_kv: int
    seqlen_q: int
    head_dim: int
    num_pages: int
    page_size: int
    max_pages: int
    prefix_len: int  # P (0 without a prefix)
    pool_size: int  # N for a pool, 1 for a shared prefix, 0 without
    pooled: bool
    dtype: torch.dtype
    device: torch.device
    scale: float


def validate_paged(
    q,
    k_cache,
    v_cache,
    block_table,
    seq_lens,
    prefix_k=None,
    prefix_v=None,
    *,
    prefix_index=None,
    prefix_lengths=None,
    softmax_scale=None,
    backend="auto",
    validate_values: bool | None = None,
) -> PagedProblem:
    """Checks shapes, dtypes and devices (and, for CPU tensors or on request, table values) before any launch."""
    _check_tensor("q", q, rank=4)
    _check_tensor("k_cache", k_cache, rank=4)
    _check_tensor("v_cache", v_cache, rank=4)
    if q.dtype not in FLOAT_DTYPES:
        raise TypeError(f"q: expected dtype float16, bfloat16, float32 or float64, got {q.dtype}")
    batch, heads_q, seqlen_q, head_dim = q.shape
    if not 1 <= seqlen_q <= MAX_QUERY_LEN:
        raise ValueError(
            f"q: the paged path serves 1 to {MAX_QUERY_LEN} query tokens per sequence (decode, "
            f"speculative verification); got Sq={seqlen_q} (shape {_shape(q)}); run longer "
            f"chunks through prefix_attention"
        )
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name}: expected dtype {q.dtype} (same as q), got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name}: expected device {q.device} (same as q), got {t.device}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache: expected the shape of k_cache {_shape(k_cache)}, got {_shape(v_cache)}")
    num_pages, page_size, heads_kv, dk = k_cache.shape
    if dk != head_dim:
        raise ValueError(
            f"k_cache: expected [num_pages, page_size, Hkv, D] with D={head_dim} (q's last dim), "
            f"got shape {_shape(k_cache)}"
        )
    if num_pages < 1 or page_size < 1:
        raise ValueError(f"k_cache: expected at least one page of at least one token, got shape {_shape(k_cache)}")
    if heads_kv == 0 or heads_q % heads_kv != 0:
        raise ValueError(
            f"q: number of query heads must be a multiple of the KV heads; got Hq={heads_q} for "
            f"Hkv={heads_kv} (k_cache shape {_shape(k_cache)})"
        )
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.numel() and t.stride(-1) != 1:
            raise ValueError(f"{name}: last dimension must be contiguous (stride 1), got strides {t.stride()}")

    _check_tensor("block_table", block_table, rank=2)
    _check_tensor("seq_lens", seq_lens, rank=1)
    for name, t in (("block_table", block_table), ("seq_lens", seq_lens)):
        if t.dtype != torch.int32:
            raise TypeError(f"{name}: expected dtype torch.int32, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name}: expected device {q.device} (same as q), got {t.device}")
    if block_table.shape[0] != batch:
        raise ValueError(
            f"block_table: expected shape [{batch}, max_pages] (one row per sequence), got {_shape(block_table)}"
        )
    if tuple(seq_lens.shape) != (batch,):
        raise ValueError(f"seq_lens: expected shape [{batch}] (one length per sequence), got {_shape(seq_lens)}")
    check_backend_name(backend)

    # The prefix rules are the op's: validate them against a zero-length, zero-stride stand-in for k/v
    # (no memory is read or allocated), so prefix errors read exactly as they do for prefix_attention.
    stand_in = k_cache.as_strided((batch, heads_kv, 0, head_dim), (0, k_cache.stride(2), 0, 1))
    base = validate(
        q,
        stand_in,
        stand_in,
        prefix_k,
        prefix_v,
        prefix_index=prefix_index,
        prefix_lengths=prefix_lengths,
        causal=False,
        softmax_scale=softmax_scale,
        validate_values=validate_values,
    )

    max_pages = block_table.shape[1]
    if values_checked(validate_values, q) and batch:
        capacity = max_pages * page_size
        lo, hi = int(seq_lens.min()), int(seq_lens.max())
        if lo < 0 or hi > capacity:
            raise ValueError(
                f"seq_lens: expected values in [0, {capacity}] (max_pages={max_pages} x "
                f"page_size={page_size}), got min {lo}, max {hi}"
            )
        used = (
            torch.arange(max_pages, device=seq_lens.device)[None, :]
            < ((seq_lens.long() + page_size - 1) // page_size)[:, None]
        )
        bad = used & ((block_table < 0) | (block_table >= num_pages))
        if bool(bad.any()):
            b, p = (int(x) for x in bad.nonzero()[0])
            raise ValueError(
                f"block_table: expected page ids in [0, {num_pages - 1}] (num_pages={num_pages}) for "
                f"every page a sequence uses; got block_table[{b}, {p}] = {int(block_table[b, p])} "
                f"(seq_lens[{b}] = {int(seq_lens[b])})"
            )

    return PagedProblem(
        batch,
        heads_q,
        heads_kv,
        seqlen_q,
        head_dim,
        num_pages,
        page_size,
        max_pages,
        base.prefix_len,
        base.pool_size,
        base.pooled,
        q.dtype,
        q.device,
        base.scale,
    )


# ---------------------------------------------------------------------------------------------------
# Reference


def gather_pages(k_cache: Tensor, v_cache: Tensor, block_table: Tensor, seq_lens: Tensor, min_len: int = 0):
    """The cache as contiguous, left-padded [B, Hkv, L, D] K and V plus the [B, L] mask of real tokens.

    Left padding puts every sequence's last token in the last column, so the op's bottom-right causal
    rule (key t visible to query i iff t <= i + L - Sq) becomes j <= seq_len - Sq + i for token j.
    Lengths are clamped to the table and tokens on page ids outside [0, num_pages) are masked, the
    kernels' rule for tables that were not range-checked.
    """
    num_pages, page_size = k_cache.shape[0], k_cache.shape[1]
    capacity = block_table.shape[1] * page_size
    length = max(capacity, min_len)
    lens = seq_lens.long().clamp(0, capacity)
    j = torch.arange(length, device=k_cache.device)[None, :] - (length - lens)[:, None]  # token index, [B, L]
    real = j >= 0
    j = j.clamp(min=0)
    page = (
        block_table.long().gather(1, (j // page_size).clamp(max=max(block_table.shape[1] - 1, 0)))
        if block_table.shape[1]
        else torch.full_like(j, -1)
    )
    real = real & (page >= 0) & (page < num_pages)
    page = torch.where(real, page, torch.zeros_like(page))
    tok = j % page_size
    k = k_cache[page, tok].permute(0, 2, 1, 3)  # [B, L, Hkv, D] -> [B, Hkv, L, D]
    v = v_cache[page, tok].permute(0, 2, 1, 3)
    return k, v, real


def paged_reference(
    q,
    k_cache,
    v_cache,
    block_table,
    seq_lens,
    prefix_k=None,
    prefix_v=None,
    *,
    prefix_index=None,
    prefix_lengths=None,
    softmax_scale=None,
    return_lse=False,
):
    """prefix_attention_paged computed by gathering the pages and calling prefix_attention_reference."""
    k, v, real = gather_pages(k_cache, v_cache, block_table, seq_lens, min_len=q.shape[2])
    return prefix_attention_reference(
        q,
        k,
        v,
        prefix_k,
        prefix_v,
        prefix_index=prefix_index,
        prefix_lengths=prefix_lengths,
        causal=True,
        key_padding_mask=real,
        softmax_scale=softmax_scale,
        return_lse=return_lse,
    )


# ---------------------------------------------------------------------------------------------------
# The custom op (which backend runs a call: kernels.choose, kind "paged")


@torch.library.custom_op("prefixattn::paged_decode", mutates_args=(), device_types=None)
def _paged_decode(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_table: Tensor,
    seq_lens: Tensor,
    prefix_k: Tensor | None,
    prefix_v: Tensor | None,
    prefix_index: Tensor | None,
    prefix_lengths: Tensor | None,
    scale: float,
    backend: str,
) -> tuple[Tensor, Tensor]:
    return kernels.get_backend(backend).paged_forward(
        q, k_cache, v_cache, block_table, seq_lens, prefix_k, prefix_v, prefix_index, prefix_lengths, scale
    )


@_paged_decode.register_fake
def _paged_decode_fake(
    q, k_cache, v_cache, block_table, seq_lens, prefix_k, prefix_v, prefix_index, prefix_lengths, scale, backend
):
    b, hq, sq, d = q.shape
    out = kernels.get_backend(backend).new_out(q)  # the layout the backend writes
    return out, q.new_empty((b, hq, sq), dtype=torch.float32)


def prefix_attention_paged(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_table: Tensor,
    seq_lens: Tensor,
    prefix_k: Tensor | None = None,
    prefix_v: Tensor | None = None,
    *,
    prefix_index: Tensor | None = None,
    prefix_lengths: Tensor | None = None,
    softmax_scale: float | None = None,
    return_lse: bool = False,
    backend: str = "auto",
    validate_values: bool | None = None,
):
    """Attention of up to 16 new query tokens per sequence over [prefix; paged cache]. Inference only.

    q [B, Hq, Sq, D] (Sq <= 16, any strides, last dim contiguous); k_cache, v_cache
    [num_pages, page_size, Hkv, D]; block_table int32 [B, max_pages]; seq_lens int32 [B], the valid
    cache tokens of each sequence including the Sq new ones (query i sees tokens j <= seq_len - Sq + i);
    prefix_k, prefix_v, prefix_index, prefix_lengths as in prefix_attention. Returns out [B, Hq, Sq, D]
    in q's dtype (and lse [B, Hq, Sq], float32, natural log, if return_lse).

    validate_values (default: only for CPU tensors) range-checks block_table and seq_lens on the host;
    it syncs, so leave it off inside CUDA graphs. Without it a bad table never reads out of bounds (see
    the module docstring for what such rows return). backend: "auto" | "triton" | "cuda" | "torch".
    No host sync and no value-dependent allocation on the GPU path: a step can be captured in a CUDA graph.
    """
    problem = validate_paged(
        q,
        k_cache,
        v_cache,
        block_table,
        seq_lens,
        prefix_k,
        prefix_v,
        prefix_index=prefix_index,
        prefix_lengths=prefix_lengths,
        softmax_scale=softmax_scale,
        backend=backend,
        validate_values=validate_values,
    )
    check_flag("return_lse", return_lse)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k_cache, v_cache, prefix_k, prefix_v)
    )
    chosen = kernels.choose(backend, problem, "paged", needs_grad=needs_grad)
    if chosen == "torch":
        return paged_reference(
            q,
            k_cache,
            v_cache,
            block_table,
            seq_lens,
            prefix_k,
            prefix_v,
            prefix_index=prefix_index,
            prefix_lengths=prefix_lengths,
            softmax_scale=problem.scale,
            return_lse=return_lse,
        )
    if problem.prefix_len == 0:  # an empty prefix is no prefix; kernels never see P = 0 buffers
        prefix_k = prefix_v = prefix_index = prefix_lengths = None
    out, lse = _paged_decode(
        q,
        k_cache,
        v_cache,
        block_table,
        seq_lens,
        prefix_k,
        prefix_v,
        prefix_index,
        prefix_lengths,
        problem.scale,
        chosen,
    )
    return (out, lse) if return_lse else out
