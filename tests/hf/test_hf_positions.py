"""The position frame: a prefixed decoder-only model called with an attention_mask and no position_ids runs in
the frame generate() uses (positions from the mask), so a left-padded training batch gives the logits
generation sees, with or without an active adapter."""

import inspect

import pytest
import torch
from hf_models import DECODER_ONLY, batch, build

import prefixattn
from prefixattn import PrefixTuningConfig

TOL = 1e-5  # fp32 noise between a padded and an unpadded run, relative to the logit scale


def _prefixed(family):
    model = build(family)
    prefixattn.init(model)
    model.add_adapter("a", config=PrefixTuningConfig(prefix_length=4, bottleneck_size=16), set_active=True)
    return model


def _generate_positions(mask):
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)  # transformers' generate()


@torch.no_grad()
@pytest.mark.parametrize("family", DECODER_ONLY)
def test_left_padded_forward_without_position_ids_is_in_generates_frame(family):
    model = _prefixed(family)
    kw, real = batch(family, b=3, s=7)
    ids, mask = kw["input_ids"], kw["attention_mask"]
    plain = model(input_ids=ids, attention_mask=mask).logits
    framed = model(input_ids=ids, attention_mask=mask, position_ids=_generate_positions(mask)).logits
    assert torch.equal(plain[real], framed[real])
    # positional arguments too (model(ids, mask)) where the forward takes them in that order (not GPT-2's)
    if list(inspect.signature(model.forward).parameters)[:2] == ["input_ids", "attention_mask"]:
        assert torch.equal(model(ids, mask).logits[real], framed[real])
    # generate()'s own first step (prefill logits of the last column)
    gen = model.generate(ids, attention_mask=mask, max_new_tokens=1, output_logits=True, return_dict_in_generate=True)
    scale = max(1.0, gen.logits[0].abs().max().item())
    assert (plain[:, -1] - gen.logits[0]).abs().max().item() <= TOL * scale
    # each row alone, unpadded: the same logits on its real tokens
    for row in range(ids.shape[0]):
        alone = model(input_ids=ids[row : row + 1, real[row]]).logits[0]
        assert (plain[row, real[row]] - alone).abs().max().item() <= TOL * scale
    # the test can fail: counting positions from the first column (padding included) changes the output
    counted = model(input_ids=ids, attention_mask=mask, position_ids=torch.arange(ids.shape[1])[None]).logits
    assert (counted[real] - framed[real]).abs().max().item() > 1e-3


@torch.no_grad()
def test_decode_step_with_cache_and_no_position_ids_continues_the_frame():
    model = _prefixed("llama")
    kw, _ = batch("llama", b=3, s=7)
    ids, mask = kw["input_ids"], kw["attention_mask"]
    first = model(input_ids=ids, attention_mask=mask, use_cache=True)
    cache = first["cache"] if "cache" in first else first["past_key_values"]
    nxt = first.logits[:, -1].argmax(-1, keepdim=True)
    mask2 = torch.cat([mask, torch.ones_like(nxt)], 1)
    step = model(input_ids=nxt, attention_mask=mask2, cache=cache).logits[:, -1]
    full = torch.cat([ids, nxt], 1)
    ref = model(input_ids=full, attention_mask=mask2, position_ids=_generate_positions(mask2)).logits[:, -1]
    assert (step - ref).abs().max().item() <= TOL * max(1.0, ref.abs().max().item())


@torch.no_grad()
def test_frame_does_not_depend_on_the_active_adapters():
    # GPT-2's learned positions: without an active adapter the forward is in generate()'s frame too, so
    # a row without a prefix (prefix_choice None) sees the positions of a run with no adapter at all.
    model = build("gpt2")
    kw, real = batch("gpt2")
    mask = kw["attention_mask"]
    stock_framed = model(**kw, position_ids=_generate_positions(mask)).logits
    stock_counted = model(**kw).logits  # transformers' own forward counts from the first column
    prefixattn.init(model)
    model.add_adapter("a", config=PrefixTuningConfig(prefix_length=4, bottleneck_size=16))
    out = model(**kw).logits
    scale = max(1.0, stock_framed.abs().max().item())
    assert (out[real] - stock_framed[real]).abs().max().item() <= TOL * scale
    assert (stock_counted[real] - stock_framed[real]).abs().max().item() > 1e-3  # the frames differ here
    model.set_active_adapters(["a"])
    mixed = model(**kw, prefix_choice=[None, "a", None]).logits
    rows = torch.tensor([True, False, True])[:, None] & real
    assert (mixed[rows] - out[rows]).abs().max().item() <= TOL * scale


def test_training_loss_equals_the_loss_in_generates_frame():
    model = _prefixed("qwen2")
    model.train_adapter("a")
    kw, real = batch("qwen2", b=3, s=7)
    labels = kw["input_ids"].masked_fill(~real, -100)
    loss = model(**kw, labels=labels).loss
    framed = model(**kw, labels=labels, position_ids=_generate_positions(kw["attention_mask"])).loss
    assert torch.equal(loss, framed)
    loss.backward()
    assert all(p.grad is not None for p in prefixattn.hf.get_store(model).get("a").parameters())
