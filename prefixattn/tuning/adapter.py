"""One prefix-tuning adapter: its generators per location, its gates, and the model geometry it fits.

Model-agnostic: the geometry (which locations exist, which layers they have, KV heads, head dim, hidden
size) comes from prefixattn.hf.families for transformers models, or can be written by hand.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .config import PrefixTuningConfig
from .modules import FlatPrefix, PrefixGate, PrefixMLP

# Location keys, named as in adapters so its checkpoints map without renaming.
SELF = "self_prefix"  # decoder (or decoder-only) self-attention: always prefixed
ENCODER = "encoder_prefix"  # encoder self-attention of encoder-decoder models
CROSS = "cross_prefix"  # decoder cross-attention of encoder-decoder models
LOCATIONS = (ENCODER, SELF, CROSS)


@dataclass(frozen=True)
class LocationSpec:
    """The attention layers at one location and the shape their prefix must have."""

    name: str
    layers: tuple  # global layer ids, in order
    num_kv_heads: int
    head_dim: int
    hidden_size: int

    def to_dict(self) -> dict:
        return {
            "layers": list(self.layers),
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_size": self.hidden_size,
        }


@dataclass(frozen=True)
class ModelGeometry:
    """Where prefixes can go in one model: its locations and the total count of global layer ids."""

    model_type: str
    model_class: str
    num_layers: int  # global layer ids are 0..num_layers-1 (encoder first for encoder-decoder models)
    locations: Mapping[str, LocationSpec] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "model_type": self.model_type,
            "model_class": self.model_class,
            "num_layers": self.num_layers,
            "locations": {k: v.to_dict() for k, v in self.locations.items()},
        }


def plan_locations(config: PrefixTuningConfig, geometry: ModelGeometry) -> dict[str, tuple]:
    """Rows of each prefixed location for this config: {location: global layer ids}. Raises if it does not fit."""
    bad = [layer for layer in config.leave_out if layer >= geometry.num_layers]
    if bad:
        raise ValueError(
            f"config.leave_out: layer id(s) {bad} do not exist; {geometry.model_class} has {geometry.num_layers} "
            f"layers with ids 0..{geometry.num_layers - 1}"
            + (" (encoder layers first, then decoder layers)" if ENCODER in geometry.locations else "")
        )
    wanted = {SELF: True, ENCODER: config.encoder_prefix, CROSS: config.cross_prefix}
    plan = {}
    for name, spec in geometry.locations.items():
        if not wanted.get(name, False):
            continue
        rows = tuple(layer for layer in spec.layers if layer not in config.leave_out)
        if rows:
            plan[name] = rows
    if not plan:
        raise ValueError(
            f"config: no attention layer of {geometry.model_class} would get a prefix (leave_out="
            f"{list(config.leave_out)}, encoder_prefix={config.encoder_prefix}, cross_prefix={config.cross_prefix})"
        )
    return plan


def _gate_key(location: str, layer: int) -> str:
    return f"{location}_{layer}"


class PrefixAdapter(nn.Module):
    """A named prefix: one generator per prefixed location (MLP or flat), optional gates per layer.

    Canonical prefix form at a location: [L_loc, 2, Hkv, P, D], rows = `self.rows[location]` (global layer ids
    in order, leave_out skipped), axis 1: 0 = keys, 1 = values. `metadata` is a free dict saved in the JSON
    next to the checkpoint (e.g. where an imported prefix came from).
    """

    def __init__(self, name: str, config: PrefixTuningConfig, geometry: ModelGeometry, metadata: dict | None = None):
        super().__init__()
        self.name = name
        self.config = config
        self.geometry = geometry
        self.rows = plan_locations(config, geometry)
        self.metadata = dict(metadata or {})
        self.generators = nn.ModuleDict()
        for loc, rows in self.rows.items():
            spec = geometry.locations[loc]
            if config.flat:
                self.generators[loc] = FlatPrefix(len(rows), spec.num_kv_heads, spec.head_dim, config)
            else:
                self.generators[loc] = PrefixMLP(len(rows), spec.num_kv_heads, spec.head_dim, spec.hidden_size, config)
        self.gates = nn.ModuleDict()
        if config.use_gating:
            for loc, rows in self.rows.items():
                hidden = geometry.locations[loc].hidden_size
                for layer in rows:
                    self.gates[_gate_key(loc, layer)] = PrefixGate(hidden, config.shared_gating)
        self.row_of = {loc: {layer: i for i, layer in enumerate(rows)} for loc, rows in self.rows.items()}

    # -- shapes -------------------------------------------------------------------------------------------
    def prefix_shape(self, location: str) -> tuple[int, int, int, int, int]:
        spec = self.geometry.locations[location]
        return (len(self.rows[location]), 2, spec.num_kv_heads, self.config.prefix_length, spec.head_dim)

    def gate(self, location: str, layer: int) -> PrefixGate | None:
        key = _gate_key(location, layer)
        return self.gates[key] if key in self.gates else None

    # -- generation ---------------------------------------------------------------------------------------
    def generate(self, location: str) -> Tensor:
        """This location's prefix for one forward (MLP run once, dropout in training mode)."""
        return self.generators[location]()

    @torch.no_grad()
    def flat_prefix(self) -> dict[str, Tensor]:
        """{location: [L_loc, 2, Hkv, P, D]} as used at inference (no dropout), detached copies."""
        return {loc: gen.generate().detach().clone() for loc, gen in self.generators.items()}

    def is_flat(self) -> bool:
        return all(isinstance(g, FlatPrefix) for g in self.generators.values())

    # -- mutation (validate everything, then change) ------------------------------------------------------
    def check_flat_prefix(self, prefixes: Mapping[str, Tensor]) -> None:
        missing = sorted(set(self.rows) - set(prefixes))
        extra = sorted(set(prefixes) - set(self.rows))
        if missing or extra:
            raise ValueError(
                f"prefixes for adapter {self.name!r}: expected exactly the locations {sorted(self.rows)}, got "
                f"{sorted(prefixes)}"
                + (f" (missing {missing})" if missing else "")
                + (f" (unexpected {extra})" if extra else "")
            )
        for loc, t in prefixes.items():
            if not isinstance(t, Tensor):
                raise TypeError(f"prefixes[{loc!r}]: expected a torch.Tensor, got {type(t).__name__}")
            if not t.is_floating_point():
                raise TypeError(f"prefixes[{loc!r}]: expected a floating tensor, got {t.dtype}")
            want = self.prefix_shape(loc)
            if tuple(t.shape) != want:
                raise ValueError(
                    f"prefixes[{loc!r}]: expected shape {list(want)} = [layers {list(self.rows[loc])}, 2 (K, V), "
                    f"kv heads, prefix length, head dim], got {list(t.shape)}"
                )

    def set_flat_prefix(self, prefixes: Mapping[str, Tensor]) -> None:
        """Replace the generators by flat prefixes holding these tensors (the MLP, if any, is dropped)."""
        self.check_flat_prefix(prefixes)
        ref = next(iter(self.generators.parameters()), None)
        requires_grad = ref.requires_grad if ref is not None else True
        new = {}
        for loc, t in prefixes.items():
            spec = self.geometry.locations[loc]
            gen = FlatPrefix(len(self.rows[loc]), spec.num_kv_heads, spec.head_dim, self.config, init=t.float())
            if ref is not None:
                gen = gen.to(device=ref.device, dtype=ref.dtype)
            gen.train(self.training)
            gen.prefix.requires_grad_(requires_grad)
            new[loc] = gen
        for loc, gen in new.items():
            self.generators[loc] = gen
        self.config = self.config.replace(flat=True)

    def eject(self) -> None:
        """Run each MLP once, keep its output as the flat prefix, drop the MLP (adapters' eject_prefix_tuning)."""
        if self.is_flat():
            return
        self.set_flat_prefix(self.flat_prefix())
