"""Training through prefixattn: only prefix parameters learn, the MLP runs once per forward, gradient
checkpointing gives the same gradients, eject keeps outputs, gating and dropout behave as in adapters."""

import pytest
import torch
from hf_models import batch, build
from hf_oracle import ORACLE, attach_prefixes, set_impl

import prefixattn
import prefixattn.hf.attention as hf_attention
from prefixattn import PrefixTuningConfig
from prefixattn.hf import get_store
from prefixattn.tuning.modules import PrefixMLP
from prefixattn.tuning.store import PrefixStore


def _prepared(family, **cfg):
    model = build(family)
    prefixattn.init(model)
    config = PrefixTuningConfig(**{"prefix_length": 4, "bottleneck_size": 16, **cfg})
    model.add_adapter("a", config=config)
    return model


def _loss(model, family, kw):
    if model.config.is_encoder_decoder:
        labels = kw["decoder_input_ids"].masked_fill(kw["decoder_attention_mask"] == 0, -100)
    else:
        labels = kw["input_ids"].masked_fill(kw["attention_mask"] == 0, -100)
    return model(**kw, labels=labels).loss


@pytest.mark.parametrize("family", ["llama", "bart"])
def test_training_lowers_the_loss_and_changes_only_the_prefix(family):
    model = _prepared(family)
    model.train_adapter("a")
    assert model.training
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.a." in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    kw, _ = batch(family)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    losses = []
    for _ in range(30):
        loss = _loss(model, family, kw)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.2, losses
    for n, p in model.named_parameters():
        changed = not torch.equal(before[n], p.detach())
        assert changed == (n in trainable) or (n in trainable and "gates" in n), n


