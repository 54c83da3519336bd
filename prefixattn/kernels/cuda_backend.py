"""The "cuda" backend: the CUDA C++ decode kernels in prefixattn._C (csrc/), inference only.

Covers short queries (Sq <= 16: decode, speculative decode) in float16 / bfloat16 with head dims 64
and 128, over contiguous-strided K/V ([B, Hkv, Sk, D]) or a paged cache, with the prefix shared or
pooled. Everything here reads shapes, strides and addresses only: no host synchronisation and no
allocation whose size depends on tensor values, so calls can be captured in CUDA graphs.

Out-of-range values (which cannot be checked without a host sync) never cause an out-of-bounds
access: sequence lengths are clamped to [0, max_pages * page_size], keys on page ids outside
[0, num_pages) are masked, pool indices outside [0, N) mean "no prefix", prefix lengths are clamped
to [0, P]. A row left with no visible key returns zeros and lse = -inf.
"""

from __future__ import annotations

import math
from functools import cache, lru_cache
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..validation import Problem
from . import bshd_empty, cuda_ext

if TYPE_CHECKING:
    from ..paged import PagedProblem

new_out = bshd_empty  # the output layout (ops.py's fake implementation uses it)

DTYPES = {torch.float16: 0, torch.bfloat16: 1}  # the _C dtype codes
HEAD_DIMS = (64, 128)
MAX_SEQLEN_Q = 16
TILE_KEYS = 16  # keys per warp iteration in the kernel
TILE_ROWS = 16  # query rows (GQA heads x Sq) per block
# Blocks of the decode kernel resident per SM (128 threads; registers from `nvcc -Xptxas -v`, sm_90a:
# ~232 for D=128, ~154 for D=64). Used to size the split-K grid to whole waves.
BLOCKS_PER_SM = {64: 3, 128: 2}
MAX_SPLITS = 64
MIN_TILES_PER_SPLIT = 4  # 64 keys: one tile per warp


def extension_loaded() -> bool:
    return cuda_ext.load() is not None


# ----------------------------------------------------------------------------------------------------
# Backend selection


def _shape_reason(
    device: torch.device, dtype: torch.dtype, head_dim: int, seqlen_q: int, needs_grad: bool
) -> str | None:
    if cuda_ext.load() is None:
        return cuda_ext.why_unavailable()
    if device.type != "cuda":
        return f"the tensors are on {device} and the CUDA kernels need CUDA tensors"
    if dtype not in DTYPES:
        return f"dtype {dtype} is not supported by the CUDA kernels (float16 or bfloat16)"
    if head_dim not in HEAD_DIMS:
        return f"head dim {head_dim} is not supported by the CUDA kernels (64 or 128)"
    if seqlen_q > MAX_SEQLEN_Q:
        return (
            f"the CUDA kernels are decode kernels for at most {MAX_SEQLEN_Q} query rows, got Sq={seqlen_q} "
            f"(use backend='triton')"
        )
    if needs_grad:
        return "the CUDA kernels are inference only and an input requires grad"
    return None


def unsupported_reason(problem: Problem, *, needs_grad: bool, deterministic: bool = True) -> str | None:
    """Why the CUDA kernels cannot run this (contiguous-form) problem, or None if they can (inference only, so
    deterministic does not matter)."""
    reason = _shape_reason(problem.device, problem.dtype, problem.head_dim, problem.seqlen_q, needs_grad)
    if reason is None and problem.has_bias:
        reason = "attn_bias is not supported by the CUDA kernels"
    return reason


def unsupported_reason_paged(problem: PagedProblem, *, needs_grad: bool) -> str | None:
    """Why the CUDA kernels cannot run this paged decode, or None if they can."""
    if problem.dtype == torch.float64:
        return "float64 runs on backend 'torch' only"
    return _shape_reason(problem.device, problem.dtype, problem.head_dim, problem.seqlen_q, needs_grad)


# ----------------------------------------------------------------------------------------------------
# The op-level entry points (prefixattn.ops) and the decode calls


def forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prefix_k,
    prefix_v,
    prefix_index,
    prefix_lengths,
    key_padding_mask,
    attn_bias,
    causal: bool,
    scale: float,
):
    if attn_bias is not None:
        raise ValueError(
            "attn_bias: backend 'cuda' does not support an attention bias, got a tensor "
            "(use backend='triton' or 'torch')"
        )
    return decode(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask, causal, scale)


def backward(
    dout,
    dlse,
    q,
    k,
    v,
    prefix_k,
    prefix_v,
    prefix_index,
    prefix_lengths,
    key_padding_mask,
    attn_bias,
    out,
    lse,
    causal: bool,
    scale: float,
    *,
    deterministic: bool = True,
):
    raise RuntimeError(
        "backend 'cuda' is inference only (decode kernels) and has no backward; "
        "use backend='triton' or 'auto' when gradients are needed"
    )


def decode(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prefix_k: Tensor | None,
    prefix_v: Tensor | None,
    prefix_index: Tensor | None,
    prefix_lengths: Tensor | None,
    key_padding_mask: Tensor | None,
    causal: bool,
    scale: float,
    *,
    num_splits: int | None = None,
):
    """Attention of q [B, Hq, Sq, D] over [prefix; k/v [B, Hkv, Sk, D]] -> (out [B, Hq, Sq, D] as a view
    of [B, Sq, Hq, D] memory, lse float32 [B, Hq, Sq]). Shapes are assumed validated
    (prefixattn.validation); this checks what the kernels additionally need. num_splits overrides the
    split-K heuristic (tests)."""
    C = _extension()
    _check_query(q)
    batch, hq, sq, dim = q.shape
    _check_data("k", k, q, 4)
    _check_data("v", v, q, 4)
    if k.shape != v.shape or k.shape[0] != batch or k.shape[3] != dim or hq % max(k.shape[1], 1):
        raise ValueError(
            f"k, v: expected [B={batch}, Hkv, Sk, D={dim}] with Hq % Hkv == 0, got {list(k.shape)} and {list(v.shape)}"
        )
    hkv, sk = k.shape[1], k.shape[2]
    p = C.DecodeParams()
    _fill_common(p, q, scale)
    p.causal = bool(causal)
    p.paged = False
    p.seqlen_k = sk
    p.k, p.v = k.data_ptr(), v.data_ptr()
    p.k_sb, p.k_sh, p.k_ss = _strides(k)
    p.v_sb, p.v_sh, p.v_ss = _strides(v)
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != (batch, sk):
            raise ValueError(
                f"key_padding_mask: expected bool [{batch}, {sk}], got {key_padding_mask.dtype} "
                f"{list(key_padding_mask.shape)}"
            )
        _same_device("key_padding_mask", key_padding_mask, q)
        p.key_padding_mask = key_padding_mask.data_ptr()
        p.kpm_sb, p.kpm_ss = key_padding_mask.stride()
    _fill_prefix(p, q, hkv, prefix_k, prefix_v, prefix_index, prefix_lengths)
    return _launch(C, p, q, hkv, sk, num_splits)


