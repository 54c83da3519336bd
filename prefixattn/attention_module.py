"""PrefixAttention: prefix attention as a plain nn.Module, for models written by hand.

It owns a trainable prefix ([Hkv, P, D] keys and values, shared by the whole batch) or uses one passed to
forward, and calls prefixattn.prefix_attention. The owned prefix is kept in float32 by default and cast
to the query dtype at each call (a tiny, differentiable copy).

    attn = PrefixAttention(num_kv_heads=2, head_dim=64, prefix_length=16)
    out = attn(q, k, v)                                   # q [B, Hq, S, 64], k/v [B, 2, S, 64]
    out = attn(q, k, v, key_padding_mask=mask)           # mask [B, S] bool, True = real token
    out = attn(q, k, v, prefix=(pool_k, pool_v), prefix_index=idx)   # a pool [N, 2, P, 64] chosen per row
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .ops import prefix_attention
from .validation import check_backend_name


class PrefixAttention(nn.Module):
    """Attention of q over [prefix; k/v] with the prefix in its own buffer (never concatenated).

    num_kv_heads, head_dim: the shape of K/V heads. prefix_length: P of the owned prefix (0: own none;
        pass one to forward instead).
    causal: default causal flag (bottom-right aligned over the sequence keys; the prefix is always visible).
    softmax_scale: default 1/sqrt(head_dim). backend: "auto" | "triton" | "cuda" | "sdpa" | "torch";
    deterministic: as prefix_attention (training on "sdpa" needs False).
    init_std: the owned prefix is initialised N(0, init_std^2).
    """

    def __init__(
        self,
        num_kv_heads: int,
        head_dim: int,
        prefix_length: int = 0,
        *,
        causal: bool = True,
        softmax_scale: float | None = None,
        backend: str = "auto",
        init_std: float = 1.0,
        dtype: torch.dtype = torch.float32,
        device=None,
        deterministic: bool = True,
    ):
        super().__init__()
        for name, value in (("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if isinstance(prefix_length, bool) or not isinstance(prefix_length, int) or prefix_length < 0:
            raise ValueError(f"prefix_length: expected an int >= 0, got {prefix_length!r}")
        check_backend_name(backend)
        self.num_kv_heads, self.head_dim, self.prefix_length = num_kv_heads, head_dim, prefix_length
        self.causal, self.softmax_scale, self.backend = causal, softmax_scale, backend
        self.deterministic = deterministic
        if prefix_length > 0:
            shape = (num_kv_heads, prefix_length, head_dim)
            self.prefix_k = nn.Parameter(torch.randn(shape, dtype=dtype, device=device) * init_std)
            self.prefix_v = nn.Parameter(torch.randn(shape, dtype=dtype, device=device) * init_std)
        else:
            self.register_parameter("prefix_k", None)
            self.register_parameter("prefix_v", None)

    def extra_repr(self) -> str:
        return (
            f"num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, prefix_length={self.prefix_length}, "
            f"causal={self.causal}, backend={self.backend!r}"
        )

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        prefix: tuple | None = None,
        prefix_index: Tensor | None = None,
        prefix_lengths: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        attn_bias: Tensor | None = None,
        causal: bool | None = None,
        dropout_p: float = 0.0,
    ) -> Tensor:
        """q [B, Hq, Sq, D], k/v [B, Hkv, Sk, D] -> [B, Hq, Sq, D].

        prefix: (prefix_k, prefix_v) to use instead of the owned one: [Hkv, P, D] shared, or a pool
        [N, Hkv, P, D] with prefix_index [B] (-1 = none) and optional prefix_lengths [N].
        """
        if prefix is not None:
            if not isinstance(prefix, (tuple, list)) or len(prefix) != 2:
                raise TypeError(f"prefix: expected a (prefix_k, prefix_v) pair, got {type(prefix).__name__}")
            pk, pv = prefix
        else:
            pk, pv = self.prefix_k, self.prefix_v
            if prefix_index is not None and pk is not None:
                raise ValueError(
                    "prefix_index: only valid with a pool passed as prefix=(pool_k, pool_v); this "
                    "module's own prefix is shared by the batch"
                )
        if pk is not None:
            pk, pv = pk.to(q.dtype), pv.to(q.dtype)
        return prefix_attention(
            q,
            k,
            v,
            pk,
            pv,
            prefix_index=prefix_index,
            prefix_lengths=prefix_lengths,
            causal=self.causal if causal is None else causal,
            key_padding_mask=key_padding_mask,
            softmax_scale=self.softmax_scale,
            backend=self.backend,
            attn_bias=attn_bias,
            dropout_p=dropout_p if self.training else 0.0,
            deterministic=self.deterministic,
        )
