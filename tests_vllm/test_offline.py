"""Offline `LLM.generate` with the plugin active on a tiny random Llama (GQA): greedy tokens equal prefixattn's
transformers generate() for mixed batches, chunked prefill, prefix caching and preemption.

One engine serves every test here: block_size 32, at most 64 batched tokens per step (so prompts over 64
tokens are prefilled in chunks), prefix caching on, and a KV cache of 28 blocks (896 tokens), small enough
that the preemption test's batch does not fit.
"""

from __future__ import annotations

from types import SimpleNamespace

import helpers
import pytest
from conftest import close

MAX_NEW = 12


@pytest.fixture(scope="module")
def engine(tiny_model):
    from transformers import AutoTokenizer
    from vllm import LLM

    model_dir, adapters = tiny_model("llama")
    llm = LLM(
        model_dir,
        dtype="float32",
        max_model_len=512,
        max_num_seqs=8,
        block_size=32,
        max_num_batched_tokens=64,
        enable_prefix_caching=True,
        num_gpu_blocks_override=28,
        disable_log_stats=False,
        enforce_eager=True,
        seed=0,
        additional_config={"prefixattn": {"adapters": adapters}},
    )
    yield SimpleNamespace(
        llm=llm,
        tok=AutoTokenizer.from_pretrained(model_dir),
        ref=helpers.Reference(model_dir, adapters),
        names=list(adapters),
    )
    close(llm)


def generate(engine, cases, max_new=MAX_NEW):
    """cases: [(prompt ids, prefix name or None)] -> (vLLM's tokens, the reference's tokens), one list each."""
    from vllm import SamplingParams

    params = [
        SamplingParams(temperature=0.0, max_tokens=max_new, extra_args={"prefix": p} if p else None) for _, p in cases
    ]
    outs = engine.llm.generate([{"prompt_token_ids": ids} for ids, _ in cases], params, use_tqdm=False)
    got = [list(o.outputs[0].token_ids) for o in outs]
    want = [engine.ref.generate(ids, p, max_new) for ids, p in cases]
    return got, want


def counter(llm, name: str) -> int:
    return sum(m.value for m in llm.get_metrics() if m.name == name)


def test_plugin_owns_decoder_attention_and_holds_the_pool(engine):
    (found,) = engine.llm.apply_model(helpers.inspect_worker)
    assert found["impls"] == ["PrefixCPUAttentionImpl"]
    assert found["names"] == ["flat", "mlp", "peft"]
    assert found["shape"] == [3, 3, 2, 7, 32]  # [layers, adapters, KV heads, longest prefix, head dim]
    assert found["lengths"] == [[5, 7, 4], [5, 0, 4], [5, 7, 4]]  # "mlp" leaves layer 1 out


def test_mixed_batch_matches_transformers(engine):
    tok = engine.tok
    food = tok("Tell me about your favourite food.").input_ids
    long = tok("Summarize this: " + helpers.long_text(7)).input_ids
    assert len(long) > 2 * 64  # prefilled in at least three chunks, over five KV blocks
    cases = [
        (food, "flat"),
        (food, None),
        (food, "mlp"),
        (food, "peft"),
        (long, "peft"),
        (tok("Write one sentence about the sea.").input_ids, "flat"),
        (long, None),
    ]
    got, want = generate(engine, cases)
    assert got == want
    assert len({tuple(g) for g in got[:4]}) == 4, "each prefix (and none) must change what the model says"


def test_prefix_cache_is_never_shared_across_prefixes(engine):
    ids = engine.tok("A prompt only the prefix cache test uses: " + helpers.long_text(4)).input_ids
    assert len(ids) >= 3 * 32  # several full blocks that the prefix cache could reuse
    hits = [counter(engine.llm, "vllm:prefix_cache_hits")]
    for prefix in ("flat", "mlp", None, "flat"):
        got, want = generate(engine, [(ids, prefix)])
        assert got == want, prefix
        hits.append(counter(engine.llm, "vllm:prefix_cache_hits"))
    # The same prompt under another prefix (or none) reuses nothing; under the same prefix it hits.
    assert hits[1] == hits[0] and hits[2] == hits[1] and hits[3] == hits[2], hits
    assert hits[4] >= hits[3] + 3 * 32, hits


def test_preemption_recomputes_with_the_right_prefix(engine):
    tok = engine.tok
    cases = [
        (tok(f"Request {i}: " + helpers.long_text(3 + i % 2)).input_ids, (engine.names + [None])[i % 4])
        for i in range(8)
    ]
    before = counter(engine.llm, "vllm:num_preemptions")
    got, want = generate(engine, cases, max_new=40)
    assert counter(engine.llm, "vllm:num_preemptions") > before, "the KV cache was meant to be too small"
    assert got == want


def test_unknown_prefix_is_refused_at_admission(engine):
    from vllm import SamplingParams

    with pytest.raises(ValueError, match=r"unknown prefix 'nope'; this server has \['flat', 'mlp', 'peft'\]"):
        engine.llm.generate(["hi"], SamplingParams(max_tokens=2, extra_args={"prefix": "nope"}), use_tqdm=False)
    with pytest.raises(ValueError, match=r"expected a prefix name \(str\), got 3"):
        engine.llm.generate(["hi"], SamplingParams(max_tokens=2, extra_args={"prefix": 3}), use_tqdm=False)
