"""vLLM's CPU attention with a per-request prefix, computed by prefixattn (the CPU path of the plugin).

vLLM's CPU kernel returns no log-sum-exp and packs each KV block's interior per ISA, so a prefix cannot be
folded into its output. While the plugin is active this backend therefore owns the decoder layers' cache
writes and attention; it keeps vLLM's KV-cache tensor ([num_blocks, Hkv, block_size, 2 * D]), metadata
builder and scheduling:
- cache writes: block b holds keys in rows [b, :, 0:bs] and values in [b, :, bs:2bs] of the
  [num_blocks, Hkv, 2 * bs, D] view, plain row-major (`do_kv_cache_update`);
- decode rows (one new token) read the paged cache in place through `prefixattn.prefix_attention_paged`;
- prefill and chunked-prefill rows gather their pages and call `prefixattn.prefix_attention` with
  causal=True: its bottom-right-aligned mask is exactly a chunk of n queries at the end of L keys;
- a request without a prefix has pool index -1: plain causal attention from the same calls.
The pool entry of each row comes from `router.request_prefix_index`. When the plugin is inactive,
`get_impl_cls` returns vLLM's own implementation, so nothing changes. Encoder and cross attention always
use vLLM's implementation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from vllm.config import get_current_vllm_config, get_current_vllm_config_or_none
from vllm.v1.attention.backend import AttentionType
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl

from .. import prefix_attention, prefix_attention_paged
from . import config as plugin_config
from . import pool as prefix_pool
from . import router

BACKEND = "torch"  # prefixattn's plain-PyTorch path: its Triton and CUDA kernels need a GPU


def _plugin_active() -> bool:
    vllm_config = get_current_vllm_config_or_none()
    return vllm_config is not None and plugin_config.from_vllm_config(vllm_config) is not None


class PrefixCPUAttentionBackend(CPUAttentionBackend):
    """CPU_ATTN with prefixattn's implementation while the plugin is active, vLLM's own otherwise."""

    @staticmethod
    def get_impl_cls():
        return PrefixCPUAttentionImpl if _plugin_active() else CPUAttentionBackendImpl


@dataclass
class _StepPlan:
    """How one forward step's rows split into decode and prefill calls (shared by all layers of the step)."""

    decode_rows: Tensor | None  # long [B_dec]
    decode_tokens: Tensor | None  # long [B_dec]: each decode row's token in the flattened batch
    decode_table: Tensor | None  # int32 [B_dec, pages in use]
    decode_lens: Tensor | None  # int32 [B_dec]
    prefill: list  # (row, first token, n new tokens, seq_len L, page ids long [ceil(L / bs)])


