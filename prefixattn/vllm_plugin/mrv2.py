"""Which pool entry each batch row uses, on vLLM's GPU model runners.

The attention backend needs, before each forward, the pool entry of every batch row in the forward's order.
vLLM's V1 runner shows its persistent batch to logits processors before the forward, which the plugin's router
uses. Model Runner V2 (the default on CUDA in vLLM 0.32 when Triton is installed) does not: its logits processors
see the batch -> request-slot map (`idx_mapping`) only after the forward, and V1-interface processors are
rejected there. Two ways to stay correct, chosen by PREFIXATTN_VLLM_RUNNER:

- "v1" (default): the plugin sets VLLM_USE_V2_MODEL_RUNNER=0 while the config is built, and logs why. If
  something forces Model Runner V2 anyway (a feature that needs it, or the user's VLLM_USE_V2_MODEL_RUNNER=1),
  start-up fails with the reason instead of routing rows to the wrong prefix.
- "v2": wrap three methods of vLLM's Model Runner V2 class (`__init__`, `add_requests`, `prepare_attn`): a new
  request's pool entry is written to a per-slot table when it enters (resumed requests re-enter there too), and
  before each forward the step's `idx_mapping` gathers that table into a fixed per-row buffer that attention
  reads. Device ops only, no sync. It relies on those internals (vLLM 0.32.x) and is unmeasured on a GPU, hence
  opt-in.

Either way, a row never reads another request's entry: the per-row buffer is rewritten from the step's own
mapping before every forward, and padding rows are -1.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import Tensor

RUNNER_ENV = "PREFIXATTN_VLLM_RUNNER"
RUNNERS = ("v1", "v2")
_TRUE = ("1", "true", "yes", "on")

logger = logging.getLogger("prefixattn.vllm_plugin")


def requested_runner() -> str:
    mode = os.environ.get(RUNNER_ENV, "v1").strip().lower()
    if mode not in RUNNERS:
        raise ValueError(f"{RUNNER_ENV}: expected one of {', '.join(RUNNERS)}, got {mode!r}")
    return mode


def select_runner(vllm_config, environ=os.environ) -> str:
    """Pick the runner for an active plugin on CUDA (call while the config is built, before the engine's
    processes start: they inherit the environment). Returns "v1" or "v2"."""
    mode = requested_runner()
    if mode == "v2":
        return mode
    if environ.get("VLLM_USE_V2_MODEL_RUNNER", "").strip().lower() in _TRUE:
        raise ValueError(
            "prefixattn: VLLM_USE_V2_MODEL_RUNNER=1 was set, but per-request prefixes on Model Runner V2 need "
            f"prefixattn's runner wrapper: set {RUNNER_ENV}=v2 (opt-in), or unset VLLM_USE_V2_MODEL_RUNNER"
        )
    environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
    logger.warning(
        "prefixattn: using vLLM's V1 model runner (VLLM_USE_V2_MODEL_RUNNER=0): Model Runner V2 does not expose "
        "which request each batch row is before the forward; %s=v2 enables prefixattn's wrapper for it instead",
        RUNNER_ENV,
    )
    if vllm_config is not None and getattr(vllm_config, "use_v2_model_runner", False):
        raise ValueError(
            "prefixattn: this configuration forces vLLM's Model Runner V2 (a feature that needs it); per-request "
            f"prefixes there need {RUNNER_ENV}=v2"
        )
    return "v1"


def configure(vllm_config) -> None:
    """The plugin's engine-config hook calls this for an active config that would run Model Runner V2 (CUDA):
    the attention backend and the runner are chosen (gpu_backend.configure); when that falls back to the V1
    runner, the V1 router (a logits processor; Model Runner V2 would reject it) is added here."""
    from . import ROUTER_FQCN, gpu_backend

    if gpu_backend.configure(vllm_config) == "v1":
        procs = list(vllm_config.model_config.logits_processors or [])
        if ROUTER_FQCN not in procs:
            vllm_config.model_config.logits_processors = procs + [ROUTER_FQCN]


def rows_from_slots(slot_entry: Tensor, idx_mapping: Tensor, rows: Tensor) -> Tensor:
    """rows[i] = slot_entry[idx_mapping[i]] for the step's rows, -1 past them (padding) and for a negative
    (masked) slot; returns rows[:len(idx_mapping)]. rows is the fixed buffer attention reads."""
    n = idx_mapping.shape[0]
    if n > rows.shape[0]:
        raise ValueError(f"idx_mapping: {n} rows exceed the row buffer's {rows.shape[0]}")
    slots = idx_mapping.long()
    entry = slot_entry[slots.clamp(min=0)]
    rows[:n].copy_(torch.where(slots >= 0, entry, -1))
    rows[n:].fill_(-1)
    return rows[:n]


class SlotRouting:
    """Pool entry per request slot (Model Runner V2's persistent request table) and per batch row."""

    def __init__(self, max_num_reqs: int, device):
        self.slot_entry = torch.full((max_num_reqs,), -1, dtype=torch.int32, device=device)
        self.rows = torch.full((max_num_reqs,), -1, dtype=torch.int32, device=device)  # fixed address

    def admit(self, slot: int, entry: int) -> None:
        self.slot_entry[slot] = entry  # a one-element fill, stream-ordered before the step's gather

    def publish(self, idx_mapping: Tensor) -> Tensor:
        return rows_from_slots(self.slot_entry, idx_mapping, self.rows)


def entry_of(sampling_params, pool) -> int:
    """The pool entry a request asked for (extra_args["prefix"], a name), -1 for none. Unknown names were
    refused at admission; pool.index raises here too rather than guess."""
    extra = getattr(sampling_params, "extra_args", None) or {}
    name = extra.get("prefix")
    return -1 if name is None else pool.index(name)


_ROUTING: SlotRouting | None = None  # the live Model Runner V2's routing in this worker process
_INSTALLED = False


def active() -> bool:
    """True once a Model Runner V2 instance with the wrapper exists in this process."""
    return _ROUTING is not None


def row_prefix_index(num_rows: int) -> Tensor:
    if _ROUTING is None:
        raise RuntimeError("prefixattn: Model Runner V2 routing is not active in this process")
    return _ROUTING.rows[:num_rows]


def install_routing() -> None:
    """Wrap Model Runner V2's methods (idempotent; run in every process by register() when PREFIXATTN_VLLM_RUNNER
    is v2). The wrappers do nothing while the plugin is inactive (no pool)."""
    global _INSTALLED
    if _INSTALLED:
        return
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner

    from .pool import current_pool

    init, add_requests, prepare_attn = GPUModelRunner.__init__, GPUModelRunner.add_requests, GPUModelRunner.prepare_attn

    def wrapped_init(self, vllm_config, device):
        global _ROUTING
        init(self, vllm_config, device)
        _ROUTING = SlotRouting(self.max_num_reqs, device)  # before any CUDA graph capture reads the rows

    def wrapped_add_requests(self, scheduler_output):
        add_requests(self, scheduler_output)
        pool = current_pool()
        for new in scheduler_output.scheduled_new_reqs:
            slot = self.req_states.req_id_to_index[new.req_id]
            _ROUTING.admit(slot, -1 if pool is None else entry_of(new.sampling_params, pool))

    def wrapped_prepare_attn(self, input_batch):
        _ROUTING.publish(input_batch.idx_mapping)
        return prepare_attn(self, input_batch)

    GPUModelRunner.__init__ = wrapped_init
    GPUModelRunner.add_requests = wrapped_add_requests
    GPUModelRunner.prepare_attn = wrapped_prepare_attn
    _INSTALLED = True
