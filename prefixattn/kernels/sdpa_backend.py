"""The "sdpa" backend: PyTorch's fused attention kernels on the sequence keys, Triton on the prefix, merged exactly.

Forward: the sequence kernel (cuDNN, else flash; on the CPU the flash CPU kernel) returns (o_seq, lse_seq) over
the sequence keys; `_triton_prefix_merge` starts the online softmax from that state and folds in the prefix
tiles, read in place from the prefix buffer. Nothing is concatenated and no [B, Hq, Sq, P] scores are stored.

Backward: given the final out and lse, each key's share of the gradient is independent of the others:
P_ij = exp(s_ij - lse_i), dS_ij = P_ij (dP_ij - delta_i) with delta_i = rowsum(dO_i * O_i). So the vendor
backward, called with the *final* (out, lse) instead of its own, returns exactly the sequence keys' share of dq
and their dk, dv; `triton_bwd.prefix_backward` adds the prefix keys' share of dq and computes dprefix_k/v
(deterministic, batch-bounded, as on the triton backend). A gradient through the returned lse (dlse) shifts
delta, which the vendor backward cannot take: such calls run the triton backward instead (same function).

Why: the vendor kernels are the fastest causal attention there is on the sequence part (cuDNN ~500 TFLOP/s
on an H200 vs ~270 for our Triton forward, benchmarks/NOTES.md), and the prefix part is small, unmasked work.
Limits: no key padding, no attn_bias, causal only with Sq == Sk or Sq == 1 (where the vendor kernels agree with
the bottom-right mask), 16-bit inputs on the GPU; the vendor backward accumulates dq with atomics, so a call that
needs gradients must pass deterministic=False. dq is the vendor's (rounded to q's dtype) plus the prefix share
added in fp32 and rounded again: at most one more rounding than the triton backend's.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor

from ..validation import Problem
from . import triton_unavailable_reason

aten = torch.ops.aten


def new_out(q: Tensor) -> Tensor:
    """The output follows q's layout ([B, Sq, Hq, D] memory in transformers models, contiguous in benchmarks),
    so the dO the vendor backward gets already has out's strides. ops.py's fake uses the same function."""
    return torch.empty_like(q)


# The sequence kernel used on CUDA: "auto" = cuDNN where torch says it can run, else flash. Benchmarks pin one.
SEQUENCE_KERNEL = "auto"
_CUDA_KERNELS = ("cudnn", "flash")


def unsupported_reason(problem: Problem, *, needs_grad: bool, deterministic: bool = True) -> str | None:
    reason = triton_unavailable_reason(problem.device)
    if reason is not None:
        return reason + " (the sdpa backend runs the prefix part in Triton)"
    if problem.has_key_padding:
        return "key_padding_mask is not supported (the fused sequence kernels take no per-key mask)"
    if problem.has_bias:
        return "attn_bias is not supported"
    if problem.causal and problem.seqlen_q not in (1, problem.seqlen_k):
        return (
            f"causal attention needs Sq == Sk or Sq == 1 here (got Sq={problem.seqlen_q}, "
            f"Sk={problem.seqlen_k}): the vendor kernels align a non-square causal mask top-left"
        )
    if needs_grad and deterministic:
        return (
            "its backward runs cuDNN/flash attention, which accumulate dq with atomics (not deterministic); "
            "pass deterministic=False to use it for training"
        )
    if problem.device.type == "cuda":
        if problem.dtype not in (torch.float16, torch.bfloat16):
            return f"dtype {problem.dtype} on CUDA (the fused kernels take float16 and bfloat16)"
        if problem.head_dim % 8 or problem.head_dim > 256:
            return f"head dim {problem.head_dim} (the fused kernels take multiples of 8 up to 256)"
    return None


def sequence_kernel_for(q: Tensor, k: Tensor, v: Tensor, causal: bool, needs_grad: bool) -> str | None:
    """The kernel that runs the sequence part of these very tensors (layouts matter to cuDNN): "cpu_flash" on
    the CPU; on CUDA the pinned SEQUENCE_KERNEL, or cuDNN where torch's own SDPA dispatcher would use it, else
    flash; None when torch refuses both. A few microseconds of host checks, no launch."""
    if q.device.type != "cuda":
        return "cpu_flash"
    causal = _sequence_causal(causal, q)
    if needs_grad:  # torch applies its backward rules to inputs that require grad: grad-requiring views
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    params = torch.backends.cuda.SDPAParams(q, k, v, None, 0.0, causal, q.shape[1] != k.shape[1])
    candidates = _CUDA_KERNELS if SEQUENCE_KERNEL == "auto" else (SEQUENCE_KERNEL,)
    for name in candidates:
        # can_use_cudnn_attention is newer than the flash one; without it cuDNN is not offered.
        check = getattr(torch.backends.cuda, f"can_use_{'cudnn' if name == 'cudnn' else 'flash'}_attention", None)
        if check is not None and check(params, False):
            return name
    return None


def _kernel_or_raise(q, k, v, causal: bool, needs_grad: bool) -> str:
    kernel = sequence_kernel_for(q, k, v, causal, needs_grad)
    if kernel is None:
        raise RuntimeError(
            f"backend 'sdpa': torch {torch.__version__} can run neither cuDNN nor flash attention for q "
            f"{tuple(q.shape)}, k {tuple(k.shape)} {q.dtype} (strides {q.stride()}, {k.stride()}) "
            f"{'with' if needs_grad else 'without'} gradients; use backend='triton'"
        )
    return kernel


def _sequence_causal(causal: bool, q: Tensor) -> bool:
    """A single query row sees every key under the bottom-right causal mask: run it non-causal (the vendor
    kernels' causal mask is top-left for Sq != Sk)."""
    return causal and q.shape[2] > 1


def _sequence_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float):
    """(o_seq [B, Hq, Sq, D], lse_seq [B, Hq, Sq] natural log) of attention over the sequence keys only."""
    kernel = _kernel_or_raise(q, k, v, causal, needs_grad=False)
    causal = _sequence_causal(causal, q)
    if kernel == "cpu_flash":
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
    elif kernel == "cudnn":
        out, lse = aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False, scale=scale)[:2]
    else:
        out, lse = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)[:2]
    # cuDNN returns [B, Hq, Sq, 1]; keep exactly Sq entries whatever padding a kernel adds.
    return out, lse.reshape(q.shape[0], q.shape[1], -1)[..., : q.shape[2]]


