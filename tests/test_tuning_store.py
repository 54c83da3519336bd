"""The model-agnostic prefix store: generators, pool assembly, per-sequence choice, freshness."""

import pytest
import torch

from prefixattn.tuning import LocationSpec, ModelGeometry, PrefixStore, PrefixTuningConfig

GEOMETRY = ModelGeometry("toy", "Toy", 3, {"self_prefix": LocationSpec("self_prefix", (0, 1, 2), 2, 8, 16)})


def _store():
    store = PrefixStore(GEOMETRY)
    store.add("a", PrefixTuningConfig(prefix_length=4, bottleneck_size=8))
    store.add("b", PrefixTuningConfig(prefix_length=2, flat=True, leave_out=[1]))
    return store


def test_mlp_shapes_follow_kv_heads_and_head_dim():
    store = _store()
    mlp = store.get("a").generators["self_prefix"]
    assert mlp.wte.weight.shape == (4, 16)
    assert mlp.control_trans[0].weight.shape == (8, 16)
    assert mlp.control_trans[2].weight.shape == (3 * 2 * 2 * 8, 8)
    assert mlp().shape == (3, 2, 2, 4, 8)
    assert store.get("b").generators["self_prefix"].prefix.shape == (2, 2, 2, 2, 8)


def test_shared_form_for_one_adapter():
    store = _store()
    store.set_active("a")
    ctx = store.begin_forward(None, dtype=torch.float64, device="cpu")
    flat = store.flat_prefix("a")["self_prefix"]
    pk, pv, idx, lengths = ctx.layer_prefix("self_prefix", 1, dtype=torch.float64, batch=5)
    assert idx is None and lengths is None and pk.dtype == torch.float64
    torch.testing.assert_close(pk, flat[1, 0].double())
    torch.testing.assert_close(pv, flat[1, 1].double())
    store.set_active("b")
    ctx = store.begin_forward(None, dtype=torch.float32, device="cpu")
    assert ctx.layer_prefix("self_prefix", 1, dtype=torch.float32, batch=5) is None  # left out
    assert ctx.layer_prefix("self_prefix", 2, dtype=torch.float32, batch=5)[0].shape == (2, 2, 8)


def test_pool_form_pads_lengths_and_expands_the_choice():
    store = _store()
    store.set_active(["a", "b"])
    ctx = store.begin_forward(["b", None], dtype=torch.float32, device="cpu")
    pk, pv, idx, lengths = ctx.layer_prefix("self_prefix", 0, dtype=torch.float32, batch=4)  # 2 beams each
    assert pk.shape == (2, 2, 4, 8) and lengths.tolist() == [4, 2]
    assert idx.tolist() == [1, 1, -1, -1]
    flat_b = store.flat_prefix("b")["self_prefix"]
    torch.testing.assert_close(pk[1, :, :2], flat_b[0, 0])
    assert torch.equal(pk[1, :, 2:], torch.zeros(2, 2, 8))
    lengths_1 = ctx.layer_prefix("self_prefix", 1, dtype=torch.float32, batch=2)[3]
    assert lengths_1.tolist() == [4, 0]  # b leaves layer 1 out
    with pytest.raises(ValueError, match="has 2 entries but the batch has 3"):
        ctx.layer_prefix("self_prefix", 0, dtype=torch.float32, batch=3)


def test_every_forward_sees_the_current_parameters():
    store = _store()
    store.set_active("a")
    with torch.no_grad():
        first = store.begin_forward(None, dtype=torch.float32, device="cpu").locations["self_prefix"].shared
        store.get("a").generators["self_prefix"].wte.weight.data.add_(1.0)  # bumps no version counter
        second = store.begin_forward(None, dtype=torch.float32, device="cpu").locations["self_prefix"].shared
    assert not torch.allclose(first, second)
    assert torch.equal(second, store.flat_prefix("a")["self_prefix"])
    with_grad = store.begin_forward(None, dtype=torch.float32, device="cpu").locations
    assert with_grad["self_prefix"].shared.requires_grad
