"""transformers integration: the "prefixattn" attention implementation, init(model), per-family facts."""

from .attention import CONTEXT_KWARG, NAME, LightMask, prefixattn_attention, prefixattn_mask, register
from .families import SUPPORTED_MODEL_TYPES, Site, UnsupportedModelError, find_sites
from .install import get_flat_prefix, get_store, init, set_flat_prefix

__all__ = [
    "init", "get_store", "get_flat_prefix", "set_flat_prefix", "register", "NAME", "CONTEXT_KWARG", "LightMask", "prefixattn_attention",
    "prefixattn_mask", "find_sites", "Site", "SUPPORTED_MODEL_TYPES", "UnsupportedModelError",
]
