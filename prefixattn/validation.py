"""Input checks for prefix_attention, run before any kernel launch.

Every error names the argument, what was expected and what was given. Checks read shapes, dtypes and
devices only, never tensor values on the device (that would force a host sync and break CUDA graphs);
the one exception is range-checking prefix_index / prefix_lengths, done only when they live on the CPU
or when the caller opts in with validate_values=True.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)
BACKENDS = ("auto", "triton", "cuda", "sdpa", "torch")


def _shape(t: Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def check_backend_name(backend) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")


def _check_tensor(name: str, t, *, rank: int | None = None) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if rank is not None and t.dim() != rank:
        raise ValueError(f"{name}: expected a {rank}-d tensor, got shape {_shape(t)} ({t.dim()}-d)")


@dataclass(frozen=True)
class Problem:
    """The validated shape of one call; what dispatch and the kernels need to know."""

    batch: int
    heads_q: int
    heads_kv: int
    seqlen_q: int
    seqlen_k: int
    head_dim: int
    prefix_len: int  # P (0 when there is no prefix)
    pool_size: int  # N for the pool form, 1 for the shared form, 0 without a prefix
    pooled: bool
    dtype: torch.dtype
    device: torch.device
    scale: float
    causal: bool
    has_key_padding: bool
    has_bias: bool


def validate(
    q,
    k,
    v,
    prefix_k,
    prefix_v,
    *,
    prefix_index=None,
    prefix_lengths=None,
    causal=True,
    key_padding_mask=None,
    softmax_scale=None,
    attn_bias=None,
    backend="auto",
    validate_values: bool | None = None,
) -> Problem:
    """Every check of prefix_attention's arguments, by group; returns the validated Problem."""
    batch, hq, hkv, sq, sk, dim = check_qkv(q, k, v, causal)
    plen, pool_size, pooled = check_prefix(prefix_k, prefix_v, q, hkv, dim)
    check_pool_args(prefix_index, prefix_lengths, prefix_k, pooled, pool_size, batch, q)
    if values_checked(validate_values, q):
        check_pool_values(prefix_index, prefix_lengths, pool_size, plen)
    check_key_padding_mask(key_padding_mask, batch, sk, q)
    check_attn_bias(attn_bias, (batch, hq, sq, sk), q)
    scale = check_softmax_scale(softmax_scale, dim)
    check_flag("causal", causal)
    check_backend_name(backend)
    return Problem(
        batch,
        hq,
        hkv,
        sq,
        sk,
        dim,
        plen,
        pool_size,
        pooled,
        q.dtype,
        q.device,
        scale,
        causal,
        key_padding_mask is not None,
        attn_bias is not None,
    )


# --- tensors and shapes ---------------------------------------------------------------------------


def check_same_dtype_device(name: str, t: Tensor, q: Tensor) -> None:
    if t.dtype != q.dtype:
        raise TypeError(f"{name}: expected dtype {q.dtype} (same as q), got {t.dtype}")
    if t.device != q.device:
        raise ValueError(f"{name}: expected device {q.device} (same as q), got {t.device}")


def check_rows_contiguous(name: str, t: Tensor) -> None:
    """The kernels read each row of the last dimension as one contiguous vector."""
    if t.numel() and t.stride(-1) != 1:
        raise ValueError(f"{name}: last dimension must be contiguous (stride 1), got strides {t.stride()}")


