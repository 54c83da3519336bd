"""The importer-facing API: get_flat_prefix / set_flat_prefix in the canonical [L_loc, 2, Hkv, P, D] form."""

import pytest
import torch
from hf_models import batch, build
from hf_oracle import ORACLE, attach_prefixes, set_impl

import prefixattn
from prefixattn import PrefixTuningConfig
from prefixattn.hf import get_flat_prefix, get_store, set_flat_prefix


def test_set_flat_prefix_drives_the_model_exactly():
    model = prefixattn.init(build("t5"))
    model.add_adapter(
        "imp",
        config=PrefixTuningConfig(flat=True, prefix_length=3, leave_out=[0, 3]),
        set_active=True,
        metadata={"source": "unit test"},
    )
    adapter = get_store(model).get("imp")
    assert adapter.rows == {"encoder_prefix": (1,), "self_prefix": (2,), "cross_prefix": (2,)}
    torch.manual_seed(5)
    tensors = {loc: torch.randn(adapter.prefix_shape(loc)) for loc in adapter.rows}
    assert tensors["encoder_prefix"].shape == (1, 2, 4, 3, 8)
    kw, real = batch("t5")
    with torch.no_grad():
        before = model(**kw).logits
        set_flat_prefix(model, "imp", tensors)  # the decode-time cache must not keep the old prefix
        out = model(**kw).logits
    assert not torch.equal(before, out)
    got = get_flat_prefix(model, "imp")
    assert all(torch.equal(got[k], tensors[k]) for k in tensors)
    set_impl(model, ORACLE)
    attach_prefixes(model, "imp")
    with torch.no_grad():
        ref = model(**kw).logits
    assert (out - ref)[real].abs().max().item() <= 1e-5


def test_set_flat_prefix_validates_before_changing():
    model = prefixattn.init(build("llama"))
    model.add_adapter("a", config=PrefixTuningConfig(prefix_length=4, bottleneck_size=8))
    before = {loc: t.clone() for loc, t in get_flat_prefix(model, "a").items()}
    good = torch.zeros(2, 2, 2, 4, 8)
    with pytest.raises(ValueError, match=r"expected shape \[2, 2, 2, 4, 8\]"):
        set_flat_prefix(model, "a", {"self_prefix": torch.zeros(2, 2, 2, 5, 8)})
    with pytest.raises(ValueError, match="expected exactly the locations"):
        set_flat_prefix(model, "a", {"self_prefix": good, "cross_prefix": good})
    with pytest.raises(ValueError, match="unknown adapter"):
        set_flat_prefix(model, "b", {"self_prefix": good})
    assert not get_store(model).get("a").is_flat()
    after = get_flat_prefix(model, "a")
    assert all(torch.equal(before[k], after[k]) for k in before)
