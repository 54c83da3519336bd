"""The prefix a forward uses always reflects the adapter's current weights (issue 9, defect 4).

In-place writes through `.data` (EMA, weight averaging, custom loaders) and replacing `.data` bump no version
counter; a no-grad prefix cache keyed on version counters kept returning the old logits after them.
"""

import pytest
import torch
from hf_models import batch, build

import prefixattn
from prefixattn import PrefixTuningConfig
from prefixattn.hf import get_store


def _model(flat, seed=0):
    model = build("llama", seed=seed)
    prefixattn.init(model)
    config = PrefixTuningConfig(prefix_length=4, bottleneck_size=16, flat=flat)
    model.add_adapter("a", config=config, set_active=True)
    return model.eval()


def _logits(model):
    kw, _ = batch("llama")
    with torch.no_grad():
        return model(**kw).logits


def _edit_in_place(adapter):
    for p in adapter.parameters():
        p.data.mul_(0.5).add_(0.25)  # an EMA-style update: no version counter moves


def _replace_data(adapter):
    for p in adapter.parameters():
        p.data = p.data * 0.5 + 0.25  # new storage, possibly at the address the old one had


@pytest.mark.parametrize("flat", [False, True], ids=["mlp", "flat"])
@pytest.mark.parametrize("edit", [_edit_in_place, _replace_data], ids=["data_inplace", "data_replaced"])
def test_data_edits_of_adapter_weights_change_the_logits(flat, edit):
    model = _model(flat)
    before = _logits(model)
    adapter = get_store(model).get("a")
    edit(adapter)
    after = _logits(model)
    fresh = _model(flat, seed=0)  # the same base model, given the edited adapter weights
    get_store(fresh).get("a").load_state_dict(adapter.state_dict())
    expected = _logits(fresh)
    assert not torch.allclose(expected, before)  # the edit matters, so a stale prefix would be seen
    assert torch.equal(after, expected)
