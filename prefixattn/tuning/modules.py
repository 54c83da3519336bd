"""Prefix generators (the training MLP and the flat prefix) and adapters-style gates.

Every generator returns the canonical form of one adapter's prefix at one location:
a tensor [L_loc, 2, Hkv, P, D] (L_loc = layers prefixed at that location, in layer order; index 0 of the
second axis = keys, 1 = values). Parameter names follow adapters (`wte`, `control_trans.0/2`) so that its
checkpoints map onto these modules one to one; adapters' flat element order
`view(P, L_loc, 2, Hkv, D)` is the one produced here before the permute.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .config import PrefixTuningConfig


def make_activation(name: str) -> nn.Module:
    if name == "leakyrelu":
        return nn.LeakyReLU()
    from transformers.activations import get_activation

    return get_activation(name)


class PrefixMLP(nn.Module):
    """Embedding [P, hidden] -> Linear(hidden, bottleneck) -> act -> Linear(bottleneck, L*2*Hkv*D).

    One per location, shared by all its layers (adapters' PrefixTuning). It runs once per forward on the
    P embedding rows (not once per sequence, unlike adapters and PEFT, which expand to the batch first).
    """

    def __init__(self, n_layers: int, num_kv_heads: int, head_dim: int, hidden_size: int, config: PrefixTuningConfig):
        super().__init__()
        self.n_layers, self.num_kv_heads, self.head_dim = n_layers, num_kv_heads, head_dim
        self.prefix_length = config.prefix_length
        self.wte = nn.Embedding(config.prefix_length, hidden_size)
        self.control_trans = nn.Sequential(
            nn.Linear(hidden_size, config.bottleneck_size),
            make_activation(config.non_linearity),
            nn.Linear(config.bottleneck_size, n_layers * 2 * num_kv_heads * head_dim),
        )
        self.dropout = nn.Dropout(config.dropout)

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        return (self.n_layers, 2, self.num_kv_heads, self.prefix_length, self.head_dim)

    def generate(self) -> Tensor:
        """The prefix without dropout, [L, 2, Hkv, P, D] contiguous."""
        out = self.control_trans(self.wte.weight)  # [P, L*2*Hkv*D]
        out = out.view(self.prefix_length, self.n_layers, 2, self.num_kv_heads, self.head_dim)
        return out.permute(1, 2, 3, 0, 4).contiguous()

    def forward(self) -> Tensor:
        return self.dropout(self.generate())


class FlatPrefix(nn.Module):
    """The prefix as a parameter trained directly (flat=True, or the result of eject)."""

    def __init__(
        self, n_layers: int, num_kv_heads: int, head_dim: int, config: PrefixTuningConfig, init: Tensor | None = None
    ):
        super().__init__()
        shape = (n_layers, 2, num_kv_heads, config.prefix_length, head_dim)
        if init is not None:
            if tuple(init.shape) != shape:
                raise ValueError(f"flat prefix: expected shape {list(shape)}, got {list(init.shape)}")
            data = init.detach().clone()
        else:
            data = torch.randn(shape)  # adapters' FlatPrefixTuning initialisation: N(0, 1)
        self.prefix = nn.Parameter(data)
        self.dropout = nn.Dropout(config.dropout)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.prefix.shape)

    def generate(self) -> Tensor:
        return self.prefix

    def forward(self) -> Tensor:
        return self.dropout(self.prefix)


class PrefixGate(nn.Module):
    """adapters' gate: Linear(hidden, 1 or 2), sigmoid, mean over the sequence -> [B, 1|2].

    Column 0 scales the prefix keys and the last column the values (one shared column when shared_gating).
    As in adapters the mean runs over the tokens of the current call (all of them, padding included), so
    during cached decoding it sees only the new tokens.
    """

    def __init__(self, hidden_size: int, shared: bool):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1 if shared else 2)
        nn.init.normal_(self.linear.weight, std=0.02)  # adapters' gate init

    def forward(self, hidden_states: Tensor) -> Tensor:
        gate = torch.sigmoid(self.linear(hidden_states.to(self.linear.weight.dtype)))
        return gate.mean(dim=1)
