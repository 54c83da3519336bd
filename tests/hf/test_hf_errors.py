"""Bad input gets a clear error naming what is wrong, and leaves the model as it was."""

import pytest
import torch
import transformers as tf
from hf_models import batch, build

import prefixattn
from prefixattn import PrefixTuningConfig
from prefixattn.hf import get_store
from prefixattn.hf.families import UnsupportedModelError


def _prepared(family="llama"):
    model = build(family)
    prefixattn.init(model)
    model.add_adapter("a", config=PrefixTuningConfig(prefix_length=4, bottleneck_size=16))
    return model


def _snapshot(model):
    store = get_store(model)
    return (
        store.names(),
        list(store.active),
        {k: v.clone() for k, v in model.state_dict().items()},
        [p.requires_grad for p in model.parameters()],
        model.training,
    )


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(prefix_length=-3), "prefix_length: expected a positive int"),
        (dict(prefix_length=0), "prefix_length: expected a positive int"),
        (dict(prefix_length=2.5), "prefix_length: expected an int"),
        (dict(bottleneck_size=0), "bottleneck_size"),
        (dict(non_linearity="swishy"), "non_linearity: unknown activation 'swishy'"),
        (dict(dropout=1.0), "dropout"),
        (dict(leave_out=[-1]), "leave_out"),
        (dict(leave_out="0"), "leave_out"),
        (dict(flat="yes"), "flat: expected a bool"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        PrefixTuningConfig(**kwargs)


def test_config_round_trip_and_presets():
    c = PrefixTuningConfig(leave_out=[3, 1, 1], non_linearity="ReLU")
    assert c.leave_out == (1, 3) and c.non_linearity == "relu"
    assert PrefixTuningConfig.from_dict(c.to_dict()) == c
    assert c.to_dict()["architecture"] == "prefix_tuning"
    assert PrefixTuningConfig.coerce("prefix_tuning_flat").flat
    with pytest.raises(ValueError, match="unknown field"):
        PrefixTuningConfig.from_dict({"prefix_len": 3})
    defaults = PrefixTuningConfig()
    assert (
        defaults.flat,
        defaults.prefix_length,
        defaults.bottleneck_size,
        defaults.non_linearity,
        defaults.dropout,
        defaults.encoder_prefix,
        defaults.cross_prefix,
        defaults.leave_out,
        defaults.use_gating,
        defaults.shared_gating,
    ) == (False, 30, 512, "tanh", 0.0, True, True, (), False, True)


def test_config_that_does_not_fit_the_model():
    model = _prepared()
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=r"leave_out: layer id\(s\) \[5\] do not exist; LlamaForCausalLM has 2"):
        model.add_adapter("b", config=PrefixTuningConfig(leave_out=[5]))
    with pytest.raises(ValueError, match="no attention layer"):
        model.add_adapter("b", config=PrefixTuningConfig(leave_out=[0, 1]))
    with pytest.raises(TypeError, match="expected a prefixattn.PrefixTuningConfig"):
        from peft import PrefixTuningConfig as PeftConfig

        model.add_adapter("b", config=PeftConfig(num_virtual_tokens=4))
    with pytest.raises(ValueError, match="already exists"):
        model.add_adapter("a", config=PrefixTuningConfig())
    _assert_same(model, snap)


def _assert_same(model, snap):
    names, active, state, grads, training = snap
    store = get_store(model)
    assert store.names() == names and store.active == active and model.training == training
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)
    assert [p.requires_grad for p in model.parameters()] == grads


@pytest.mark.parametrize(
    "call",
    [
        lambda m, d: m.train_adapter("nope"),
        lambda m, d: m.set_active_adapters("nope"),
        lambda m, d: m.set_active_adapters(["a", "nope"]),
        lambda m, d: m.delete_adapter("nope"),
        lambda m, d: m.eject_prefix_tuning("nope"),
        lambda m, d: m.save_adapter(d, "nope"),
    ],
)
def test_unknown_adapter_names(call, tmp_path):
    model = _prepared()
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="unknown adapter 'nope'; this model has \\['a'\\]"):
        call(model, str(tmp_path))
    _assert_same(model, snap)


def test_prefix_choice_errors_are_clear_and_harmless():
    model = _prepared()
    model.add_adapter("b", config=PrefixTuningConfig(prefix_length=2, bottleneck_size=8))
    kw, _ = batch("llama")  # 3 sequences
    with torch.no_grad():
        with pytest.raises(ValueError, match="no adapter is active"):
            model(**kw, prefix_choice=["a", None, "a"])
        model.set_active_adapters(["a", "b"])
        with pytest.raises(ValueError, match="several adapters are active"):
            model(**kw)
        with pytest.raises(ValueError, match=r"indices must lie in \[-1, 1\].*got min 0, max 5"):
            model(**kw, prefix_choice=[0, 5, 1])
        with pytest.raises(ValueError, match=r"indices must lie in \[-1, 1\]"):
            model(**kw, prefix_choice=torch.tensor([0, -2, 1]))
        with pytest.raises(ValueError, match=r"prefix_choice\[1\]: unknown adapter 'zz'"):
            model(**kw, prefix_choice=["a", "zz", None])
        model.add_adapter("c", config=PrefixTuningConfig(prefix_length=2, bottleneck_size=8))
        with pytest.raises(ValueError, match=r"prefix_choice\[2\]: adapter 'c' is not active"):
            model(**kw, prefix_choice=["a", "b", "c"])
        with pytest.raises(ValueError, match="has 2 entries but the batch has 3"):
            model(**kw, prefix_choice=["a", "b"])
        with pytest.raises(ValueError, match="has 2 entries"):
            model.generate(**kw, max_new_tokens=2, prefix_choice=["a", "b"])
        # after all of that the model still works
        out = model(**kw, prefix_choice=["a", None, "b"]).logits
        store = get_store(model)
        assert store._entered == [] and store._current is None and store._choice_override is None
    assert torch.isfinite(out).all()


def test_unsupported_family_leaves_the_model_untouched():
    cfg = tf.GPTNeoXConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64
    )
    model = tf.GPTNeoXForCausalLM(cfg)
    impl = model.config._attn_implementation
    hooks = len(model._forward_pre_hooks)
    with pytest.raises(
        UnsupportedModelError,
        match="model type 'gpt_neox' .* is not supported; supported model types: bart, gpt2, llama",
    ):
        prefixattn.init(model)
    assert model.config._attn_implementation == impl and len(model._forward_pre_hooks) == hooks
    assert "prefix_tuning" not in model._modules and not hasattr(model, "train_adapter")
    with pytest.raises(ValueError, match="call prefixattn.init"):
        get_store(model)


def test_init_input_checks():
    with pytest.raises(TypeError, match="expected a transformers PreTrainedModel"):
        prefixattn.init(torch.nn.Linear(2, 2))
    model = build("llama")
    with pytest.raises(ValueError, match="backend: expected one of"):
        prefixattn.init(model, backend="fast")
    assert "prefix_tuning" not in model._modules
    assert prefixattn.init(model) is model and prefixattn.init(model) is model  # idempotent
