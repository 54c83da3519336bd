"""The room an adapter's position offset leaves in a model's learned position table.

An adapter with metadata["position_offset"] = o (PEFT's position frame, prefixattn.hf.positions) starts real
tokens at position o. In a model with a learned position table (GPT-2's wpe, BART's decoder positions) an
offset at or past the table's end makes every forward index outside it (on a GPU, a device-side assert), so
such an adapter is refused when it is added, loaded or imported, before the model changes.
"""

from __future__ import annotations

from .positions import METADATA_KEY, position_module


def position_table_size(model) -> int | None:
    """How many positions the (decoder) position table of `model` holds, or None without such a table."""
    module = position_module(model)
    size = getattr(module, "num_embeddings", None)
    if not isinstance(size, int):
        return None
    return size - int(getattr(module, "offset", 0))  # BART keeps 2 rows before position 0


def check_offset_fits(model, metadata, who: str) -> None:
    """Refuse a position_offset that leaves no position of the table for a real token."""
    offset = (metadata or {}).get(METADATA_KEY)
    size = position_table_size(model)
    if not isinstance(offset, int) or isinstance(offset, bool) or size is None or offset < size:
        return
    raise ValueError(
        f"{who}: metadata[{METADATA_KEY!r}] = {offset} starts real tokens at position {offset}, but "
        f"{type(model).__name__}'s position table holds {size} positions (0..{size - 1}, "
        f"max_position_embeddings); every forward would index past it. The adapter was made for a model with a "
        f"longer position table"
    )
