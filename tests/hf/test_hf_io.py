"""save_adapter / load_adapter: exact round trips, clear errors, and no half-loading."""

import json
import os

import pytest
import torch
from hf_models import batch, build

import prefixattn
from prefixattn import PrefixTuningConfig
from prefixattn.hf import get_store
from prefixattn.tuning import CONFIG_NAME, WEIGHTS_NAME, checkpoint_bytes


def _prepared(family="llama", seed=0, **cfg):
    model = build(family, seed=seed)
    prefixattn.init(model)
    model.add_adapter("a", config=PrefixTuningConfig(**{"prefix_length": 4, "bottleneck_size": 16, **cfg}))
    return model


def _snapshot(model):
    store = get_store(model)
    return (store.names(), list(store.active), {k: v.clone() for k, v in model.state_dict().items()})


def _assert_unchanged(model, snap):
    names, active, state = snap
    store = get_store(model)
    assert store.names() == names and store.active == active
    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], state[k]) for k in state)


@pytest.mark.parametrize("family", ["llama", "bart"])
@pytest.mark.parametrize("flat", [False, True])
def test_save_load_round_trip_is_exact(family, flat, tmp_path):
    src = _prepared(family, flat=flat, use_gating=True, leave_out=[1])
    nbytes = src.save_adapter(str(tmp_path), "a")
    assert nbytes == checkpoint_bytes(str(tmp_path)) > 0
    dst = build(family, seed=0)  # same base weights, no adapter yet
    prefixattn.init(dst)
    name = dst.load_adapter(str(tmp_path), load_as="b", set_active=True)
    assert name == "b"
    a, b = get_store(src).get("a"), get_store(dst).get("b")
    assert a.config == b.config and a.rows == b.rows
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    src.set_active_adapters("a")
    kw, _ = batch(family)
    with torch.no_grad():
        assert torch.equal(src(**kw).logits, dst(**kw).logits)


def test_metadata_is_saved_and_loaded(tmp_path):
    model = build("llama")
    prefixattn.init(model)
    model.add_adapter(
        "a",
        config=PrefixTuningConfig(prefix_length=3, bottleneck_size=8),
        metadata={"source": "test", "position_offset": 0},
    )
    model.save_adapter(str(tmp_path), "a")
    other = prefixattn.init(build("llama"))
    other.load_adapter(str(tmp_path))
    assert get_store(other).get("a").metadata == {"source": "test", "position_offset": 0}


def test_truncated_weights_raise_and_leave_the_model_unchanged(tmp_path):
    _prepared().save_adapter(str(tmp_path), "a")
    path = tmp_path / WEIGHTS_NAME
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    model = _prepared(seed=1)
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        model.load_adapter(str(tmp_path), load_as="b")
    _assert_unchanged(model, snap)


def test_checkpoint_for_another_model_is_refused(tmp_path):
    _prepared("llama").save_adapter(str(tmp_path / "llama"), "a")
    _prepared("t5").save_adapter(str(tmp_path / "t5"), "a")
    wider = build("llama", hidden_size=64)  # head_dim 16 instead of 8
    prefixattn.init(wider)
    snap = _snapshot(wider)
    with pytest.raises(ValueError, match="head_dim is 8 in the checkpoint .* but 16"):
        wider.load_adapter(str(tmp_path / "llama"))
    with pytest.raises(ValueError, match="made for T5ForConditionalGeneration"):
        wider.load_adapter(str(tmp_path / "t5"))
    _assert_unchanged(wider, snap)
    deeper = prefixattn.init(build("llama", num_hidden_layers=1))
    with pytest.raises(ValueError, match="layer"):
        deeper.load_adapter(str(tmp_path / "llama"))


def test_tampered_tensor_shape_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    _prepared().save_adapter(str(tmp_path), "a")
    tensors = load_file(str(tmp_path / WEIGHTS_NAME))
    key = next(k for k in tensors if k.endswith("wte.weight"))
    tensors[key] = tensors[key][:-1]
    save_file(tensors, str(tmp_path / WEIGHTS_NAME))
    model = _prepared(seed=1)
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=f"tensor '{key}' has shape"):
        model.load_adapter(str(tmp_path), load_as="b")
    _assert_unchanged(model, snap)


def test_bad_config_files_are_refused(tmp_path):
    model = _prepared()
    snap = _snapshot(model)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        model.load_adapter(str(tmp_path / "missing"))
    (tmp_path / "peft").mkdir()
    (tmp_path / "peft" / "adapter_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="PEFT or adapters checkpoint"):
        model.load_adapter(str(tmp_path / "peft"))
    model.save_adapter(str(tmp_path / "ok"), "a")
    cfg_path = tmp_path / "ok" / CONFIG_NAME
    cfg = json.loads(cfg_path.read_text())
    cfg["config"]["non_linearity"] = "nope"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unknown activation"):
        model.load_adapter(str(tmp_path / "ok"), load_as="b")
    cfg_path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        model.load_adapter(str(tmp_path / "ok"), load_as="b")
    os.remove(cfg_path)
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        model.load_adapter(str(tmp_path / "ok"), load_as="b")
    _assert_unchanged(model, snap)


def test_loading_over_an_existing_name_is_refused(tmp_path):
    model = _prepared()
    model.save_adapter(str(tmp_path), "a")
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="already exists"):
        model.load_adapter(str(tmp_path))
    _assert_unchanged(model, snap)
