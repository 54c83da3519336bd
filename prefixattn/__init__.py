"""prefixattn: fused attention over a shared prefix buffer, for prefix tuning on GPUs."""

from .ops import prefix_attention
from .paged import prefix_attention_paged
from .reference import prefix_attention_reference

__version__ = "0.1.0"

__all__ = ["prefix_attention", "prefix_attention_paged", "prefix_attention_reference", "__version__"]
