"""Loaders check every size and metadata field against the weights file and the model before allocating or
changing anything (issue 9, defects 3 and 7)."""

import json

import pytest
import torch
from hf_models import build

import prefixattn
from prefixattn import PrefixTuningConfig
from prefixattn.hf import get_store
from prefixattn.tuning import CONFIG_NAME


@pytest.fixture
def no_large_allocation(monkeypatch):
    """Fail when a CPU tensor far larger than any tiny test checkpoint is created (factories the adapter's
    modules allocate through)."""
    limit = 10**6
    with torch.device("meta"):  # torch caches its set of factory functions on first use: before the patch
        torch.empty(1)
    for name in ("empty", "randn", "zeros", "ones"):
        real = getattr(torch, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            out = _real(*args, **kwargs)
            if not out.is_meta and out.numel() > limit:
                raise AssertionError(f"torch.{_name} allocated {out.numel()} elements while loading a checkpoint")
            return out

        monkeypatch.setattr(torch, name, spy)


def _saved(tmp_path, family="llama", **cfg):
    model = build(family)
    prefixattn.init(model)
    model.add_adapter("a", config=PrefixTuningConfig(**{"prefix_length": 4, "bottleneck_size": 16, **cfg}))
    model.save_adapter(str(tmp_path), "a")
    return model


def _edit_json(tmp_path, edit):
    path = tmp_path / CONFIG_NAME
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


@pytest.mark.parametrize(
    ("field", "value"), [("bottleneck_size", 2**22), ("prefix_length", 2**22), ("bottleneck_size", 2**40)]
)
def test_crafted_config_sizes_are_refused_before_any_allocation(tmp_path, no_large_allocation, field, value):
    _saved(tmp_path)
    _edit_json(tmp_path, lambda m: m["config"].__setitem__(field, value))
    model = prefixattn.init(build("llama"))
    with pytest.raises(ValueError, match=f"config field\\(s\\) {field}"):
        model.load_adapter(str(tmp_path))
    assert get_store(model).names() == []


@pytest.mark.parametrize("field", ["bottleneck_size", "prefix_length"])
def test_crafted_adapters_config_is_refused_before_any_allocation(tmp_path, no_large_allocation, field):
    from test_adapters_compat import write_adapters_checkpoint

    write_adapters_checkpoint(build("llama"), tmp_path, safetensors=True)
    path = tmp_path / "adapter_config.json"
    meta = json.loads(path.read_text())
    meta["config"][field] = 2**22
    path.write_text(json.dumps(meta))
    model = prefixattn.init(build("llama"))
    with pytest.raises(ValueError, match=f"config field\\(s\\) {field}"):
        prefixattn.load_adapters_prefix(model, str(tmp_path))
    assert get_store(model).names() == []


def test_listed_tensor_shapes_must_match_the_weights_file(tmp_path):
    _saved(tmp_path)
    _edit_json(tmp_path, lambda m: m["tensors"].__setitem__(next(iter(m["tensors"])), [1, 2, 3]))
    model = prefixattn.init(build("llama"))
    with pytest.raises(ValueError, match="lists tensors that the weights file does not hold"):
        model.load_adapter(str(tmp_path))


def _offset_adapter(tmp_path, family, offset):
    model = build(family)
    prefixattn.init(model)
    model.add_adapter("a", config=PrefixTuningConfig(prefix_length=4, bottleneck_size=16, flat=True))
    model.save_adapter(str(tmp_path), "a")
    _edit_json(tmp_path, lambda m: m["metadata"].__setitem__("position_offset", offset))


@pytest.mark.parametrize("family", ["gpt2", "bart"])
def test_position_offset_past_the_position_table_is_refused_at_load(tmp_path, family):
    _offset_adapter(tmp_path, family, 128)  # the tiny models have 128 positions: 0..127
    model = prefixattn.init(build(family))
    with pytest.raises(ValueError, match="position_offset'\\] = 128 .* position table holds 128 positions"):
        model.load_adapter(str(tmp_path))
    assert get_store(model).names() == []
    with pytest.raises(ValueError, match="position table holds 128"):
        model.add_adapter("b", config=PrefixTuningConfig(flat=True), metadata={"position_offset": 500})
    assert get_store(model).names() == []


@pytest.mark.parametrize("family", ["gpt2", "bart"])
def test_position_offset_inside_the_position_table_loads_and_runs(tmp_path, family):
    from hf_models import batch

    _offset_adapter(tmp_path, family, 120)  # room for 8 real tokens: the test batch has 7 (decoder: 5)
    model = prefixattn.init(build(family))
    model.load_adapter(str(tmp_path), set_active=True)
    kw, _ = batch(family)
    with torch.no_grad():
        assert torch.isfinite(model(**kw).logits).all()


def test_peft_prefix_longer_than_the_position_table_is_refused(tmp_path):
    from safetensors.torch import save_file

    p, layers, token_dim = 128, 2, 32  # GPT-2 in PEFT's frame puts real tokens at P = 128: past 0..127
    config = {
        "peft_type": "PREFIX_TUNING",
        "task_type": "CAUSAL_LM",
        "num_virtual_tokens": p,
        "num_layers": layers,
        "token_dim": token_dim,
        "num_attention_heads": 4,
        "num_transformer_submodules": 1,
    }
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    save_file(
        {"prompt_embeddings": torch.randn(p, layers * 2 * token_dim)}, str(tmp_path / "adapter_model.safetensors")
    )
    model = prefixattn.init(build("gpt2"))
    with pytest.raises(ValueError, match="load_peft_prefix: metadata\\['position_offset'\\] = 128"):
        prefixattn.load_peft_prefix(model, str(tmp_path), "p")
    assert get_store(model).names() == []
