"""Forward logits through prefixattn equal a hand-concatenated eager oracle, for every supported family."""

import pytest
import torch
from hf_models import ALL, ENC_DEC, batch, build
from hf_oracle import ORACLE, attach_prefixes, set_impl

import prefixattn
import prefixattn.hf.attention as hf_attention
from prefixattn import PrefixTuningConfig

TOL = 1e-5  # fp32 against the float64 oracle


def _prepared(family, config=None, **overrides):
    model = build(family, **overrides)
    prefixattn.init(model)
    model.add_adapter("a", config=config or PrefixTuningConfig(prefix_length=5, bottleneck_size=16), set_active=True)
    return model


@torch.no_grad()
def _logits(model, impl, adapter, kw):
    set_impl(model, impl)
    if impl == ORACLE:
        attach_prefixes(model, adapter)
    else:
        model.set_active_adapters(adapter)
    try:
        return model(**kw).logits
    finally:
        set_impl(model, "prefixattn")
        model.set_active_adapters("a")


@pytest.mark.parametrize("family", ALL)
def test_logits_equal_oracle_with_padding(family):
    model = _prepared(family)
    kw, real = batch(family)
    out = _logits(model, "prefixattn", "a", kw)
    ref = _logits(model, ORACLE, "a", kw)
    assert (out - ref)[real].abs().max().item() <= TOL
    # Without a prefix prefixattn is the plain model; and the prefix changes the output (the test can fail).
    plain = _logits(model, "prefixattn", None, kw)
    base = _logits(model, ORACLE, None, kw)
    assert (plain - base)[real].abs().max().item() <= TOL
    assert (ref - base)[real].abs().max().item() > 1e-3


@pytest.mark.parametrize("family", ENC_DEC)
@pytest.mark.parametrize("encoder_prefix,cross_prefix", [(True, True), (True, False), (False, True), (False, False)])
def test_encoder_decoder_locations_follow_config(family, encoder_prefix, cross_prefix):
    config = PrefixTuningConfig(
        prefix_length=4, bottleneck_size=16, encoder_prefix=encoder_prefix, cross_prefix=cross_prefix
    )
    model = _prepared(family, config)
    expected = (
        {"self_prefix"}
        | ({"encoder_prefix"} if encoder_prefix else set())
        | ({"cross_prefix"} if cross_prefix else set())
    )
    adapter = prefixattn.hf.get_store(model).get("a")
    assert set(adapter.rows) == expected
    kw, real = batch(family)
    out = _logits(model, "prefixattn", "a", kw)
    ref = _logits(model, ORACLE, "a", kw)
    assert (out - ref)[real].abs().max().item() <= TOL


@pytest.mark.parametrize("family", ENC_DEC)
def test_every_encoder_decoder_location_changes_the_output(family):
    """Dropping any one location's prefix from the oracle moves it away from prefixattn's output, so the
    comparison above really checks each of encoder, decoder-self and cross prefixes."""
    model = _prepared(family)
    kw, real = batch(family)
    out = _logits(model, "prefixattn", "a", kw)
    set_impl(model, ORACLE)
    attach_prefixes(model, "a")
    for loc in ("encoder_prefix", "self_prefix", "cross_prefix"):
        mods = [x for x in model.modules() if x.__dict__.get(hf_attention.SITE_ATTR, (None,))[0] == loc]
        saved = [x.__dict__["_oracle_prefix"] for x in mods]
        for x in mods:
            x.__dict__["_oracle_prefix"] = None
        with torch.no_grad():
            partial = model(**kw).logits
        for x, s in zip(mods, saved):
            x.__dict__["_oracle_prefix"] = s
        assert (partial - out)[real].abs().max().item() > 1e-4, loc
    set_impl(model, "prefixattn")


@pytest.mark.parametrize(
    "family,window,no_window",
    [
        ("mistral", {"sliding_window": 3}, {"sliding_window": None}),
        # Qwen2: layer 0 full attention, layer 1 sliding (a per-layer-type mask dict)
        ("qwen2", {"use_sliding_window": True, "sliding_window": 3, "max_window_layers": 1}, {}),
    ],
)
def test_sliding_window_keeps_the_prefix_visible(family, window, no_window):
    """A window shorter than the sequence: the mask falls back to a dense one (attn_bias) and the prefix stays
    visible to every query (the oracle concatenates it with zero bias)."""
    model = _prepared(family, **window)
    kw, real = batch(family)
    out = _logits(model, "prefixattn", "a", kw)
    ref = _logits(model, ORACLE, "a", kw)
    assert (out - ref)[real].abs().max().item() <= TOL
    unwindowed = _logits(_prepared(family, **no_window), "prefixattn", "a", kw)
    assert (out - unwindowed)[real].abs().max().item() > 1e-3  # the window really cut keys


def test_plain_masks_reach_the_op_as_padding_not_as_dense_masks(monkeypatch):
    seen = []
    real_op = hf_attention.prefix_attention

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return real_op(*args, **kwargs)

    monkeypatch.setattr(hf_attention, "prefix_attention", spy)
    for family in ("llama", "t5"):
        model = _prepared(family)
        kw, _ = batch(family)
        with torch.no_grad():
            model(**kw)
    assert seen
    for kwargs in seen:
        mask = kwargs["key_padding_mask"]
        assert mask is not None and mask.dim() == 2 and mask.dtype == torch.bool
        bias = kwargs["attn_bias"]
        assert bias is None or bias.shape[0] == 1  # only T5's [1, H, Sq, Sk] position bias, never a [B, ...] mask


def test_an_unpadded_attention_mask_reaches_the_op_as_none(monkeypatch):
    """A tokenizer's all-ones mask carries no information: it is dropped once per forward (kernels skip the
    mask; backend "sdpa" can run), while a padded batch keeps its [B, Sk] mask. Logits are unchanged."""
    seen = []
    real_op = hf_attention.prefix_attention

    def spy(*args, **kwargs):
        seen.append(kwargs["key_padding_mask"])
        return real_op(*args, **kwargs)

    monkeypatch.setattr(hf_attention, "prefix_attention", spy)
    model = _prepared("llama")
    ids = torch.randint(3, model.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        with_mask = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        assert seen and all(m is None for m in seen)
        without = model(input_ids=ids).logits
        seen.clear()
        padded = torch.ones_like(ids)
        padded[0, :2] = 0
        model(input_ids=ids, attention_mask=padded)
    assert torch.equal(with_mask, without)
    assert seen and all(m is not None and not bool(m.all()) for m in seen)
