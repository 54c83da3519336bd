"""PrefixTuningConfig: the fields and defaults of AdapterHub `adapters`' PrefixTuningConfig, validated.

Field meanings follow adapters (docs/design.md, "Other prefix-tuning libraries"). Decoder self-attention always
gets a prefix; `encoder_prefix` and `cross_prefix` switch the encoder self-attention and the decoder cross-attention of
encoder-decoder models. `leave_out` holds global layer ids: for encoder-decoder models the encoder layers
come first (0..Le-1) and the decoder layers follow (Le..Le+Ld-1), as adapters numbers them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

ARCHITECTURE = "prefix_tuning"


def known_activations() -> tuple[str, ...]:
    """Activation names accepted for `non_linearity` (transformers' ACT2CLS plus adapters' "leakyrelu")."""
    from transformers.activations import ACT2CLS

    return tuple(sorted(set(ACT2CLS) | {"leakyrelu"}))


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"PrefixTuningConfig.{name}: expected a bool, got {value!r} ({type(value).__name__})")


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"PrefixTuningConfig.{name}: expected an int, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"PrefixTuningConfig.{name}: expected a positive int (at least 1), got {value}")


@dataclass(frozen=True)
class PrefixTuningConfig:
    """Configuration of one prefix-tuning adapter (adapters-compatible fields and defaults).

    flat: train the prefix tensor directly (True) or through the embedding + MLP reparametrisation (False).
    prefix_length: number of prefix tokens P per layer.
    bottleneck_size: hidden width of the MLP (flat=False only).
    non_linearity: MLP activation, a transformers activation name (e.g. "tanh", "relu", "gelu") or "leakyrelu".
    dropout: dropout on the generated prefix K/V (training only).
    encoder_prefix / cross_prefix: prefixes for encoder self-attention / decoder cross-attention of
        encoder-decoder models (decoder self-attention always gets one).
    leave_out: global layer ids that get no prefix.
    use_gating / shared_gating: adapters' (UniPELT) per-layer gate scaling the prefix K and V, with one
        shared gate (True) or separate K and V gates (False).
    """

    flat: bool = False
    prefix_length: int = 30
    bottleneck_size: int = 512
    non_linearity: str = "tanh"
    dropout: float = 0.0
    encoder_prefix: bool = True
    cross_prefix: bool = True
    leave_out: tuple = field(default_factory=tuple)
    use_gating: bool = False
    shared_gating: bool = True

    def __post_init__(self):
        for name in ("flat", "encoder_prefix", "cross_prefix", "use_gating", "shared_gating"):
            _check_bool(name, getattr(self, name))
        _check_positive_int("prefix_length", self.prefix_length)
        _check_positive_int("bottleneck_size", self.bottleneck_size)
        if not isinstance(self.non_linearity, str) or self.non_linearity.lower() not in known_activations():
            raise ValueError(
                f"PrefixTuningConfig.non_linearity: unknown activation {self.non_linearity!r}; "
                f"expected one of {', '.join(known_activations())}"
            )
        if (
            isinstance(self.dropout, bool)
            or not isinstance(self.dropout, (int, float))
            or not 0.0 <= float(self.dropout) < 1.0
        ):
            raise ValueError(f"PrefixTuningConfig.dropout: expected a float in [0, 1), got {self.dropout!r}")
        leave_out = self.leave_out
        if leave_out is None:
            leave_out = ()
        if isinstance(leave_out, (str, bytes)) or not hasattr(leave_out, "__iter__"):
            raise TypeError(f"PrefixTuningConfig.leave_out: expected a list of layer ids, got {leave_out!r}")
        leave_out = tuple(leave_out)
        for layer in leave_out:
            if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
                raise ValueError(
                    f"PrefixTuningConfig.leave_out: expected non-negative int layer ids, got {list(leave_out)!r}"
                )
        # Frozen dataclass: normalise through object.__setattr__ (sorted, no duplicates, hashable).
        object.__setattr__(self, "leave_out", tuple(sorted(set(leave_out))))
        object.__setattr__(self, "dropout", float(self.dropout))
        object.__setattr__(self, "non_linearity", self.non_linearity.lower())

    @property
    def architecture(self) -> str:
        return ARCHITECTURE

    def replace(self, **changes) -> PrefixTuningConfig:
        """A copy with some fields changed (the config itself is immutable, as in adapters)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        out = {"architecture": ARCHITECTURE}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if f.name == "leave_out" else value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PrefixTuningConfig:
        if not isinstance(data, Mapping):
            raise TypeError(f"PrefixTuningConfig.from_dict: expected a mapping, got {type(data).__name__}")
        data = dict(data)
        arch = data.pop("architecture", ARCHITECTURE)
        if arch != ARCHITECTURE:
            raise ValueError(f"PrefixTuningConfig: expected architecture {ARCHITECTURE!r}, got {arch!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"PrefixTuningConfig: unknown field(s) {unknown}; known fields: {sorted(names)}")
        return cls(**data)

    @classmethod
    def coerce(cls, config) -> PrefixTuningConfig:
        """Accept a PrefixTuningConfig, a dict of fields, None (defaults), or adapters' preset names."""
        if config is None:
            return cls()
        if isinstance(config, cls):
            return config
        if isinstance(config, str):
            presets = {"prefix_tuning": cls(), "prefix_tuning_flat": cls(flat=True)}
            if config not in presets:
                raise ValueError(f"config: unknown preset {config!r}; expected one of {sorted(presets)}")
            return presets[config]
        if isinstance(config, Mapping):
            return cls.from_dict(config)
        raise TypeError(
            f"config: expected a prefixattn.PrefixTuningConfig, a dict of its fields or a preset name, got "
            f"{type(config).__module__}.{type(config).__name__}"
        )
