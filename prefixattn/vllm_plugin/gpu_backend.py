"""The plugin's attention backend on CUDA: vLLM's FlashAttention plus a per-token prefix fold.

vLLM keeps everything it owns: the paged KV cache and its layout, the cache writes (`do_kv_cache_update`), the
metadata builder, the scheduling and the FlashAttention kernel. The only change is in the decoder layers'
forward: the kernel is called with `return_softmax_lse=True`, and `prefixattn.merge_prefix` then folds each
token's prefix (its request's pool entry) into the result through the log-sum-exp. A request without a prefix
(pool index -1) gets FlashAttention's result unchanged.

    rows [R]   = request_prefix_index(R)                       router: pool entry per batch row (-1 = none)
    tokens [T] = token_prefix_index(rows, query_start_loc, T)   which row each token belongs to
    out, lse   = flash_attn_varlen_func(..., return_softmax_lse=True)      lse is [Hq, T]
    merge_prefix(q, out, lse.t(), pool.k, pool.v, tokens, pool.lengths)   out updated in place

No host synchronisation and fixed buffers throughout, so a step can be captured in a full CUDA graph.

With tensor parallelism each rank's pool holds its own KV heads (the pool slices them when it loads), and
`num_heads` / `num_kv_heads` here are already the rank's, so the fold is local to the rank like the rest of the
attention. TP > 1 is unmeasured on a GPU so far.

This module imports without vLLM (the main test suite checks its pure parts); the vLLM classes are built on
first access, in the process that resolves the backend's class path.
"""

from __future__ import annotations

import os

# The class path vLLM resolves for AttentionBackendEnum.FLASH_ATTN and CUSTOM once `register()` has run.
BACKEND_CLASS_PATH = "prefixattn.vllm_plugin.gpu_backend.PrefixFlashAttentionBackend"

# Decode-only steps through prefixattn's split-K paged kernel on vLLM's own page layout instead of
# FlashAttention + fold. Off: it has not been measured faster on vLLM's layout yet (the A/B is
# `bench_serving.py --paged-decode`, which sets this variable).
PAGED_DECODE_ENV = "PREFIXATTN_VLLM_PAGED_DECODE"


def paged_decode_enabled() -> bool:
    return os.environ.get(PAGED_DECODE_ENV, "0").lower() in ("1", "true", "yes", "on")


def unsupported_reasons(
    *,
    attn_type: str,
    alibi: bool,
    sliding_window: bool,
    logits_soft_cap: float | None,
    sinks: bool,
    kv_cache_dtype: str,
    dcp_world_size: int,
) -> list[str]:
    """Why a decoder layer with these settings cannot take a prefix here (empty: it can). A prefix key has no
    position and no causal rule, so position-dependent score changes (ALiBi, sliding windows) have no defined
    value for it; soft-capping and sinks change FlashAttention's softmax in ways the fold does not reproduce; a
    quantised cache dequantises inside the kernel; decode context parallelism merges partial results itself."""
    reasons = []
    if attn_type != "decoder":
        reasons.append(f"attention type {attn_type!r} (only decoder self-attention takes a prefix)")
    if alibi:
        reasons.append("ALiBi slopes (a prefix key has no position to take a bias from)")
    if sliding_window:
        reasons.append("sliding-window attention")
    if logits_soft_cap:
        reasons.append(f"logit soft-capping ({logits_soft_cap})")
    if sinks:
        reasons.append("attention sinks")
    if kv_cache_dtype not in ("auto", "float16", "bfloat16"):
        reasons.append(f"a quantised KV cache (kv_cache_dtype={kv_cache_dtype!r})")
    if dcp_world_size > 1:
        reasons.append(f"decode context parallelism (size {dcp_world_size})")
    return reasons


def check_pool_heads(pool_heads_kv: int, pool_head_dim: int, num_kv_heads: int, head_size: int) -> None:
    """The pool must hold exactly this rank's KV heads (TP slicing happens when the pool loads)."""
    if (pool_heads_kv, pool_head_dim) != (num_kv_heads, head_size):
        raise ValueError(
            f"prefixattn: the prefix pool holds {pool_heads_kv} KV heads of dim {pool_head_dim} for this rank, "
            f"but the attention layers have {num_kv_heads} KV heads of dim {head_size} "
            "(with tensor parallelism each rank's pool must hold its own slice of the KV heads)"
        )


