"""generate() through prefixattn: greedy equals a no-cache step loop (DynamicCache and StaticCache, left
padding); sampling and beam search equal the hand-concatenated oracle; the KV cache never holds the prefix."""

import pytest
import torch
from hf_models import batch, build
from hf_oracle import ORACLE, attach_prefixes, set_impl

import prefixattn
from prefixattn import PrefixTuningConfig

NEW = 4


def _prepared(family, overrides=None, **cfg):
    model = build(family, **(overrides or {}))
    prefixattn.init(model)
    config = PrefixTuningConfig(**{"prefix_length": 5, "bottleneck_size": 16, **cfg})
    model.add_adapter("a", config=config, set_active=True)
    return model


def _prompt(family):
    kw, _ = batch(family, b=3, s=6)
    kw.pop("decoder_input_ids", None)
    kw.pop("decoder_attention_mask", None)
    return kw


def _cache_of(output):
    return output["cache"] if "cache" in output else output["past_key_values"]


@torch.no_grad()
def _step_loop(model, kw, steps):
    """Greedy decoding by full forwards without any cache; returns (new tokens [B, steps], logits per step)."""
    ids, mask = kw["input_ids"], kw["attention_mask"]
    tokens, logits = [], []
    if model.config.is_encoder_decoder:
        dec = torch.full((ids.shape[0], 1), model.config.decoder_start_token_id)
        for _ in range(steps):
            step = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, use_cache=False).logits[:, -1]
            nxt = step.argmax(-1, keepdim=True)
            dec = torch.cat([dec, nxt], 1)
            tokens.append(nxt), logits.append(step)
    else:
        for _ in range(steps):
            pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # as generate() builds them
            step = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits[:, -1]
            nxt = step.argmax(-1, keepdim=True)
            ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
            tokens.append(nxt), logits.append(step)
    return torch.cat(tokens, 1), logits


def _new_tokens(model, out, kw):
    seq = out.sequences
    return seq[:, 1:] if model.config.is_encoder_decoder else seq[:, kw["input_ids"].shape[1] :]


SLIDING = {"sliding_window": 3}  # shorter than prompt + generation: sliding caches drop old keys


@pytest.mark.parametrize(
    "family,cache,overrides",
    [
        ("llama", "dynamic", None),
        ("llama", "static", None),
        ("gpt2", "dynamic", None),
        ("mistral", "static", None),
        ("mistral", "dynamic", SLIDING),
        ("mistral", "static", SLIDING),
        ("t5", "dynamic", None),
        ("t5", "static", None),
        ("bart", "dynamic", None),
        ("bart", "static", None),
    ],
)
def test_greedy_generate_equals_no_cache_step_loop(family, cache, overrides):
    model = _prepared(family, overrides)
    kw = _prompt(family)
    extra = {"cache_implementation": "static"} if cache == "static" else {}
    with torch.no_grad():
        out = model.generate(
            **kw, max_new_tokens=NEW, do_sample=False, output_logits=True, return_dict_in_generate=True, **extra
        )
    ref_tokens, ref_logits = _step_loop(model, kw, NEW)
    assert torch.equal(_new_tokens(model, out, kw), ref_tokens)
    for got, want in zip(out.logits, ref_logits):
        assert (got - want).abs().max().item() <= 1e-4


@pytest.mark.parametrize("family", ["llama", "t5"])
@pytest.mark.parametrize("mode", ["sample", "beam"])
def test_sampling_and_beam_search_equal_the_oracle(family, mode):
    model = _prepared(family)
    kw = _prompt(family)
    args = dict(do_sample=True, top_k=0, temperature=0.7) if mode == "sample" else dict(num_beams=3, do_sample=False)
    results = []
    for impl in ("prefixattn", ORACLE):
        set_impl(model, impl)
        attach_prefixes(model, "a")
        torch.manual_seed(123)
        with torch.no_grad():
            results.append(model.generate(**kw, max_new_tokens=NEW, **args))
    set_impl(model, "prefixattn")
    assert torch.equal(results[0], results[1])
    set_impl(model, ORACLE)
    attach_prefixes(model, None)
    torch.manual_seed(123)
    with torch.no_grad():
        without = model.generate(**kw, max_new_tokens=NEW, **args)
    set_impl(model, "prefixattn")
    assert not torch.equal(results[0], without)  # the prefix steers generation, so equality above means something


def test_cache_holds_no_prefix():
    model = _prepared("llama")
    kw = _prompt("llama")
    with torch.no_grad():
        out = model(**kw, use_cache=True)
        assert _cache_of(out).get_seq_length() == kw["input_ids"].shape[1]
        gen = model.generate(**kw, max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True)
    # the last generated token is never fed back, so the cache holds all tokens but that one
    assert _cache_of(gen).get_seq_length() == gen.sequences.shape[1] - 1
    layer = _cache_of(gen).layers[0]
    assert layer.keys.shape[2] == gen.sequences.shape[1] - 1


def test_encoder_decoder_caches_hold_no_prefix():
    model = _prepared("t5")
    kw = _prompt("t5")
    dec = torch.full((3, 2), model.config.decoder_start_token_id)
    with torch.no_grad():
        out = model(**kw, decoder_input_ids=dec, use_cache=True)
    cache = _cache_of(out)
    assert cache.self_attention_cache.get_seq_length() == 2
    assert cache.cross_attention_cache.get_seq_length() == kw["input_ids"].shape[1]
