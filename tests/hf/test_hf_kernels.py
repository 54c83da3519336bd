"""Models through the kernel backends: a tiny Llama through backend="triton" in the interpreter (CPU), and
Llama / T5 in bf16 on a GPU against the reference backend."""

import os
import sys

import pytest
import torch
from hf_models import batch, build

import prefixattn
from prefixattn import PrefixTuningConfig

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
from helpers import TOLERANCE, rel_err  # noqa: E402


def _prepared(family, backend, **overrides):
    model = build(family, **overrides)
    prefixattn.init(model, backend=backend)
    model.add_adapter("a", config=PrefixTuningConfig(prefix_length=5, bottleneck_size=16))
    model.add_adapter("b", config=PrefixTuningConfig(prefix_length=3, bottleneck_size=16, flat=True))
    model.set_active_adapters("a")
    return model


def _loss_and_grads(model, kw, **extra):
    if model.config.is_encoder_decoder:
        labels = kw["decoder_input_ids"].masked_fill(kw["decoder_attention_mask"] == 0, -100)
    else:
        labels = kw["input_ids"].masked_fill(kw["attention_mask"] == 0, -100)
    out = model(**kw, labels=labels, **extra)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return out.logits.detach(), grads


# head dims of 16: tl.dot needs dimensions >= 16
INTERPRETER_MODELS = [("llama", {"hidden_size": 64}), ("t5", {"d_kv": 16})]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter test is for CPU runs")
@pytest.mark.parametrize("family,overrides", INTERPRETER_MODELS)
def test_tiny_models_through_the_triton_interpreter(family, overrides):
    """Shared prefix, and a per-sequence pool choice; T5 also passes its position bias as attn_bias."""
    kw, real = batch(family, b=2, s=5)
    outs = {}
    for backend in ("torch", "triton"):
        model = _prepared(family, backend, **overrides)
        with torch.no_grad():
            shared = model(**kw).logits
            model.set_active_adapters(["a", "b"])
            mixed = model(**kw, prefix_choice=["b", "a"]).logits
        outs[backend] = (shared, mixed)
    for got, want in zip(outs["triton"], outs["torch"]):
        assert rel_err(got[real], want[real]) <= TOLERANCE[torch.float32]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter test is for CPU runs")
def test_tiny_llama_training_through_the_triton_interpreter():
    kw, _ = batch("llama", b=2, s=5)
    results = {}
    for backend in ("torch", "triton"):
        model = _prepared("llama", backend, hidden_size=64)
        model.train_adapter("a")
        results[backend] = _loss_and_grads(model, kw)
    for name, ref in results["torch"][1].items():
        assert rel_err(results["triton"][1][name], ref) <= TOLERANCE[torch.float32], name


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter test is for CPU runs")
def test_tiny_llama_through_the_sdpa_backend():
    """backend="sdpa" (CPU flash + Triton prefix merge): forward, a training step's prefix gradients, and greedy
    generate (causal decode steps, Sq = 1) equal the reference backend's. Unpadded, with the all-ones mask a
    tokenizer returns (dropped before the op: that backend takes no mask)."""
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    results = {}
    for backend in ("torch", "sdpa"):
        model = _prepared("llama", backend, hidden_size=64)
        prefixattn.init(model, backend=backend, deterministic=False)
        model.train_adapter("a")
        out = model(input_ids=ids, attention_mask=mask, labels=ids)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        model.eval()
        with torch.no_grad():
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        results[backend] = (out.logits.detach(), grads, gen)
    (ref_logits, ref_grads, ref_gen), (logits, grads, gen) = results["torch"], results["sdpa"]
    assert rel_err(logits, ref_logits) <= TOLERANCE[torch.float32]
    assert ref_grads and grads.keys() == ref_grads.keys()
    for name, ref in ref_grads.items():
        assert rel_err(grads[name], ref) <= TOLERANCE[torch.float32], name
    assert torch.equal(gen, ref_gen)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter test is for CPU runs")
@pytest.mark.parametrize(
    "family,overrides", [("gpt2", {"n_embd": 64}), ("bart", {"d_model": 64}), ("qwen3", {"hidden_size": 64})]
)
def test_more_families_through_the_sdpa_backend(family, overrides):
    """GPT-2, BART (encoder, decoder and cross-attention prefixes) and Qwen3 (explicit head_dim) on backend
    "sdpa": the same logits as the reference backend, for an unpadded batch."""
    ids = torch.randint(3, 90, (2, 6), generator=torch.Generator().manual_seed(2))
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
    if family == "bart":
        kw["decoder_input_ids"] = ids[:, :4]
    logits = {}
    for backend in ("torch", "sdpa"):
        model = _prepared(family, backend, **overrides)
        with torch.no_grad():
            logits[backend] = model(**kw).logits
    assert rel_err(logits["sdpa"], logits["torch"]) <= TOLERANCE[torch.float32]
    model.set_active_adapters(None)
    with torch.no_grad():
        plain = model(**kw).logits
    assert (plain - logits["sdpa"]).abs().max() > 1e-4  # the prefix really acts on this path


def test_init_sets_deterministic():
    model = build("llama")
    prefixattn.init(model, backend="sdpa", deterministic=False)
    store = model._modules[prefixattn.hf.install.STORE_NAME]
    assert (store.backend, store.deterministic) == ("sdpa", False)
    prefixattn.init(model)
    assert (store.backend, store.deterministic) == ("auto", True)
    with pytest.raises(TypeError, match="deterministic"):
        prefixattn.init(model, deterministic="no")


def _gpu_model(family, backend):
    model = _prepared(family, backend).to("cuda", torch.bfloat16)
    return model


def _to_cuda(kw):
    return {k: v.cuda() for k, v in kw.items()}


@pytest.mark.gpu
@pytest.mark.parametrize("family,backend", [("llama", "triton"), ("llama", "auto"), ("t5", "auto")])
def test_bf16_models_on_gpu_match_the_reference_backend(family, backend):
    kw, real = batch(family)
    kw = _to_cuda(kw)
    results = {}
    for b in ("torch", backend):
        model = _gpu_model(family, b)
        model.train_adapter("a")
        results[b] = _loss_and_grads(model, kw)
    (ref_logits, ref_grads), (logits, grads) = results["torch"], results[backend]
    assert rel_err(logits[real.cuda()], ref_logits[real.cuda()]) <= TOLERANCE[torch.bfloat16]
    for name, ref in ref_grads.items():
        assert rel_err(grads[name], ref) <= TOLERANCE[torch.bfloat16], name


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama", "t5"])
def test_bf16_generate_and_mixed_prefixes_on_gpu(family):
    kw, _ = batch(family, s=6)
    kw = _to_cuda({k: kw[k] for k in ("input_ids", "attention_mask")})
    outs = {}
    for b in ("torch", "auto"):
        model = _gpu_model(family, b).eval()
        model.set_active_adapters(["a", "b"])
        with torch.no_grad():
            logits = model(
                **kw,
                prefix_choice=["a", None, "b"],
                **({"decoder_input_ids": kw["input_ids"][:, :3]} if family == "t5" else {}),
            ).logits
            gen = model.generate(
                **kw, max_new_tokens=4, do_sample=False, prefix_choice=["a", None, "b"], return_dict_in_generate=True
            )
        cache = gen["cache"] if "cache" in gen else gen["past_key_values"]
        if family == "llama":
            assert cache.get_seq_length() == gen.sequences.shape[1] - 1  # no prefix in the cache
        outs[b] = logits
    assert rel_err(outs["auto"], outs["torch"]) <= TOLERANCE[torch.bfloat16]
