"""prefix_attention(): validation, backend choice, autograd, and the torch.library custom ops.

The kernel backends ("triton", "cuda", "sdpa") run inside two custom ops, prefixattn::attention_fwd and
prefixattn::attention_bwd, so torch.compile and CUDA graphs see each call as one opaque node with a
known output shape. The "torch" backend is the reference (plain autograd, no custom op).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import kernels
from .reference import prefix_attention_reference
from .validation import Problem, validate


@torch.library.custom_op("prefixattn::attention_fwd", mutates_args=(), device_types=None)
def _attention_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prefix_k: Tensor | None,
    prefix_v: Tensor | None,
    prefix_index: Tensor | None,
    prefix_lengths: Tensor | None,
    key_padding_mask: Tensor | None,
    attn_bias: Tensor | None,
    causal: bool,
    scale: float,
    backend: str,
    deterministic: bool,
) -> tuple[Tensor, Tensor]:
    # deterministic only matters to the backward; it is an input here so that autograd's context sees it.
    impl = kernels.get_backend(backend)
    return impl.forward(
        q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask, attn_bias, causal, scale
    )


@_attention_fwd.register_fake
def _attention_fwd_fake(
    q,
    k,
    v,
    prefix_k,
    prefix_v,
    prefix_index,
    prefix_lengths,
    key_padding_mask,
    attn_bias,
    causal,
    scale,
    backend,
    deterministic,
):
    b, hq, sq, d = q.shape
    out = kernels.get_backend(backend).new_out(q)  # the layout the backend writes (kernels.bshd_empty or q's)
    # float32, or float64 for float64 inputs (as the reference; keeps float64 checks exact end to end).
    lse = q.new_empty((b, hq, sq), dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
    return out, lse


@torch.library.custom_op("prefixattn::attention_bwd", mutates_args=(), device_types=None)
def _attention_bwd(
    dout: Tensor,
    dlse: Tensor | None,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prefix_k: Tensor | None,
    prefix_v: Tensor | None,
    prefix_index: Tensor | None,
    prefix_lengths: Tensor | None,
    key_padding_mask: Tensor | None,
    attn_bias: Tensor | None,
    out: Tensor,
    lse: Tensor,
    causal: bool,
    scale: float,
    backend: str,
    deterministic: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    impl = kernels.get_backend(backend)
    dq, dk, dv, dpk, dpv = impl.backward(
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
        causal,
        scale,
        deterministic=deterministic,
    )
    if dpk is None:  # custom ops cannot return None
        dpk, dpv = q.new_empty(0), q.new_empty(0)
    return dq, dk, dv, dpk, dpv


@_attention_bwd.register_fake
def _attention_bwd_fake(
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
    causal,
    scale,
    backend,
    deterministic,
):
    dpk = torch.empty_like(prefix_k) if prefix_k is not None else q.new_empty(0)
    dpv = torch.empty_like(prefix_v) if prefix_v is not None else q.new_empty(0)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dpk, dpv


def _setup_context(ctx, inputs, output):
    (
        q,
        k,
        v,
        prefix_k,
        prefix_v,
        prefix_index,
        prefix_lengths,
        key_padding_mask,
        attn_bias,
        causal,
        scale,
        backend,
        deterministic,
    ) = inputs
    out, lse = output
    ctx.save_for_backward(
        q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask, attn_bias, out, lse
    )
    ctx.causal, ctx.scale, ctx.backend, ctx.deterministic = causal, scale, backend, deterministic
    ctx.has_prefix = prefix_k is not None
    ctx.set_materialize_grads(False)  # an unused lse gets dlse=None, not zeros: backends skip its term


def _backward(ctx, dout, dlse):
    (q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask, attn_bias, out, lse) = (
        ctx.saved_tensors
    )
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv, dpk, dpv = _attention_bwd(
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
        ctx.causal,
        ctx.scale,
        ctx.backend,
        ctx.deterministic,
    )
    if not ctx.has_prefix:
        dpk = dpv = None
    return dq, dk, dv, dpk, dpv, None, None, None, None, None, None, None, None


_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def _needs_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _choose_backend(
    requested: str,
    problem: Problem,
    *,
    needs_grad: bool,
    dropout_p: float,
    bias_needs_grad: bool,
    deterministic: bool = True,
) -> str:
    """Resolve "auto"; refuse (never silently replace) an explicit backend that cannot run this call."""
    if requested == "torch":
        return "torch"
    if requested == "auto":
        if dropout_p > 0.0 or bias_needs_grad:
            return "torch"
        return kernels.auto_backend(problem, needs_grad=needs_grad)
    if dropout_p > 0.0:
        raise ValueError(
            f"dropout_p: backend {requested!r} has no attention dropout; got dropout_p={dropout_p} "
            f"(use backend='torch' or 'auto')"
        )
    if bias_needs_grad:
        raise ValueError(
            f"attn_bias: backend {requested!r} does not compute a gradient for attn_bias, but it "
            f"requires grad (detach it, or use backend='torch')"
        )
    kernels.check_backend(requested, problem, needs_grad=needs_grad, deterministic=deterministic)
    return requested


def prefix_attention(
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
    return_lse: bool = False,
    backend: str = "auto",
    attn_bias: Tensor | None = None,
    dropout_p: float = 0.0,
    deterministic: bool = True,
    validate_values: bool | None = None,
):
    """Attention of q over [prefix; sequence] keys, with the prefix read from its own buffer.

    q [B, Hq, Sq, D]; k, v [B, Hkv, Sk, D] (any strides, last dim contiguous); prefix_k, prefix_v
    [Hkv, P, D] shared by the batch, or a pool [N, Hkv, P, D] with prefix_index [B] (-1 = no prefix)
    and optional prefix_lengths [N]. Query i sees every valid prefix key and, when causal, the sequence
    keys j <= i + (Sk - Sq): bottom-right aligned, the prefix always on. Sq=2, Sk=4, P=2 (# = attended):

                 prefix  sequence keys
        query 0:  # #    # # # .
        query 1:  # #    # # # #

    key_padding_mask [B, Sk] bool, True = real token (sequence keys only).
    Returns out [B, Hq, Sq, D] in q's dtype, and lse [B, Hq, Sq] float32 (natural log) if return_lse.

    Extensions beyond the core semantics (docs/design.md, "Semantics"): attn_bias (float, broadcastable to
    [B, Hq, Sq, Sk], added to the scaled scores of sequence keys only; -inf masks) and dropout_p (backend
    "torch" only).

    deterministic (default True): the backward gives bitwise identical gradients run to run. False selects
    a Triton backward that accumulates dq with fp32 atomics instead of recomputing it, so the order of its
    sums varies between runs and gradients can differ in the last bits; the forward is unaffected, and
    backends without such a path (torch reference) ignore it. backend="sdpa" (cuDNN/flash on the sequence
    keys, whose backward uses atomics) trains only with deterministic=False. Measured on an H200 (bf16, S=2048): 10%
    faster than the default at head dim 64, about 30% slower at 128 (benchmarks/NOTES.md).

    validate_values: range-check prefix_index and prefix_lengths (ValueError naming the bad value). The
    default checks CPU tensors only: on a GPU the check is a host sync, which a training step or a CUDA
    graph should not pay; unchecked out-of-range values there mean "no prefix" (index) or are clamped to
    [0, P] (lengths), never an out-of-bounds access.
    """
    problem = validate(
        q,
        k,
        v,
        prefix_k,
        prefix_v,
        prefix_index=prefix_index,
        prefix_lengths=prefix_lengths,
        causal=causal,
        key_padding_mask=key_padding_mask,
        softmax_scale=softmax_scale,
        attn_bias=attn_bias,
        backend=backend,
        validate_values=validate_values,
    )
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p: expected a float in [0, 1), got {dropout_p!r}")
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic: expected a bool, got {type(deterministic).__name__} {deterministic!r}")
    needs_grad = _needs_grad(q, k, v, prefix_k, prefix_v)
    bias_needs_grad = _needs_grad(attn_bias)
    chosen = _choose_backend(
        backend,
        problem,
        needs_grad=needs_grad,
        dropout_p=float(dropout_p),
        bias_needs_grad=bias_needs_grad,
        deterministic=deterministic,
    )

    if chosen == "torch":
        return prefix_attention_reference(
            q,
            k,
            v,
            prefix_k,
            prefix_v,
            prefix_index=prefix_index,
            prefix_lengths=prefix_lengths,
            causal=causal,
            key_padding_mask=key_padding_mask,
            softmax_scale=problem.scale,
            attn_bias=attn_bias,
            dropout_p=float(dropout_p),
            return_lse=return_lse,
        )

    if problem.prefix_len == 0:  # an empty prefix is no prefix; kernels never see P = 0 buffers
        prefix_k = prefix_v = prefix_index = prefix_lengths = None
    out, lse = _attention_fwd(
        q,
        k,
        v,
        prefix_k,
        prefix_v,
        prefix_index,
        prefix_lengths,
        key_padding_mask,
        attn_bias.detach() if attn_bias is not None else None,
        causal,
        problem.scale,
        chosen,
        deterministic,
    )
    return (out, lse) if return_lse else out