def check_qkv(q, k, v, causal) -> tuple[int, int, int, int, int, int]:
    """(B, Hq, Hkv, Sq, Sk, D) of q [B, Hq, Sq, D] and k, v [B, Hkv, Sk, D]."""
    _check_tensor("q", q, rank=4)
    _check_tensor("k", k, rank=4)
    _check_tensor("v", v, rank=4)
    if q.dtype not in FLOAT_DTYPES:
        raise TypeError(f"q: expected dtype float16, bfloat16, float32 or float64, got {q.dtype}")
    check_same_dtype_device("k", k, q)
    check_same_dtype_device("v", v, q)
    batch, hq, sq, dim = q.shape
    if k.shape != v.shape:
        raise ValueError(f"v: expected the shape of k {_shape(k)}, got {_shape(v)}")
    if k.shape[0] != batch:
        raise ValueError(f"k: expected batch size {batch} (q's), got {k.shape[0]} (shape {_shape(k)})")
    hkv, sk, dk = k.shape[1], k.shape[2], k.shape[3]
    if dk != dim:
        raise ValueError(f"k: expected head dim {dim} (q's last dim), got {dk} (shape {_shape(k)})")
    if hq == 0:
        raise ValueError(f"q: expected at least one query head, got shape {_shape(q)}")
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"q: number of query heads must be a multiple of the KV heads; got Hq={hq} for Hkv={hkv}")
    if dim == 0:
        raise ValueError(f"q: head dim must be positive, got shape {_shape(q)}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_rows_contiguous(name, t)
    if sq > sk and causal is True:
        raise ValueError(
            f"q: with causal=True the query length must not exceed the key length (bottom-right alignment); "
            f"got Sq={sq} > Sk={sk}"
        )
    return batch, hq, hkv, sq, sk, dim


# --- prefix and pool --------------------------------------------------------------------------------


def check_prefix(prefix_k, prefix_v, q: Tensor, hkv: int, dim: int) -> tuple[int, int, bool]:
    """(P, pool size, pooled) of a shared [Hkv, P, D] or pool [N, Hkv, P, D] prefix; (0, 0, False) without."""
    if (prefix_k is None) != (prefix_v is None):
        given, missing = ("prefix_k", "prefix_v") if prefix_v is None else ("prefix_v", "prefix_k")
        raise ValueError(f"{missing}: expected a tensor because {given} was given, got None")
    if prefix_k is None:
        return 0, 0, False
    _check_tensor("prefix_k", prefix_k)
    _check_tensor("prefix_v", prefix_v)
    if prefix_k.dim() not in (3, 4):
        raise ValueError(
            f"prefix_k: expected [Hkv, P, D] (shared) or [N, Hkv, P, D] (pool), got shape {_shape(prefix_k)}"
        )
    if prefix_v.shape != prefix_k.shape:
        raise ValueError(f"prefix_v: expected the shape of prefix_k {_shape(prefix_k)}, got {_shape(prefix_v)}")
    pooled = prefix_k.dim() == 4
    expect_tail = (hkv, prefix_k.shape[-2], dim)
    if tuple(prefix_k.shape[-3:]) != expect_tail:
        form = "[N, Hkv, P, D]" if pooled else "[Hkv, P, D]"
        raise ValueError(f"prefix_k: expected {form} with Hkv={hkv} and D={dim} (from k), got shape {_shape(prefix_k)}")
    for name, t in (("prefix_k", prefix_k), ("prefix_v", prefix_v)):
        check_same_dtype_device(name, t, q)
        check_rows_contiguous(name, t)
    pool_size = prefix_k.shape[0] if pooled else 1
    if pooled and pool_size == 0:
        raise ValueError(f"prefix_k: the pool must hold at least one entry, got shape {_shape(prefix_k)}")
    return prefix_k.shape[-2], pool_size, pooled


def check_index_vector(name: str, t, length: int, what: str, q: Tensor) -> None:
    """An int32/int64 vector [length] on q's device (any stride)."""
    _check_tensor(name, t, rank=1)
    if t.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name}: expected dtype int32 or int64, got {t.dtype}")
    if t.shape[0] != length:
        raise ValueError(f"{name}: expected shape [{length}] ({what}), got {_shape(t)}")
    if t.device != q.device:
        raise ValueError(f"{name}: expected device {q.device}, got {t.device}")


def check_pool_args(prefix_index, prefix_lengths, prefix_k, pooled: bool, pool_size: int, batch: int, q) -> None:
    """prefix_index [B] (required with, and only valid with, a pool) and prefix_lengths [N or 1]."""
    if prefix_index is not None:
        if prefix_k is None or not pooled:
            got = "no prefix" if prefix_k is None else f"a shared prefix of shape {_shape(prefix_k)}"
            raise ValueError(f"prefix_index: only valid with a pool-form prefix [N, Hkv, P, D], got {got}")
        check_index_vector("prefix_index", prefix_index, batch, "one entry per sequence", q)
    elif pooled:
        raise ValueError(
            f"prefix_index: required with a pool-form prefix (shape {_shape(prefix_k)}): one entry per sequence, "
            f"-1 for none; got None"
        )
    if prefix_lengths is not None:
        if prefix_k is None:
            raise ValueError("prefix_lengths: only valid with a prefix, got prefix_k=None")
        check_index_vector("prefix_lengths", prefix_lengths, pool_size, "one length per pool entry", q)


