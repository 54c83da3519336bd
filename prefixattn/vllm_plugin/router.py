"""Which prefix each request uses: `SamplingParams.extra_args["prefix"]` (HTTP: `vllm_xargs`) -> pool entry.

Two places:
- Admission, in the process that takes requests (`admit`, called from vLLM's input processing): an unknown
  or malformed name is refused there (ValueError offline, HTTP 400 on the server), naming the prefix and the
  ones that exist; and the request's prefix-cache salt is made to include its prefix (`prefixed_salt`), so a
  KV block computed under one prefix is never reused by a request with another prefix or none.
- The worker (V1 model runner): `PrefixRouter`, a logits processor used only as a side channel. vLLM calls
  its `update_state` with the persistent batch's changes (added rows with their SamplingParams, removed rows,
  moves and swaps) after it has condensed and reordered the batch and before the forward, so row i of that
  batch is sequence i of the forward. It keeps `row -> pool entry` in a persistent int32 buffer that the
  attention reads through `request_prefix_index`. It never changes logits (argmax-invariant, identity).
"""

from __future__ import annotations

import json

import torch
from torch import Tensor

from . import config as plugin_config
from . import pool as prefix_pool

EXTRA_ARGS_KEY = "prefix"
_SALT_TAG = "prefixattn"


def requested_prefix(sampling_params) -> str | None:
    """The prefix name a request asks for (None: base model). Raises ValueError for a malformed value."""
    extra = getattr(sampling_params, "extra_args", None) or {}
    name = extra.get(EXTRA_ARGS_KEY)
    if name is None:
        return None
    if not isinstance(name, str):
        raise ValueError(f'extra_args["{EXTRA_ARGS_KEY}"]: expected a prefix name (str), got {name!r}')
    return name


def admit(cfg: plugin_config.PluginConfig, sampling_params) -> str | None:
    """Check a request's prefix against the configured names at admission; returns it (None: base model)."""
    name = requested_prefix(sampling_params)
    if name is not None and name not in cfg.names:
        raise ValueError(f"unknown prefix {name!r}; this server has {cfg.names}")
    return name


def prefixed_salt(prefix: str | None, salt: str | None) -> str:
    """The cache salt of a request with this prefix and this user salt: a JSON encoding of both, so two
    requests share prefix-cache blocks only when both the prefix and the user's salt are equal."""
    return json.dumps([_SALT_TAG, prefix, salt])


# -- worker side: the row -> pool entry table ------------------------------------------------------------
_rows_host: Tensor | None = None  # int32 [max_num_seqs], CPU: what update_state edits
_rows_device: Tensor | None = None  # the same on the model device (the same tensor on the CPU)


def _allocate(max_rows: int, device: torch.device) -> None:
    global _rows_host, _rows_device
    _rows_host = torch.full((max_rows,), -1, dtype=torch.int32)
    _rows_device = _rows_host if device.type == "cpu" else _rows_host.to(device)


def request_prefix_index(num_reqs: int) -> Tensor:
    """Pool entry of each of the forward's first `num_reqs` sequences (-1 = no prefix), int32 on the model
    device; a view of one persistent buffer (its address never changes)."""
    if _rows_device is None:
        raise RuntimeError("prefixattn: the prefix router is not installed in this process (plugin inactive?)")
    if num_reqs > _rows_device.numel():
        raise ValueError(f"num_reqs: {num_reqs} exceeds the router's {_rows_device.numel()} rows (max_num_seqs)")
    return _rows_device[:num_reqs]


def _publish(num_rows: int) -> None:
    if _rows_device is not _rows_host:
        _rows_device[:num_rows].copy_(_rows_host[:num_rows])


try:
    from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality
except ImportError:  # prefixattn without vLLM: only the admission helpers above are usable
    LogitsProcessor = object  # type: ignore[assignment,misc]


class PrefixRouter(LogitsProcessor):
    """V1 logits processor that only records each persistent-batch row's pool entry (never changes logits)."""

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self.pool = prefix_pool.ensure_pool(vllm_config, device)
        _allocate(vllm_config.scheduler_config.max_num_seqs, torch.device(device))

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        requested_prefix(sampling_params)  # names are checked against the config in `admit`

    def is_argmax_invariant(self) -> bool:
        return True

    def apply(self, logits: Tensor) -> Tensor:
        return logits

    def _entry(self, params) -> int:
        name = requested_prefix(params) if params is not None else None
        if name is None or self.pool is None:
            return -1
        return self.pool.index(name)

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        rows = _rows_host
        for i in batch_update.removed:
            rows[i] = -1
        for i, params, _prompt, _output in batch_update.added:
            rows[i] = self._entry(params)
        for a, b, direction in batch_update.moved:
            if direction == MoveDirectionality.SWAP:
                rows[a], rows[b] = rows[b].clone(), rows[a].clone()
            else:
                rows[b] = rows[a]
                rows[a] = -1
        _publish(max(batch_update.batch_size, 0))
