"""Input checks for prefix_attention, run before any kernel launch.

Every error names the argument, what was expected and what was given. Checks read shapes, dtypes and
devices only, never tensor values on the device (that would force a host sync and break CUDA graphs);
the one exception is range-checking prefix_index / prefix_lengths, done only when they live on the CPU
or when the caller opts in with validate_values=True.
"""

from __future__ import annotations

import math
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
    _check_tensor("q", q, rank=4)
    _check_tensor("k", k, rank=4)
    _check_tensor("v", v, rank=4)
    if q.dtype not in FLOAT_DTYPES:
        raise TypeError(f"q: expected dtype float16, bfloat16, float32 or float64, got {q.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name}: expected dtype {q.dtype} (same as q), got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name}: expected device {q.device} (same as q), got {t.device}")
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
        if t.numel() and t.stride(-1) != 1:
            raise ValueError(f"{name}: last dimension must be contiguous (stride 1), got strides {t.stride()}")
    if sq > sk and causal:
        raise ValueError(
            f"q: with causal=True the query length must not exceed the key length (bottom-right alignment); "
            f"got Sq={sq} > Sk={sk}"
        )

    # Prefix: shared [Hkv, P, D] or pool [N, Hkv, P, D].
    if (prefix_k is None) != (prefix_v is None):
        given, missing = ("prefix_k", "prefix_v") if prefix_v is None else ("prefix_v", "prefix_k")
        raise ValueError(f"{missing}: expected a tensor because {given} was given, got None")
    plen, pool_size, pooled = 0, 0, False
    if prefix_k is not None:
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
            raise ValueError(
                f"prefix_k: expected {form} with Hkv={hkv} and D={dim} (from k), got shape {_shape(prefix_k)}"
            )
        for name, t in (("prefix_k", prefix_k), ("prefix_v", prefix_v)):
            if t.dtype != q.dtype:
                raise TypeError(f"{name}: expected dtype {q.dtype} (same as q), got {t.dtype}")
            if t.device != q.device:
                raise ValueError(f"{name}: expected device {q.device} (same as q), got {t.device}")
            if t.numel() and t.stride(-1) != 1:
                raise ValueError(f"{name}: last dimension must be contiguous (stride 1), got strides {t.stride()}")
        plen = prefix_k.shape[-2]
        pool_size = prefix_k.shape[0] if pooled else 1
        if pooled and pool_size == 0:
            raise ValueError(f"prefix_k: the pool must hold at least one entry, got shape {_shape(prefix_k)}")

    if prefix_index is not None:
        if prefix_k is None or not pooled:
            got = "no prefix" if prefix_k is None else f"a shared prefix of shape {_shape(prefix_k)}"
            raise ValueError(f"prefix_index: only valid with a pool-form prefix [N, Hkv, P, D], got {got}")
        _check_tensor("prefix_index", prefix_index, rank=1)
        if prefix_index.dtype not in INDEX_DTYPES:
            raise TypeError(f"prefix_index: expected dtype int32 or int64, got {prefix_index.dtype}")
        if prefix_index.shape[0] != batch:
            raise ValueError(
                f"prefix_index: expected shape [{batch}] (one entry per sequence), got {_shape(prefix_index)}"
            )
        if prefix_index.device != q.device:
            raise ValueError(f"prefix_index: expected device {q.device}, got {prefix_index.device}")
    elif pooled:
        raise ValueError(
            f"prefix_index: required with a pool-form prefix (shape {_shape(prefix_k)}): one entry per sequence, "
            f"-1 for none; got None"
        )

    if prefix_lengths is not None:
        if prefix_k is None:
            raise ValueError("prefix_lengths: only valid with a prefix, got prefix_k=None")
        _check_tensor("prefix_lengths", prefix_lengths, rank=1)
        if prefix_lengths.dtype not in INDEX_DTYPES:
            raise TypeError(f"prefix_lengths: expected dtype int32 or int64, got {prefix_lengths.dtype}")
        if prefix_lengths.shape[0] != pool_size:
            raise ValueError(
                f"prefix_lengths: expected shape [{pool_size}] (one length per pool entry), "
                f"got {_shape(prefix_lengths)}"
            )
        if prefix_lengths.device != q.device:
            raise ValueError(f"prefix_lengths: expected device {q.device}, got {prefix_lengths.device}")

    check_values = validate_values if validate_values is not None else not q.is_cuda
    if check_values:
        if prefix_index is not None and prefix_index.numel():
            lo, hi = int(prefix_index.min()), int(prefix_index.max())
            if lo < -1 or hi >= pool_size:
                raise ValueError(
                    f"prefix_index: expected values in [-1, {pool_size - 1}] (pool of {pool_size}), "
                    f"got min {lo}, max {hi}"
                )
        if prefix_lengths is not None and prefix_lengths.numel():
            lo, hi = int(prefix_lengths.min()), int(prefix_lengths.max())
            if lo < 0 or hi > plen:
                raise ValueError(f"prefix_lengths: expected values in [0, {plen}] (P), got min {lo}, max {hi}")

    if key_padding_mask is not None:
        _check_tensor("key_padding_mask", key_padding_mask, rank=2)
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(
                f"key_padding_mask: expected dtype torch.bool (True = real token), got {key_padding_mask.dtype}"
            )
        if tuple(key_padding_mask.shape) != (batch, sk):
            raise ValueError(
                f"key_padding_mask: expected shape [{batch}, {sk}] ([B, Sk]), got {_shape(key_padding_mask)}"
            )
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask: expected device {q.device}, got {key_padding_mask.device}")

    if attn_bias is not None:
        _check_tensor("attn_bias", attn_bias, rank=4)
        if not attn_bias.is_floating_point():
            raise TypeError(f"attn_bias: expected a floating dtype, got {attn_bias.dtype}")
        target = (batch, hq, sq, sk)
        for axis, (have, want) in enumerate(zip(attn_bias.shape, target)):
            if have not in (1, want):
                raise ValueError(
                    f"attn_bias: expected a shape broadcastable to [B, Hq, Sq, Sk] = {list(target)}, "
                    f"got {_shape(attn_bias)} (dim {axis})"
                )
        if attn_bias.device != q.device:
            raise ValueError(f"attn_bias: expected device {q.device}, got {attn_bias.device}")

    if softmax_scale is not None and not isinstance(softmax_scale, (int, float)):
        raise TypeError(f"softmax_scale: expected a float or None, got {type(softmax_scale).__name__}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
    check_backend_name(backend)

    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(dim)
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
