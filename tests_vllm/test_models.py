"""Model families and a real pretrained model under the plugin, and vLLM without it.

Each engine gets a mixed batch (several prefixes and none, one prompt repeated under each) and its greedy
tokens must equal prefixattn's transformers generate(). Without "prefixattn" in additional_config vLLM must
be untouched: its own attention implementation, no router, and the same tokens as transformers.
"""

from __future__ import annotations

import helpers
import pytest
from conftest import close

MAX_NEW = 10


def start(model_dir: str, adapters: dict | None, **kwargs):
    from vllm import LLM

    extra = {"additional_config": {"prefixattn": {"adapters": adapters}}} if adapters else {}
    return LLM(
        model_dir, dtype="float32", max_model_len=256, block_size=32, enforce_eager=True, seed=0, **extra, **kwargs
    )


def mixed_batch(llm, tok, ref, prompts, prefixes):
    from vllm import SamplingParams

    cases = [(tok(p).input_ids, prefix) for p in prompts for prefix in prefixes]
    params = [
        SamplingParams(temperature=0.0, max_tokens=MAX_NEW, extra_args={"prefix": p} if p else None) for _, p in cases
    ]
    outs = llm.generate([{"prompt_token_ids": ids} for ids, _ in cases], params, use_tqdm=False)
    got = [list(o.outputs[0].token_ids) for o in outs]
    want = [ref.generate(ids, p, MAX_NEW) for ids, p in cases]
    return got, want


PROMPTS = ["Tell me about your favourite food.", "What is the capital of Germany? " + helpers.long_text(2)]


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3", "mistral"])
def test_family_mixed_batch_matches_transformers(tiny_model, model_type):
    from transformers import AutoTokenizer

    model_dir, adapters = tiny_model(model_type)
    llm = start(model_dir, adapters)
    try:
        got, want = mixed_batch(
            llm,
            AutoTokenizer.from_pretrained(model_dir),
            helpers.Reference(model_dir, adapters),
            PROMPTS,
            ["flat", None, "mlp", "peft"],
        )
    finally:
        close(llm)
    assert got == want
    assert len({tuple(g) for g in got[:4]}) == 4, "each prefix (and none) must change what the model says"


def test_smollm2_mixed_batch_matches_transformers(smollm2):
    from transformers import AutoTokenizer

    model_dir, adapters = smollm2
    tok = AutoTokenizer.from_pretrained(model_dir)
    chat = [
        tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
        for p in ("Tell me about your favourite food.", "Write one sentence about the sea.")
    ]
    llm = start(model_dir, adapters, max_num_batched_tokens=64)
    try:
        got, want = mixed_batch(llm, tok, helpers.Reference(model_dir, adapters), chat, ["flat", None, "peft"])
    finally:
        close(llm)
    assert got == want
    assert got[0] != got[1] and got[1] != got[2]


def test_inactive_plugin_leaves_vllm_alone(tiny_model):
    """No "prefixattn" in additional_config: vLLM's own CPU attention, no router, transformers' tokens; a
    request that still names a prefix is served by the base model (the plugin is inert)."""
    from transformers import AutoTokenizer
    from vllm import SamplingParams

    model_dir, adapters = tiny_model("llama")
    tok = AutoTokenizer.from_pretrained(model_dir)
    llm = start(model_dir, None)
    try:
        (found,) = llm.apply_model(helpers.inspect_worker)
        procs = llm.llm_engine.vllm_config.model_config.logits_processors
        ref = helpers.Reference(model_dir, adapters)
        ids = [tok(p).input_ids for p in PROMPTS]
        outs = llm.generate(
            [{"prompt_token_ids": i} for i in ids] * 2,
            [SamplingParams(temperature=0.0, max_tokens=MAX_NEW)] * 2
            + [SamplingParams(temperature=0.0, max_tokens=MAX_NEW, extra_args={"prefix": "flat"})] * 2,
            use_tqdm=False,
        )
    finally:
        close(llm)
    assert found == {"impls": ["CPUAttentionBackendImpl"]}  # vLLM's own attention, no pool
    assert not procs
    got = [list(o.outputs[0].token_ids) for o in outs]
    want = [ref.generate(i, None, MAX_NEW) for i in ids] * 2
    assert got == want


def test_tensor_parallel_2_slices_the_pool_per_rank(tiny_model, monkeypatch):
    """TP=2 on the CPU (one core per rank): each rank holds its one KV head of every prefix, and the tokens
    equal transformers'."""
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from prefixattn.vllm_plugin import config as plugin_config
    from prefixattn.vllm_plugin import pool as prefix_pool

    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # vLLM's automatic binding wants a NUMA node per rank
    model_dir, adapters = tiny_model("llama")
    llm = start(model_dir, adapters, tensor_parallel_size=2)
    try:
        ranks = llm.apply_model(helpers.inspect_worker)
        got, want = mixed_batch(
            llm,
            AutoTokenizer.from_pretrained(model_dir),
            helpers.Reference(model_dir, adapters),
            PROMPTS[:1],
            ["flat", None, "mlp", "peft"],
        )
    finally:
        close(llm)
    assert got == want
    served = prefix_pool.ServedModel(
        "llama", "LlamaForCausalLM", 3, 2, 32, 128, torch.float32, AutoConfig.from_pretrained(model_dir)
    )
    entries = prefix_pool.read_all(plugin_config.parse({"prefixattn": {"adapters": adapters}}), served)
    full = prefix_pool.PrefixPool.build(entries, served, device=torch.device("cpu"), heads=(0, 2))
    # Key sums per (entry, KV head) tell the heads apart. The worker builds the "mlp" entry with its own float32
    # matmul on one thread (vLLM sets one torch thread per worker), so its sums match to float32 rounding.
    full_sums = full.k.double().sum(dim=(0, 3, 4)).float()  # [entries, KV heads]
    assert (full_sums[:, 0] - full_sums[:, 1]).abs().min() > 1e-2
    assert len(ranks) == 2
    for rank, found in enumerate(ranks):
        assert found["shape"] == [3, 3, 1, 7, 32]
        torch.testing.assert_close(torch.tensor(found["key_sums"], dtype=torch.float32), full_sums[:, rank : rank + 1])