def register() -> None:
    """What the plugin's register() does on CUDA, in every vLLM process. Both FLASH_ATTN (what vLLM picks by
    default for Llama-family models on Hopper) and CUSTOM resolve to this backend, which is plain vLLM
    FlashAttention while the plugin is inactive; `configure` then pins the choice for an active config. With
    PREFIXATTN_VLLM_RUNNER=v2, Model Runner V2 is wrapped for per-row routing (see mrv2)."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    from . import mrv2

    register_backend(AttentionBackendEnum.FLASH_ATTN, BACKEND_CLASS_PATH)
    register_backend(AttentionBackendEnum.CUSTOM, BACKEND_CLASS_PATH)
    if mrv2.requested_runner() == "v2":
        mrv2.install_routing()


def configure(vllm_config) -> str:
    """For a config the plugin is active in, on CUDA, while it is built (before the engine's processes start):
    select this attention backend and a model runner whose batch rows the router can see. Returns the runner
    ("v1" or "v2")."""
    from . import mrv2

    select_for(vllm_config)
    return mrv2.select_runner(vllm_config)


def select_for(vllm_config) -> None:
    """Make this config use the backend. A user who explicitly chose another attention backend gets an error
    instead of silently unprefixed outputs: the prefix lives in this backend only."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    config = vllm_config.attention_config
    chosen = config.backend
    if chosen not in (None, AttentionBackendEnum.FLASH_ATTN, AttentionBackendEnum.CUSTOM):
        raise ValueError(
            f"prefixattn: attention backend {chosen.name} was requested, but prefixes are applied only by "
            "prefixattn's FlashAttention-based backend: drop --attention-backend (or use FLASH_ATTN)"
        )
    if config.backend_per_kind:
        raise ValueError("prefixattn: attention_config.backend_per_kind is not supported with prefixes")
    config.backend = AttentionBackendEnum.CUSTOM


def _row_prefix_index(num_rows: int):
    """Pool entry per batch row, from whichever runner's router is live (Model Runner V2 publishes its own)."""
    from . import mrv2

    if mrv2.active():
        return mrv2.row_prefix_index(num_rows)
    from .router import request_prefix_index

    return request_prefix_index(num_rows)


def _build_classes():
    from vllm.config import get_current_vllm_config_or_none
    from vllm.utils.torch_utils import canonicalize_singleton_dim_strides
    from vllm.v1.attention.backend import AttentionType
    from vllm.v1.attention.backends import flash_attn as fa

    from ..merge import fold_unchecked, merge_prefix, token_prefix_index
    from . import mrv2
    from .pool import ensure_pool, layer_index

    class PrefixFlashAttentionImpl(fa.FlashAttentionImpl):
        """FlashAttention with the LSE returned and the request's prefix folded in per token."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.prefix_layer: int | None = None
            self.pool = None
            self.checked = False  # merge_prefix's argument checks ran once
            if self.attn_type != AttentionType.DECODER:
                return
            config = get_current_vllm_config_or_none()
            # The pool is allocated now, while the model is built (before vLLM sizes its KV cache).
            self.pool = ensure_pool(config) if config is not None else None
            if self.pool is None:  # plugin inactive: plain FlashAttention
                return
            unsupported = unsupported_reasons(
                attn_type="decoder",
                alibi=self.alibi_slopes is not None,
                sliding_window=tuple(self.sliding_window) != (-1, -1),
                logits_soft_cap=self.logits_soft_cap,
                sinks=self.sinks is not None,
                kv_cache_dtype=self.kv_cache_dtype,
                dcp_world_size=getattr(self, "dcp_world_size", 1),
            )
            if self.fa4_hd256:
                unsupported.append("FlashAttention 4's head-dim-256 kernel")
            if config.use_v2_model_runner and not mrv2.active():
                unsupported.append(f"vLLM's Model Runner V2 without prefixattn's routing ({mrv2.RUNNER_ENV}=v2)")
            if unsupported:
                raise NotImplementedError("prefixattn: prefixes are not supported with " + "; ".join(unsupported))
            prefix_k = self.pool.layer(0)[0]
            check_pool_heads(prefix_k.shape[1], prefix_k.shape[3], self.num_kv_heads, self.head_size)

        def forward(
            self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None, output_block_scale=None
        ):
            pool = self.pool
            if attn_metadata is None or pool is None:
                return super().forward(
                    layer, query, key, value, kv_cache, attn_metadata, output, output_scale, output_block_scale
                )
            if output_scale is not None or output_block_scale is not None:
                raise NotImplementedError("prefixattn: fused output quantization is not supported")
            if (
                attn_metadata.causal is not True  # non-causal or per-sequence (a tensor)
                or attn_metadata.mm_prefix_query_range_tensor is not None
                or attn_metadata.rswa_prefix_lens is not None
            ):
                raise NotImplementedError(
                    "prefixattn: prefixes need plain causal decoder attention (not non-causal or per-sequence "
                    "causality, multimodal prefix-LM ranges or R-SWA)"
                )
            if self.prefix_layer is None:
                self.prefix_layer = layer_index(layer.layer_name)
            prefix_k, prefix_v, lengths = pool.layer(self.prefix_layer)

            tokens = attn_metadata.num_actual_tokens
            query, out = query[:tokens], output[:tokens]
            rows = _row_prefix_index(attn_metadata.query_start_loc.shape[0] - 1)
            if paged_decode_enabled() and attn_metadata.max_query_len == 1:
                return self._paged_decode(
                    query, kv_cache, attn_metadata, out, output, rows[:tokens], prefix_k, prefix_v, lengths
                )

            key_cache, value_cache = kv_cache.transpose(1, 2).split(self.head_size, dim=-1)
            key_cache = canonicalize_singleton_dim_strides(key_cache)
            value_cache = canonicalize_singleton_dim_strides(value_cache)
            descale_shape = (attn_metadata.query_start_loc.shape[0] - 1, self.num_kv_heads)
            _, lse = fa.flash_attn_varlen_func(
                q=query,
                k=key_cache,
                v=value_cache,
                out=out,
                cu_seqlens_q=attn_metadata.query_start_loc,
                max_seqlen_q=attn_metadata.max_query_len,
                seqused_k=attn_metadata.seq_lens,
                max_seqlen_k=attn_metadata.max_seq_len,
                softmax_scale=self.scale,
                causal=True,
                window_size=list(self.sliding_window),  # (-1, -1): sliding windows are refused above
                block_table=attn_metadata.block_table,
                scheduler_metadata=attn_metadata.scheduler_metadata,
                fa_version=self.vllm_flash_attn_version,
                q_descale=layer._q_scale.expand(descale_shape) if self.supports_quant_query_input else None,
                k_descale=layer._k_scale.expand(descale_shape),
                v_descale=layer._v_scale.expand(descale_shape),
                num_splits=attn_metadata.max_num_splits,
                return_softmax_lse=True,
            )
            # One [T] index per step, shared by the layers: vLLM builds a new metadata object every step and
            # hands it to every layer. The key guards against a copy of it with other buffers or token count.
            key = (attn_metadata.query_start_loc.data_ptr(), tokens, rows.data_ptr())
            cached = getattr(attn_metadata, "_prefixattn_token_index", None)
            if cached is not None and cached[0] == key:
                token_index = cached[1]
            else:
                token_index = token_prefix_index(rows, attn_metadata.query_start_loc, tokens)
                attn_metadata._prefixattn_token_index = (key, token_index)
            if self.checked:
                fold_unchecked(query, out, lse.t(), prefix_k, prefix_v, token_index, lengths, self.scale)
            else:  # the first call checks every argument; later calls differ only in T
                merge_prefix(query, out, lse.t(), prefix_k, prefix_v, token_index, lengths, softmax_scale=self.scale)
                self.checked = True
            return output

        def _paged_decode(self, query, kv_cache, attn_metadata, out, output, rows, prefix_k, prefix_v, lengths):
            """One new token per row (row r is token r; CUDA-graph padding rows own no token and come last):
            prefixattn's paged kernel reads vLLM's pages in place ([blocks, block_size, Hkv, D] views of the
            cache) and the prefix in one pass."""
            from ..paged import prefix_attention_paged

            key_cache, value_cache = kv_cache.transpose(1, 2).split(self.head_size, dim=-1)
            num_rows = query.shape[0]
            result = prefix_attention_paged(
                query[:num_rows].unsqueeze(2),  # [R, Hq, 1, D]
                key_cache,
                value_cache,
                attn_metadata.block_table[:num_rows],
                attn_metadata.seq_lens[:num_rows],
                prefix_k,
                prefix_v,
                prefix_index=rows,
                prefix_lengths=lengths,
                softmax_scale=self.scale,
            )
            out[:num_rows].copy_(result.squeeze(2))
            return output

    class PrefixFlashAttentionBackend(fa.FlashAttentionBackend):
        @staticmethod
        def get_name() -> str:
            return "CUSTOM"

        @staticmethod
        def get_impl_cls():
            return PrefixFlashAttentionImpl

    return {
        "PrefixFlashAttentionImpl": PrefixFlashAttentionImpl,
        "PrefixFlashAttentionBackend": PrefixFlashAttentionBackend,
    }


_CLASSES: dict | None = None


def __getattr__(name: str):
    global _CLASSES
    if name in ("PrefixFlashAttentionBackend", "PrefixFlashAttentionImpl"):
        if _CLASSES is None:
            _CLASSES = _build_classes()
        return _CLASSES[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