# --- masks and bias ---------------------------------------------------------------------------------


def check_key_padding_mask(key_padding_mask, batch: int, sk: int, q: Tensor) -> None:
    if key_padding_mask is None:
        return
    _check_tensor("key_padding_mask", key_padding_mask, rank=2)
    if key_padding_mask.dtype != torch.bool:
        raise TypeError(
            f"key_padding_mask: expected dtype torch.bool (True = real token), got {key_padding_mask.dtype}"
        )
    if tuple(key_padding_mask.shape) != (batch, sk):
        raise ValueError(f"key_padding_mask: expected shape [{batch}, {sk}] ([B, Sk]), got {_shape(key_padding_mask)}")
    if key_padding_mask.device != q.device:
        raise ValueError(f"key_padding_mask: expected device {q.device}, got {key_padding_mask.device}")


def check_attn_bias(attn_bias, target: tuple[int, int, int, int], q: Tensor) -> None:
    """A float tensor broadcastable to target = [B, Hq, Sq, Sk], on q's device."""
    if attn_bias is None:
        return
    _check_tensor("attn_bias", attn_bias, rank=4)
    if not attn_bias.is_floating_point():
        raise TypeError(f"attn_bias: expected a floating dtype, got {attn_bias.dtype}")
    for axis, (have, want) in enumerate(zip(attn_bias.shape, target)):
        if have not in (1, want):
            raise ValueError(
                f"attn_bias: expected a shape broadcastable to [B, Hq, Sq, Sk] = {list(target)}, "
                f"got {_shape(attn_bias)} (dim {axis})"
            )
    if attn_bias.device != q.device:
        raise ValueError(f"attn_bias: expected device {q.device}, got {attn_bias.device}")


# --- scalars ------------------------------------------------------------------------------------------


def check_flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")


def check_softmax_scale(softmax_scale, head_dim: int) -> float:
    """The scale to use: softmax_scale, a finite positive real number, or 1/sqrt(D) when None."""
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    # bool is an int subclass: True would silently count as 1.0.
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, numbers.Real):
        raise TypeError(f"softmax_scale: expected a float or None, got {type(softmax_scale).__name__}")
    scale = float(softmax_scale)
    if not (math.isfinite(scale) and scale > 0.0):
        raise ValueError(f"softmax_scale: expected a finite positive number, got {softmax_scale!r}")
    return scale


# --- values (backend-independent; host reads, so only where they cost no device sync) ----------------


def values_checked(validate_values, q: Tensor) -> bool:
    """Whether to range-check index values: validate_values when given, else only for CPU tensors (on a GPU
    the read is a host sync; a "meta" tensor has no values to read)."""
    if validate_values is not None and not isinstance(validate_values, bool):
        raise TypeError(
            f"validate_values: expected a bool or None, got {type(validate_values).__name__} {validate_values!r}"
        )
    if q.device.type == "meta":
        return False
    return validate_values if validate_values is not None else not q.is_cuda


def check_pool_values(prefix_index, prefix_lengths, pool_size: int, plen: int) -> None:
    if prefix_index is not None and prefix_index.numel():
        lo, hi = int(prefix_index.min()), int(prefix_index.max())
        if lo < -1 or hi >= pool_size:
            raise ValueError(
                f"prefix_index: expected values in [-1, {pool_size - 1}] (pool of {pool_size}), got min {lo}, max {hi}"
            )
    if prefix_lengths is not None and prefix_lengths.numel():
        lo, hi = int(prefix_lengths.min()), int(prefix_lengths.max())
        if lo < 0 or hi > plen:
            raise ValueError(f"prefix_lengths: expected values in [0, {plen}] (P), got min {lo}, max {hi}")
