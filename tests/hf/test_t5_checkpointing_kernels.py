"""T5 prefix training with gradient checkpointing runs on the kernels (issue 9, defect 8).

Under checkpointing in training mode, T5 layers without a relative bias build an all-zero position bias and mark
it requires_grad=True (for reentrant checkpointing). It reached prefix_attention as a sliced view with a grad_fn,
so backend "triton" refused the call and "auto" on a GPU fell back to the reference backend. Frozen T5 weights
must give a bias that needs no gradient; a bias computed from trainable weights still needs one.
"""

import pytest
import torch
from hf_models import batch, build

import prefixattn
import prefixattn.hf.attention as hf_attention
from prefixattn import PrefixTuningConfig


def _t5(backend):
    model = build("t5")
    prefixattn.init(model, backend=backend)
    model.add_adapter("a", config=PrefixTuningConfig(prefix_length=4, bottleneck_size=16))
    model.train_adapter("a")
    return model


def _enable_checkpointing(model):
    # 5.24 renamed it activation_checkpointing_enable; 5.17 only has the old name
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()


def _loss(model):
    kw, _ = batch("t5", b=2, s=5)
    labels = kw["decoder_input_ids"].masked_fill(kw["decoder_attention_mask"] == 0, -100)
    return model(**kw, labels=labels).loss


def _prefix_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_t5_checkpointing_trains_on_triton_with_the_gradients_of_a_plain_run(monkeypatch):
    biases = []
    real = hf_attention.prefix_attention

    def spy(*args, **kwargs):
        bias = kwargs.get("attn_bias")
        biases.append(bias is not None and bias.requires_grad)
        return real(*args, **kwargs)

    monkeypatch.setattr(hf_attention, "prefix_attention", spy)
    grads = []
    for checkpointing in (False, True):
        model = _t5("triton")
        if checkpointing:
            _enable_checkpointing(model)
        biases.clear()
        _loss(model).backward()
        assert biases and not any(biases)  # no bias needing a gradient: "auto" keeps the kernels too
        grads.append(_prefix_grads(model))
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        assert grads[0][n].abs().max() > 0, n
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7)


def test_t5_trainable_relative_bias_is_still_refused_by_triton():
    model = _t5("triton")
    _enable_checkpointing(model)
    for m in model.modules():
        if getattr(m, "has_relative_attention_bias", False):
            m.relative_attention_bias.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="attn_bias: backend 'triton' does not compute a gradient"):
        _loss(model)