def paged_decode(
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
    *,
    num_splits: int | None = None,
    validate_values: bool = False,
):
    """Decode against a paged cache: k_cache, v_cache [num_pages, page_size, Hkv, D], block_table
    [B, max_pages] (int32; int64 is converted), seq_lens [B] counting the Sq new tokens (query i sees
    sequence keys j <= seq_len - Sq + i). The prefix stays in its own buffer. Returns (out, lse) as decode.

    Values are not read on the host (no sync; CUDA-graph safe); out-of-range ones are handled as the module
    docstring says. validate_values=True reads them (a host sync) and raises ValueError instead."""
    C = _extension()
    _check_query(q)
    inputs = (q, k_cache, v_cache, prefix_k, prefix_v)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        raise ValueError(
            "q: the CUDA kernels are inference only, but an input requires grad "
            "(use torch.no_grad(), or backend='triton')"
        )
    batch, hq, sq, dim = q.shape
    _check_data("k_cache", k_cache, q, 4)
    _check_data("v_cache", v_cache, q, 4)
    if k_cache.shape != v_cache.shape or k_cache.shape[3] != dim or hq % max(k_cache.shape[2], 1):
        raise ValueError(
            f"k_cache, v_cache: expected [num_pages, page_size, Hkv, D={dim}] with Hq % Hkv == 0, got "
            f"{list(k_cache.shape)} and {list(v_cache.shape)}"
        )
    num_pages, page_size, hkv = k_cache.shape[:3]
    block_table = _index_tensor("block_table", block_table, q, 2, batch)
    seq_lens = _index_tensor("seq_lens", seq_lens, q, 1, batch)
    if page_size < 1:
        raise ValueError(f"k_cache: expected page_size >= 1, got shape {list(k_cache.shape)}")
    if validate_values:
        _check_paged_values(block_table, seq_lens, num_pages, page_size, prefix_k, prefix_index, prefix_lengths)
    p = C.DecodeParams()
    _fill_common(p, q, scale)
    p.causal = True
    p.paged = True
    p.k, p.v = k_cache.data_ptr(), v_cache.data_ptr()
    p.kc_sp, p.kc_st, p.kc_sh = _strides(k_cache)
    p.vc_sp, p.vc_st, p.vc_sh = _strides(v_cache)
    p.num_pages, p.page_size, p.max_pages = num_pages, page_size, block_table.shape[1]
    p.block_table = block_table.data_ptr()
    p.bt_sb, p.bt_sp = block_table.stride()
    p.seq_lens = seq_lens.data_ptr()
    p.sl_s = seq_lens.stride(0)
    _fill_prefix(p, q, hkv, prefix_k, prefix_v, prefix_index, prefix_lengths)
    return _launch(C, p, q, hkv, block_table.shape[1] * page_size, num_splits)


paged_forward = paged_decode  # the backend protocol's name for the paged entry (prefixattn.kernels)


# ----------------------------------------------------------------------------------------------------
# Helpers


def _extension():
    C = cuda_ext.load()
    if C is None:
        raise RuntimeError(f"backend 'cuda': {cuda_ext.why_unavailable()}")
    return C


def _check_query(q: Tensor) -> None:
    if not isinstance(q, Tensor) or q.dim() != 4:
        raise ValueError(f"q: expected a [B, Hq, Sq, D] tensor, got {getattr(q, 'shape', type(q).__name__)}")
    if not q.is_cuda:
        raise ValueError(f"q: the CUDA kernels need CUDA tensors, got device {q.device}")
    if q.dtype not in DTYPES:
        raise TypeError(f"q: the CUDA kernels support float16 and bfloat16, got {q.dtype}")
    if q.shape[3] not in HEAD_DIMS:
        raise ValueError(f"q: the CUDA kernels support head dims 64 and 128, got {q.shape[3]}")
    if not 1 <= q.shape[2] <= MAX_SEQLEN_Q:
        raise ValueError(f"q: the CUDA kernels take 1..{MAX_SEQLEN_Q} query rows (Sq), got {q.shape[2]}")
    _check_layout("q", q)


def _same_device(name: str, t: Tensor, q: Tensor) -> None:
    if t.device != q.device:
        raise ValueError(f"{name}: expected device {q.device} (same as q), got {t.device}")


def _check_data(name: str, t: Tensor, q: Tensor, rank: int) -> None:
    if not isinstance(t, Tensor) or t.dim() != rank:
        raise ValueError(f"{name}: expected a {rank}-d tensor, got {getattr(t, 'shape', type(t).__name__)}")
    if t.dtype != q.dtype:
        raise TypeError(f"{name}: expected dtype {q.dtype} (same as q), got {t.dtype}")
    _same_device(name, t, q)
    _check_layout(name, t)


def _check_layout(name: str, t: Tensor) -> None:
    """The kernels read rows in 16-byte vectors: the last dim contiguous, rows 16-byte aligned."""
    if t.numel() == 0:
        return
    if t.stride(-1) != 1:
        raise ValueError(f"{name}: the last dimension must be contiguous (stride 1), got strides {t.stride()}")
    if t.data_ptr() % 16:
        raise ValueError(
            f"{name}: the CUDA kernels need a 16-byte aligned data pointer, got address "
            f"{t.data_ptr():#x} (a view at an odd offset; pass a .clone())"
        )
    if any(n > 1 and s % 8 for n, s in zip(t.shape[:-1], t.stride()[:-1])):
        raise ValueError(
            f"{name}: the CUDA kernels need strides that are multiples of 8 elements (16 bytes), "
            f"got strides {t.stride()} for shape {list(t.shape)}"
        )


