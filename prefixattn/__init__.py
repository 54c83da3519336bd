"""prefixattn: fused attention over a shared prefix buffer, for prefix tuning on GPUs."""

from .attention_module import PrefixAttention
from .merge import merge_prefix, token_prefix_index
from .ops import prefix_attention
from .paged import prefix_attention_paged
from .reference import prefix_attention_reference
from .tuning import PrefixTuningConfig

__version__ = "0.1.0"

__all__ = [
    "prefix_attention",
    "prefix_attention_paged",
    "merge_prefix",
    "token_prefix_index",
    "prefix_attention_reference",
    "PrefixAttention",
    "PrefixTuningConfig",
    "init",
    "load_peft_prefix",
    "save_peft_prefix",
    "load_adapters_prefix",
    "__version__",
]

# These live in prefixattn.hf, which imports transformers: load it on first use only.
_HF_EXPORTS = ("init", "load_peft_prefix", "save_peft_prefix", "load_adapters_prefix")


def __getattr__(name):
    if name in _HF_EXPORTS:
        from . import hf

        return getattr(hf, name)
    raise AttributeError(f"module 'prefixattn' has no attribute {name!r}")
