"""Prefix tuning, independent of any model library: config, generators (MLP / flat), adapters, store, save/load."""

from .adapter import CROSS, ENCODER, LOCATIONS, SELF, LocationSpec, ModelGeometry, PrefixAdapter, plan_locations
from .config import PrefixTuningConfig
from .io import CONFIG_NAME, WEIGHTS_NAME, checkpoint_bytes, read_adapter, save_adapter
from .modules import FlatPrefix, PrefixGate, PrefixMLP
from .store import ForwardContext, LayerPrefix, LocationPrefix, PrefixStore

__all__ = [
    "PrefixTuningConfig",
    "PrefixAdapter",
    "PrefixStore",
    "ForwardContext",
    "LocationPrefix",
    "LayerPrefix",
    "LocationSpec",
    "ModelGeometry",
    "plan_locations",
    "PrefixMLP",
    "FlatPrefix",
    "PrefixGate",
    "save_adapter",
    "read_adapter",
    "checkpoint_bytes",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "SELF",
    "ENCODER",
    "CROSS",
    "LOCATIONS",
]
