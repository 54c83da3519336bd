"""Adapters whose parameters are sharded (FSDP2's `fully_shard` turns them into DTensor shards): full copies,
and saving them from one process.

Gathering a DTensor is a collective, so under FSDP2 every rank must make the same calls; without sharding
these functions only copy the tensors to the CPU.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..tuning import io as tuning_io
from ..tuning.adapter import PrefixAdapter

try:  # torch builds without distributed support have no DTensor, so nothing can be sharded there
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    DTensor = ()


def full_state(adapter: PrefixAdapter) -> dict[str, Tensor]:
    """The adapter's tensors, whole, as plain CPU copies (DTensor shards are all-gathered: every rank calls)."""
    state = {}
    for key, value in adapter.state_dict().items():
        if isinstance(value, DTensor):
            value = value.full_tensor()
        state[key] = value.detach().to("cpu", copy=True)
    return state


def full_copy(adapter: PrefixAdapter, state: dict[str, Tensor] | None = None) -> PrefixAdapter:
    """A plain CPU PrefixAdapter with the same name, config, metadata and tensors (`state`, else full_state)."""
    copy = PrefixAdapter(adapter.name, adapter.config, adapter.geometry, metadata=adapter.metadata)
    with torch.no_grad():
        copy.load_state_dict(full_state(adapter) if state is None else state, strict=True)
    return copy


def is_writer() -> bool:
    """True in the process that writes files: rank 0, or the only process."""
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def save_full_adapter(model, save_directory: str, adapter_name: str, *, is_main_process: bool | None = None) -> int:
    """save_adapter for a model whose adapter may be sharded (FSDP2): every rank calls it, the full tensors are
    gathered, and only the main process (default: rank 0) writes. Returns the checkpoint size in bytes on the
    writer and 0 elsewhere. The files are those of model.save_adapter, so load_adapter reads them anywhere."""
    from .install import get_store

    copy = full_copy(get_store(model).get(adapter_name))
    if not (is_writer() if is_main_process is None else is_main_process):
        return 0
    return tuning_io.save_adapter(copy, save_directory)