def test_mlp_runs_once_per_forward_decode_steps_included(monkeypatch):
    calls, forwards = [], []
    real = PrefixMLP.generate
    monkeypatch.setattr(PrefixMLP, "generate", lambda self: calls.append(self) or real(self))
    real_begin = PrefixStore.begin_forward
    monkeypatch.setattr(PrefixStore, "begin_forward", lambda *a, **k: forwards.append(1) or real_begin(*a, **k))
    model = _prepared("t5")
    model.train_adapter("a")
    kw, _ = batch("t5")
    _loss(model, "t5", kw).backward()
    assert len(calls) == 3 and len(forwards) == 1  # one MLP per location (encoder, self, cross), not per layer
    model.eval()
    calls.clear()
    forwards.clear()
    gen_kw = {k: kw[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        model.generate(**gen_kw, max_new_tokens=4, do_sample=False)
    # Nothing is cached between forwards (a cache could go stale, see test_prefix_freshness.py): every
    # forward of generate runs each MLP once, and only once.
    assert len(forwards) >= 4 and len(calls) == 3 * len(forwards)


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_gradient_checkpointing_gives_the_same_gradients(family):
    grads = []
    for checkpointing in (False, True):
        model = _prepared(family)
        model.train_adapter("a")
        if checkpointing:
            # 5.24 renamed it activation_checkpointing_enable; 5.17 only has the old name
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            enable()
        calls = []
        next(m for m in model.modules() if hf_attention.SITE_ATTR in m.__dict__).register_forward_pre_hook(
            lambda *a: calls.append(1)
        )
        kw, _ = batch(family)
        _loss(model, family, kw).backward()
        assert len(calls) == (2 if checkpointing else 1)  # the layer really was recomputed in backward
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert grads[0][n].abs().max() > 0, n
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_eject_keeps_outputs_and_shrinks_the_checkpoint(family, tmp_path):
    model = _prepared(family)
    model.set_active_adapters("a")
    kw, real = batch(family)
    with torch.no_grad():
        before = model(**kw).logits
    mlp_bytes = model.save_adapter(str(tmp_path / "mlp"), "a")
    model.eject_prefix_tuning("a")
    adapter = get_store(model).get("a")
    assert adapter.config.flat and adapter.is_flat()
    assert not any(isinstance(m, PrefixMLP) for m in model.modules())
    with torch.no_grad():
        after = model(**kw).logits
    assert torch.equal(before, after)
    flat_bytes = model.save_adapter(str(tmp_path / "flat"), "a")
    assert flat_bytes < mlp_bytes
    import json

    saved = json.load(open(tmp_path / "flat" / "prefixattn_config.json"))
    assert saved["config"]["flat"] is True


def test_the_backend_choice_reaches_the_op(monkeypatch):
    seen = []
    real_op = hf_attention.prefix_attention
    monkeypatch.setattr(hf_attention, "prefix_attention", lambda *a, **k: seen.append(k["backend"]) or real_op(*a, **k))
    model = _prepared("llama")
    model.set_active_adapters("a")
    kw, _ = batch("llama")
    with torch.no_grad():
        model(**kw)
        assert set(seen) == {"auto"}
        prefixattn.init(model, backend="torch")
        seen.clear()
        model(**kw)
    assert set(seen) == {"torch"}


@pytest.mark.parametrize("shared", [True, False])
def test_gating_scales_prefix_keys_and_values(shared):
    """With a zero gate weight the gate is the constant sigmoid(bias): the gated model then equals the oracle
    with the prefix keys and values scaled by those constants."""
    model = _prepared("llama", use_gating=True, shared_gating=shared, flat=True)
    model.set_active_adapters("a")
    adapter = get_store(model).get("a")
    bias = torch.tensor([0.3] if shared else [0.3, -1.2])
    with torch.no_grad():
        for gate in adapter.gates.values():
            gate.linear.weight.zero_()
            gate.linear.bias.copy_(bias)
    kw, real = batch("llama")
    with torch.no_grad():
        out = model(**kw).logits
        set_impl(model, ORACLE)
        attach_prefixes(model, "a")
        gk, gv = torch.sigmoid(bias[0]), torch.sigmoid(bias[-1])
        for m in model.modules():
            pre = m.__dict__.get("_oracle_prefix")
            if pre is not None:
                m.__dict__["_oracle_prefix"] = (pre[0] * gk, pre[1] * gv)
        ref = model(**kw).logits
        set_impl(model, "prefixattn")
    assert (out - ref)[real].abs().max().item() <= 1e-5


def test_gates_train_and_follow_the_input():
    model = _prepared("llama", use_gating=True)
    model.train_adapter("a")
    kw, _ = batch("llama")
    _loss(model, "llama", kw).backward()
    for name, p in get_store(model).get("a").gates.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, name


def test_prefix_dropout_only_in_training():
    model = _prepared("llama", dropout=0.5)
    model.set_active_adapters("a")
    kw, _ = batch("llama")
    model.train()
    torch.manual_seed(0)
    a = model(**kw).logits
    b = model(**kw).logits
    assert not torch.equal(a, b)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(**kw).logits, model(**kw).logits)


def test_reentrant_checkpointing_is_refused_with_a_clear_error():
    model = _prepared("llama")
    model.train_adapter("a")
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    kw, _ = batch("llama")
    with pytest.raises(ValueError, match="use_reentrant=False"):
        _loss(model, "llama", kw)
    # nothing is left half-done: with the prefix frozen the same model runs
    for p in model.parameters():
        p.requires_grad_(False)
    _loss(model, "llama", kw)


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_autocast_training_runs_and_matches_fp32_loosely(family):
    model = _prepared(family)
    model.train_adapter("a")
    kw, _ = batch(family)
    ref = _loss(model, family, kw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = _loss(model, family, kw)
    loss.backward()
    assert abs(loss.item() - ref.item()) < 0.05
    assert all(p.grad is not None for p in get_store(model).get("a").parameters())


def test_issue_snippet_runs_as_written():
    from prefixattn import PrefixTuningConfig  # noqa: F811 (the import the snippet assumes)

    model = build("bart")
    prefixattn.init(model)
    config = PrefixTuningConfig(flat=False, encoder_prefix=True, prefix_length=12)
    model.add_adapter("trouble_shooting", config=config)
    model.train_adapter("trouble_shooting")
    kw, _ = batch("bart")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    _loss(model, "bart", kw).backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        before = model(**kw).logits
    model.eject_prefix_tuning("trouble_shooting")
    with torch.no_grad():
        assert torch.equal(model(**kw).logits, before)
    assert get_store(model).get("trouble_shooting").config.flat


def test_deepcopy_gives_an_independent_prepared_model():
    import copy

    model = _prepared("llama")
    model.set_active_adapters("a")
    twin = copy.deepcopy(model)
    twin.add_adapter("b", config=PrefixTuningConfig(prefix_length=2, bottleneck_size=4))
    assert get_store(model).names() == ["a"] and get_store(twin).names() == ["a", "b"]
    kw, _ = batch("llama")
    with torch.no_grad():
        assert torch.equal(model(**kw).logits, twin(**kw).logits)
