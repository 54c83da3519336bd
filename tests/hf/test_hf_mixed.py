"""Several prefixes at once: a per-sequence choice in one forward / generate equals running each sequence
alone with its adapter active (different prefix lengths, left-out layers, no prefix, gating)."""

import pytest
import torch
from hf_models import batch, build

import prefixattn
from prefixattn import PrefixTuningConfig

TOL = 1e-5


def _prepared(family, gating=False):
    model = build(family)
    prefixattn.init(model)
    model.add_adapter("a", config=PrefixTuningConfig(prefix_length=4, bottleneck_size=16))
    model.add_adapter(
        "b", config=PrefixTuningConfig(prefix_length=6, bottleneck_size=16, leave_out=[1], use_gating=gating, flat=True)
    )
    return model


def _rows(kw, i):
    return {k: v[i : i + 1] for k, v in kw.items()}


CHOICE = ["a", None, "b"]


@pytest.mark.parametrize("family,gating", [("llama", False), ("t5", False), ("llama", True)])
def test_mixed_forward_equals_each_sequence_alone(family, gating):
    model = _prepared(family, gating)
    kw, real = batch(family)
    model.set_active_adapters(["a", "b"])
    with torch.no_grad():
        mixed = model(**kw, prefix_choice=CHOICE).logits
        as_tensor = model(**kw, prefix_choice=torch.tensor([0, -1, 1])).logits
        with model.prefix_choice(CHOICE):
            in_context = model(**kw).logits
        alone = []
        for i, name in enumerate(CHOICE):
            model.set_active_adapters(name)
            alone.append(model(**_rows(kw, i)).logits)
    alone = torch.cat(alone)
    assert (mixed - alone)[real].abs().max().item() <= TOL
    assert torch.equal(mixed, as_tensor) and torch.equal(mixed, in_context)
    # and the three rows really differ in what they get
    model.set_active_adapters(None)
    with torch.no_grad():
        plain = model(**kw).logits
    assert (mixed - plain)[0][real[0]].abs().max() > 1e-3 and (mixed - plain)[2][real[2]].abs().max() > 1e-3


@pytest.mark.parametrize("family", ["llama", "t5"])
@pytest.mark.parametrize("beams", [1, 2])
def test_mixed_generate_equals_each_sequence_alone(family, beams):
    model = _prepared(family)
    kw, _ = batch(family, b=3, s=6)
    kw = {k: kw[k] for k in ("input_ids", "attention_mask")}
    args = dict(max_new_tokens=4, do_sample=False, num_beams=beams, num_return_sequences=beams)
    model.set_active_adapters(["a", "b"])
    with torch.no_grad():
        mixed = model.generate(**kw, prefix_choice=CHOICE, **args)
        alone = []
        for i, name in enumerate(CHOICE):
            model.set_active_adapters(name)
            alone.append(model.generate(**_rows(kw, i), **args))
    assert torch.equal(mixed, torch.cat(alone))
    assert get_choice_override(model) is None


def get_choice_override(model):
    return prefixattn.hf.get_store(model)._choice_override


def test_gradients_reach_only_the_chosen_adapters():
    model = _prepared("llama")
    model.train_adapter(["a", "b"])
    kw, _ = batch("llama")
    labels = kw["input_ids"].masked_fill(kw["attention_mask"] == 0, -100)
    model(**kw, labels=labels, prefix_choice=["a", None, "a"]).loss.backward()
    store = prefixattn.hf.get_store(model)
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in store.get("a").parameters())
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in store.get("b").parameters())
