"""transformers integration: the "prefixattn" attention implementation, init(model), per-family facts, and
importers / exporters for PEFT and adapters (AdapterHub) prefix-tuning checkpoints."""

from .adapters_compat import load_adapters_prefix
from .attention import CONTEXT_KWARG, NAME, LightMask, prefixattn_attention, prefixattn_mask, register
from .families import SUPPORTED_MODEL_TYPES, Site, UnsupportedModelError, find_sites
from .gathered import save_full_adapter
from .install import get_flat_prefix, get_store, init, set_flat_prefix
from .peft_compat import load_peft_prefix, save_peft_prefix
from .trainer import adapter_checkpoints

__all__ = [
    "init",
    "load_peft_prefix",
    "save_peft_prefix",
    "load_adapters_prefix",
    "adapter_checkpoints",
    "save_full_adapter",
    "get_store",
    "get_flat_prefix",
    "set_flat_prefix",
    "register",
    "NAME",
    "CONTEXT_KWARG",
    "LightMask",
    "prefixattn_attention",
    "prefixattn_mask",
    "find_sites",
    "Site",
    "SUPPORTED_MODEL_TYPES",
    "UnsupportedModelError",
]
