"""The vLLM GPU path's pure parts (no vLLM needed): Model Runner V2 row routing, runner selection, and which
layer settings the FlashAttention-based backend refuses."""

from __future__ import annotations

import types

import pytest
import torch

from prefixattn.vllm_plugin import gpu_backend, mrv2


def test_rows_follow_the_steps_idx_mapping():
    slot_entry = torch.tensor([3, -1, 0, 2, 1], dtype=torch.int32)  # request slot -> pool entry
    rows = torch.full((5,), 7, dtype=torch.int32)
    got = mrv2.rows_from_slots(slot_entry, torch.tensor([4, 0, 2]), rows)
    assert got.tolist() == [1, 3, 0]
    assert rows.tolist() == [1, 3, 0, -1, -1]  # padding rows never keep a previous step's entry
    assert got.data_ptr() == rows.data_ptr()  # attention reads the fixed buffer itself


def test_masked_slots_get_no_prefix_and_overflow_is_refused():
    slot_entry = torch.tensor([5, 6], dtype=torch.int32)
    rows = torch.zeros(3, dtype=torch.int32)
    assert mrv2.rows_from_slots(slot_entry, torch.tensor([1, -1]), rows).tolist() == [6, -1]
    with pytest.raises(ValueError, match="idx_mapping"):
        mrv2.rows_from_slots(slot_entry, torch.tensor([0, 1, 0, 1]), rows)


def test_slot_routing_across_steps_with_slot_reuse():
    """Requests come and go; a reused slot takes its new occupant's entry, and each step's rows are exactly the
    entries of the requests in that step, in the step's order."""
    routing = mrv2.SlotRouting(max_num_reqs=4, device="cpu")
    routing.admit(0, 2)  # request A
    routing.admit(1, -1)  # request B, no prefix
    assert routing.publish(torch.tensor([1, 0])).tolist() == [-1, 2]
    routing.admit(0, 1)  # A finished; C reuses slot 0
    routing.admit(3, 0)  # D
    assert routing.publish(torch.tensor([3, 0, 1])).tolist() == [0, 1, -1]
    assert routing.rows.tolist() == [0, 1, -1, -1]


class FakePool:
    names = ["sql", "chat"]

    def index(self, name):
        if name not in self.names:
            raise ValueError(f"unknown prefix {name!r}; loaded: {self.names}")
        return self.names.index(name)


def test_entry_of_reads_extra_args():
    pool = FakePool()
    assert mrv2.entry_of(types.SimpleNamespace(extra_args={"prefix": "chat"}), pool) == 1
    assert mrv2.entry_of(types.SimpleNamespace(extra_args=None), pool) == -1
    assert mrv2.entry_of(types.SimpleNamespace(extra_args={"other": 1}), pool) == -1
    with pytest.raises(ValueError, match="nope"):
        mrv2.entry_of(types.SimpleNamespace(extra_args={"prefix": "nope"}), pool)


def test_select_runner_defaults_to_v1_and_says_why(monkeypatch, caplog):
    monkeypatch.delenv(mrv2.RUNNER_ENV, raising=False)
    env = {}
    with caplog.at_level("WARNING", logger="prefixattn.vllm_plugin"):
        assert mrv2.select_runner(types.SimpleNamespace(use_v2_model_runner=False), environ=env) == "v1"
    assert env["VLLM_USE_V2_MODEL_RUNNER"] == "0"
    assert "V1 model runner" in caplog.text


def test_select_runner_refuses_a_forced_v2(monkeypatch):
    monkeypatch.delenv(mrv2.RUNNER_ENV, raising=False)
    with pytest.raises(ValueError, match=mrv2.RUNNER_ENV):
        mrv2.select_runner(None, environ={"VLLM_USE_V2_MODEL_RUNNER": "1"})
    with pytest.raises(ValueError, match="forces"):  # another feature kept V2 on despite the variable
        mrv2.select_runner(types.SimpleNamespace(use_v2_model_runner=True), environ={})


def test_select_runner_v2_opt_in(monkeypatch):
    monkeypatch.setenv(mrv2.RUNNER_ENV, "v2")
    env = {"VLLM_USE_V2_MODEL_RUNNER": "1"}
    assert mrv2.select_runner(types.SimpleNamespace(use_v2_model_runner=True), environ=env) == "v2"
    assert env == {"VLLM_USE_V2_MODEL_RUNNER": "1"}  # untouched
    monkeypatch.setenv(mrv2.RUNNER_ENV, "v3")
    with pytest.raises(ValueError, match=mrv2.RUNNER_ENV):
        mrv2.requested_runner()


def test_row_prefix_index_refuses_without_a_live_v2_runner():
    assert not mrv2.active()
    with pytest.raises(RuntimeError, match="not active"):
        mrv2.row_prefix_index(3)


PLAIN = dict(
    attn_type="decoder",
    alibi=False,
    sliding_window=False,
    logits_soft_cap=0,
    sinks=False,
    kv_cache_dtype="auto",
    dcp_world_size=1,
)


def test_plain_decoder_layers_are_supported():
    assert gpu_backend.unsupported_reasons(**PLAIN) == []
    assert gpu_backend.unsupported_reasons(**{**PLAIN, "kv_cache_dtype": "bfloat16"}) == []


@pytest.mark.parametrize(
    "change,words",
    [
        (dict(attn_type="encoder_only"), "encoder_only"),
        (dict(alibi=True), "ALiBi"),
        (dict(sliding_window=True), "sliding-window"),
        (dict(logits_soft_cap=30.0), "soft-capping"),
        (dict(sinks=True), "sinks"),
        (dict(kv_cache_dtype="fp8"), "quantised"),
        (dict(dcp_world_size=2), "context parallelism"),
    ],
)
def test_unsupported_layer_settings_are_named(change, words):
    reasons = gpu_backend.unsupported_reasons(**{**PLAIN, **change})
    assert len(reasons) == 1 and words in reasons[0]


def test_pool_heads_must_be_this_ranks_slice():
    gpu_backend.check_pool_heads(4, 64, 4, 64)
    with pytest.raises(ValueError, match="tensor parallelism"):  # a TP=2 rank given the whole pool
        gpu_backend.check_pool_heads(8, 64, 4, 64)


def test_paged_decode_switch_is_off_by_default(monkeypatch):
    monkeypatch.delenv(gpu_backend.PAGED_DECODE_ENV, raising=False)
    assert not gpu_backend.paged_decode_enabled()
    monkeypatch.setenv(gpu_backend.PAGED_DECODE_ENV, "1")
    assert gpu_backend.paged_decode_enabled()


def test_importing_the_gpu_modules_needs_no_vllm():
    """The main suite imports these modules; vLLM is imported only when vLLM resolves the backend class."""
    import subprocess
    import sys

    code = (
        "import sys; import prefixattn.vllm_plugin.gpu_backend, prefixattn.vllm_plugin.mrv2; "
        "sys.exit(1 if 'vllm' in sys.modules else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
