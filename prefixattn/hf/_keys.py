"""Names under which the transformers integration keeps its state on attention modules and in layer kwargs.

A module of their own so that attention.py, install.py and positions.py can share them without importing
one another.
"""

# The forward context travels to every attention call through the layer kwargs, which transformers
# forwards down to the attention function and captures for gradient-checkpointing recomputes.
CONTEXT_KWARG = "prefixattn_context"
SITE_ATTR = "_prefixattn_site"  # (location, global layer id), set on each prefixable attention module
STORE_ATTR = "_prefixattn_store"
HIDDEN_ATTR = "_prefixattn_hidden"  # the attention input, captured only while a gated adapter exists
T5_BIAS_ATTR = (
    "_prefixattn_t5_bias_source"  # on T5 decoder self-attention: its stack's layer-0 attention (positions.py)
)