def _strides(t: Tensor) -> tuple:
    """Strides of all but the last dim; 0 for dims of size <= 1 (never stepped over)."""
    return tuple(s if n > 1 else 0 for n, s in zip(t.shape[:-1], t.stride()[:-1]))


def _index_tensor(name: str, t: Tensor, q: Tensor, rank: int, batch: int) -> Tensor:
    if not isinstance(t, Tensor) or t.dim() != rank or t.shape[0] != batch:
        want = f"[{batch}, max_pages]" if rank == 2 else f"[{batch}]"
        raise ValueError(f"{name}: expected shape {want}, got {getattr(t, 'shape', type(t).__name__)}")
    if t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name}: expected dtype int32 (or int64), got {t.dtype}")
    _same_device(name, t, q)
    return t if t.dtype == torch.int32 else t.to(torch.int32)


def _check_int_vector(name: str, t: Tensor, length: int, q: Tensor) -> None:
    if t.dim() != 1 or t.shape[0] != length or t.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name}: expected int32/int64 [{length}], got {t.dtype} {list(t.shape)}")
    _same_device(name, t, q)


def _check_paged_values(
    block_table: Tensor,
    seq_lens: Tensor,
    num_pages: int,
    page_size: int,
    prefix_k: Tensor | None,
    prefix_index: Tensor | None,
    prefix_lengths: Tensor | None,
) -> None:
    """The opt-in value checks of paged_decode (they synchronise with the device)."""
    bt, sl = block_table.cpu(), seq_lens.cpu().long()
    cap = bt.shape[1] * page_size
    bad = ((sl < 0) | (sl > cap)).nonzero().flatten()
    if bad.numel():
        b = int(bad[0])
        raise ValueError(
            f"seq_lens: expected values in [0, {cap}] (max_pages * page_size), got {int(sl[b])} for sequence {b}"
        )
    used = torch.arange(bt.shape[1])[None, :] < ((sl + page_size - 1) // page_size)[:, None]
    bad = (used & ((bt < 0) | (bt >= num_pages))).nonzero()
    if bad.numel():
        b, slot = (int(x) for x in bad[0])
        raise ValueError(
            f"block_table: expected page ids in [0, {num_pages}) for the pages a sequence uses, got "
            f"{int(bt[b, slot])} at [{b}, {slot}]"
        )
    if prefix_k is not None and prefix_k.dim() == 4 and prefix_index is not None and prefix_index.numel():
        idx = prefix_index.cpu()
        if int(idx.min()) < -1 or int(idx.max()) >= prefix_k.shape[0]:
            raise ValueError(
                f"prefix_index: expected values in [-1, {prefix_k.shape[0] - 1}], got min "
                f"{int(idx.min())}, max {int(idx.max())}"
            )
    if prefix_k is not None and prefix_lengths is not None and prefix_lengths.numel():
        lengths = prefix_lengths.cpu()
        if int(lengths.min()) < 0 or int(lengths.max()) > prefix_k.shape[-2]:
            raise ValueError(
                f"prefix_lengths: expected values in [0, {prefix_k.shape[-2]}], got min "
                f"{int(lengths.min())}, max {int(lengths.max())}"
            )


def _fill_common(p, q: Tensor, scale: float) -> None:
    batch, hq, sq, dim = q.shape
    p.batch, p.heads_q, p.seqlen_q, p.head_dim = batch, hq, sq, dim
    p.dtype = DTYPES[q.dtype]
    p.scale = float(scale)
    p.q = q.data_ptr()
    p.q_sb, p.q_sh, p.q_ss = _strides(q)


def _fill_prefix(p, q: Tensor, hkv: int, prefix_k, prefix_v, prefix_index, prefix_lengths) -> None:
    p.heads_kv = hkv
    if prefix_k is None or prefix_k.shape[-2] == 0:
        return
    batch, _, _, dim = q.shape
    pooled = prefix_k.dim() == 4
    _check_data("prefix_k", prefix_k, q, 4 if pooled else 3)
    _check_data("prefix_v", prefix_v, q, 4 if pooled else 3)
    plen = prefix_k.shape[-2]
    pool = prefix_k.shape[0] if pooled else 1
    if prefix_v.shape != prefix_k.shape or tuple(prefix_k.shape[-3:]) != (hkv, plen, dim):
        raise ValueError(
            f"prefix_k, prefix_v: expected [N, Hkv={hkv}, P, D={dim}] or [Hkv, P, D], got "
            f"{list(prefix_k.shape)} and {list(prefix_v.shape)}"
        )
    p.prefix_k, p.prefix_v = prefix_k.data_ptr(), prefix_v.data_ptr()
    p.prefix_len = plen
    if pooled:
        p.pool_size = pool
        p.pk_sn, p.pk_sh, p.pk_sp = _strides(prefix_k)
        p.pv_sn, p.pv_sh, p.pv_sp = _strides(prefix_v)
        if prefix_index is None:
            raise ValueError("prefix_index: required with a pool-form prefix [N, Hkv, P, D], got None")
        _check_int_vector("prefix_index", prefix_index, batch, q)
        p.prefix_index = prefix_index.data_ptr()
        p.prefix_index_i64 = prefix_index.dtype == torch.int64
        p.pi_s = prefix_index.stride(0)
    else:
        p.pool_size = 0
        p.pk_sn = p.pv_sn = 0
        p.pk_sh, p.pk_sp = _strides(prefix_k)
        p.pv_sh, p.pv_sp = _strides(prefix_v)
    if prefix_lengths is not None:
        _check_int_vector("prefix_lengths", prefix_lengths, pool, q)
        p.prefix_lengths = prefix_lengths.data_ptr()
        p.prefix_lengths_i64 = prefix_lengths.dtype == torch.int64
        p.pl_s = prefix_lengths.stride(0)


@cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@lru_cache(maxsize=4096)  # called on every decode step with the same few shapes
def num_splits(blocks: int, max_keys: int, head_dim: int, sms: int) -> int:
    """Split-K factor from shapes only: enough blocks to fill whole waves of the GPU, at least
    MIN_TILES_PER_SPLIT tiles per split. Picks the smallest factor within 85% of the best wave
    efficiency (fewer splits = less partial traffic and merge work)."""
    wave = sms * BLOCKS_PER_SM[head_dim]
    tiles = math.ceil(max_keys / TILE_KEYS)
    limit = max(1, min(MAX_SPLITS, tiles // MIN_TILES_PER_SPLIT))
    if blocks <= 0 or blocks >= wave or limit == 1:
        return 1

    def efficiency(s: int) -> float:
        waves = blocks * s / wave
        return waves / math.ceil(waves)

    best = max(efficiency(s) for s in range(1, limit + 1))
    return next(s for s in range(1, limit + 1) if efficiency(s) >= 0.85 * best)


def _launch(C, p, q: Tensor, hkv: int, max_seq: int, splits: int | None):
    batch, hq, sq, dim = q.shape
    out = new_out(q)
    lse = torch.empty((batch, hq, sq), dtype=torch.float32, device=q.device)
    p.out = out.data_ptr()
    p.o_sb, p.o_sh, p.o_ss = out.stride()[:3]
    p.lse = lse.data_ptr()
    p.l_sb, p.l_sh, p.l_ss = lse.stride()
    index = q.device.index if q.device.index is not None else torch.cuda.current_device()
    row_groups = math.ceil((hq // hkv) * sq / TILE_ROWS)
    if splits is None:
        splits = num_splits(batch * hkv * row_groups, p.prefix_len + max_seq, dim, _sm_count(index))
    p.num_splits = splits
    workspace = None
    if p.num_splits > 1:
        elems = C.workspace_elements(p)
        workspace = torch.empty(elems, dtype=torch.float32, device=q.device)
        p.workspace, p.workspace_elems = workspace.data_ptr(), elems
    if batch > 0:
        C.decode(p, torch.cuda.current_stream(q.device).cuda_stream, index)
    # `workspace` is freed here; the caching allocator keeps it for this stream's later work, so the
    # kernels that are still queued may use it safely.
    return out, lse
