"""prefixattn: fused attention over a shared prefix buffer, for prefix tuning on GPUs."""

from .module import PrefixAttention
from .ops import prefix_attention
from .paged import prefix_attention_paged
from .reference import prefix_attention_reference
from .tuning import PrefixTuningConfig

__version__ = "0.1.0"

__all__ = ["prefix_attention", "prefix_attention_paged", "prefix_attention_reference", "PrefixAttention",
           "PrefixTuningConfig", "init", "__version__"]


def __getattr__(name):
    # prefixattn.init(model) lives in prefixattn.hf, which imports transformers: load it on first use only.
    if name == "init":
        from .hf import init

        return init
    raise AttributeError(f"module 'prefixattn' has no attribute {name!r}")