def _sequence_backward(dout, q, k, v, out, lse, causal: bool, scale: float):
    """The sequence keys' share of (dq, dk, dv), from the final out and lse of the whole attention."""
    kernel = _kernel_or_raise(q, k, v, causal, needs_grad=True)
    causal = _sequence_causal(causal, q)
    if kernel == "cpu_flash":
        return aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, causal, scale=scale
        )
    lse32 = lse.float().contiguous()
    if dout.stride() != out.stride():  # cuDNN reads dO with O's layout
        dout = torch.empty_like(out).copy_(dout)
    sq, seq_k = q.shape[2], k.shape[2]
    seed, offset = _rng_placeholders(kernel, q.device)
    if kernel == "cudnn":
        return aten._scaled_dot_product_cudnn_attention_backward(
            dout, q, k, v, out, lse32.unsqueeze(-1), seed, offset, None, None, None, sq, seq_k, 0.0, causal, scale=scale
        )
    return aten._scaled_dot_product_flash_attention_backward(
        dout, q, k, v, out, lse32, None, None, sq, seq_k, 0.0, causal, seed, offset, scale=scale
    )


def _like(t: Tensor, x: Tensor) -> Tensor:
    """t with torch.empty_like(x)'s strides, as the custom op declares this backend's out and gradients. The
    vendor kernels return dense tensors, so equal strides already mean equal layouts: no allocation then."""
    if t.stride() == x.stride():
        return t
    like = torch.empty_like(x)
    return t if like.stride() == t.stride() else like.copy_(t)


@lru_cache(maxsize=8)
def _rng_placeholders(kernel: str, device: torch.device):
    """The dropout seed/offset tensors the vendor backward takes, as its own forward returns them (their dtype
    and shape differ between kernels and torch versions). Dropout is 0 here, so their values are never used."""
    x = torch.zeros(1, 1, 16, 64, dtype=torch.bfloat16, device=device)
    if kernel == "cudnn":
        return tuple(aten._scaled_dot_product_cudnn_attention(x, x, x, None, True, 0.0, False, False)[6:8])
    return tuple(aten._scaled_dot_product_flash_attention(x, x, x, 0.0, False, False)[6:8])


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
    from . import _triton_prefix_merge
    from .triton_backend import pool_args_in_range

    # out in new_out(q)'s layout, as the custom op declares; lse contiguous in the accumulation dtype.
    if k.shape[2] == 0 or q.numel() == 0:  # no sequence key (or no query): the triton kernels cover it exactly
        from . import triton_fwd

        prefix_index, prefix_lengths = pool_args_in_range(prefix_k, prefix_index, prefix_lengths)
        out, lse = triton_fwd.forward(
            q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, None, None, causal, scale
        )
        return _like(out, q), lse
    out_seq, lse_seq = _sequence_forward(q, k, v, causal, scale)
    if prefix_k is None:
        lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        return _like(out_seq, q), lse_seq.to(lse_dtype).contiguous()  # a no-op for the vendors' fp32 lse
    prefix_index, prefix_lengths = pool_args_in_range(prefix_k, prefix_index, prefix_lengths)
    return _triton_prefix_merge.merge_prefix(
        q, prefix_k, prefix_v, prefix_index, prefix_lengths, out_seq, lse_seq, scale, new_out(q)
    )


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
    deterministic: bool = False,
):
    from . import triton_bwd
    from .triton_backend import pool_args_in_range

    prefix_index, prefix_lengths = pool_args_in_range(prefix_k, prefix_index, prefix_lengths)
    if dlse is not None or k.shape[2] == 0 or q.numel() == 0:
        # dlse shifts delta, which the vendor backward computes itself; the triton backward takes it.
        return triton_bwd.backward(
            dout, dlse, q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, None, None, out, lse, causal, scale
        )
    dq, dk, dv = (_like(g, x) for g, x in zip(_sequence_backward(dout, q, k, v, out, lse, causal, scale), (q, k, v)))
    if prefix_k is None:
        return dq, dk, dv, None, None
    dpk, dpv = triton_bwd.prefix_backward(
        dout, None, q, prefix_k, prefix_v, prefix_index, prefix_lengths, out, lse, dq, scale
    )
    return dq, dk, dv, dpk, dpv