def _plan(attn_metadata, block_size: int) -> _StepPlan:
    plan = getattr(attn_metadata, "_prefixattn_plan", None)
    if plan is not None:
        return plan
    starts = attn_metadata.query_start_loc.tolist()
    seq_lens = attn_metadata.seq_lens.to(torch.int32)
    lens = seq_lens.tolist()
    block_table = attn_metadata.block_table.to(torch.int32)
    decode, prefill = [], []
    for row in range(len(starts) - 1):
        n = starts[row + 1] - starts[row]
        if n == 1:
            decode.append(row)
        elif n > 1:
            pages = block_table[row, : -(-lens[row] // block_size)].long()
            prefill.append((row, starts[row], n, lens[row], pages))
    if decode:
        rows = torch.tensor(decode)
        dec_lens = seq_lens[rows]
        width = -(-max(lens[r] for r in decode) // block_size)  # only the table columns in use
        plan = _StepPlan(
            rows, torch.tensor([starts[r] for r in decode]), block_table[rows, :width].contiguous(), dec_lens, prefill
        )
    else:
        plan = _StepPlan(None, None, None, None, prefill)
    attn_metadata._prefixattn_plan = plan
    return plan


class PrefixCPUAttentionImpl(CPUAttentionBackendImpl):
    """Decoder attention over [prefix; paged sequence] with prefixattn, in a plain cache layout."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.prefixed = self.attn_type == AttentionType.DECODER
        self.layer_idx: int | None = None
        if self.prefixed:
            self._refuse_unsupported()
            # The pool is allocated now, while the model is built (before vLLM sizes its KV cache).
            prefix_pool.ensure_pool(get_current_vllm_config(), torch.device("cpu"))

    def _refuse_unsupported(self) -> None:
        unsupported = {
            "sliding_window": self.sliding_window != -1,
            "alibi_slopes": self.alibi_slopes is not None,
            "logits_soft_cap": bool(self.logits_soft_cap),
            "attention sinks": self.sinks is not None,
            f"kv_cache_dtype={self.kv_cache_dtype!r}": self.is_fp8_kv_cache,
        }
        found = [name for name, present in unsupported.items() if present]
        if found:
            raise ValueError(f"prefixattn CPU attention: this model's layers use {found}, which it does not support")

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        if not self.prefixed:
            return super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        num_blocks, hkv, block_size, _ = kv_cache.shape
        kv = kv_cache.view(num_blocks, hkv, 2 * block_size, -1)
        n = slot_mapping.shape[0]
        slots = slot_mapping.long()
        keep = slots >= 0  # -1 marks a padding token
        slots, k, v = slots[keep], key[:n][keep], value[:n][keep]
        block, offset = slots // block_size, slots % block_size
        kv[block, :, offset] = k.to(kv.dtype)  # [n, Hkv, D]
        kv[block, :, block_size + offset] = v.to(kv.dtype)

    def forward(
        self,
        layer,
        query,
        key,
        value,
        kv_cache,
        attn_metadata,
        output,
        output_scale=None,
        output_block_scale=None,
    ):
        if attn_metadata is None or not self.prefixed:
            return super().forward(
                layer, query, key, value, kv_cache, attn_metadata, output, output_scale, output_block_scale
            )
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("prefixattn CPU attention: fused output quantization is not supported")
        num_reqs = attn_metadata.query_start_loc.numel() - 1
        if num_reqs == 0:
            return output
        if self.layer_idx is None:
            self.layer_idx = prefix_pool.layer_index(layer.layer_name)
        pool = prefix_pool.current_pool()
        prefix_k, prefix_v, prefix_lengths = pool.layer(self.layer_idx)
        index = router.request_prefix_index(num_reqs)

        num_blocks, hkv, block_size, _ = kv_cache.shape
        key_cache, value_cache = kv_cache.view(num_blocks, hkv, 2 * block_size, -1).chunk(2, dim=2)
        plan = _plan(attn_metadata, block_size)
        out = output.view(-1, self.num_heads, self.head_size)

        if plan.decode_rows is not None:
            q = query[plan.decode_tokens].unsqueeze(2)  # [B, Hq, 1, D]
            o = prefix_attention_paged(
                q,
                key_cache.permute(0, 2, 1, 3),  # [num_blocks, bs, Hkv, D], last dim contiguous
                value_cache.permute(0, 2, 1, 3),
                plan.decode_table,
                plan.decode_lens,
                prefix_k,
                prefix_v,
                prefix_index=index[plan.decode_rows],
                prefix_lengths=prefix_lengths,
                softmax_scale=self.scale,
                backend=BACKEND,
            )
            out[plan.decode_tokens] = o.squeeze(2)
        for row, start, n, seq_len, pages in plan.prefill:
            k = key_cache[pages].permute(1, 0, 2, 3).reshape(hkv, -1, self.head_size)[:, :seq_len]
            v = value_cache[pages].permute(1, 0, 2, 3).reshape(hkv, -1, self.head_size)[:, :seq_len]
            q = query[start : start + n].permute(1, 0, 2).unsqueeze(0)  # [1, Hq, n, D]
            o = prefix_attention(
                q,
                k.unsqueeze(0),
                v.unsqueeze(0),
                prefix_k,
                prefix_v,
                prefix_index=index[row : row + 1],
                prefix_lengths=prefix_lengths,
                causal=True,
                softmax_scale=self.scale,
                backend=BACKEND,
            )
            out[start : start + n] = o[0].permute(1, 0, 2)
        return output
