"""The plugin's parts without a running engine: config parsing, adapter reading and checks, the pool and its
tensor-parallel slicing, the router's row bookkeeping, the cache salt; and the start-up refusals, which
happen in the user's process before any engine process starts."""

from __future__ import annotations

import os

import helpers
import pytest
import torch

from prefixattn.vllm_plugin import config as plugin_config
from prefixattn.vllm_plugin import pool as prefix_pool
from prefixattn.vllm_plugin import router


# -- config ----------------------------------------------------------------------------------------------
def test_config_absent_means_inactive():
    assert plugin_config.parse(None) is None
    assert plugin_config.parse({}) is None
    assert plugin_config.parse({"other_plugin": {}}) is None


def test_config_keeps_order_and_checks_every_key(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    cfg = plugin_config.parse({"prefixattn": {"adapters": {"zeta": str(b), "alpha": str(a)}, "max_prefix_length": 8}})
    assert cfg.names == ["zeta", "alpha"]
    assert cfg.max_prefix_length == 8 and cfg.peft_positions == "peft"
    bad = [
        ({"adapters": {}}, r'\["adapters"\]: expected a non-empty dict'),
        ({"adapters": {"x": str(tmp_path / "missing")}}, r"\['x'\]: .*missing' is not a directory"),
        ({"adapters": {"": str(a)}}, "a prefix name must be a non-empty string"),
        ({"adapters": {"x": str(a)}, "max_prefix_length": 0}, r'\["max_prefix_length"\]: expected an int >= 1'),
        ({"adapters": {"x": str(a)}, "peft_positions": "hf"}, r'\["peft_positions"\]: expected one of'),
        ({"adapters": {"x": str(a)}, "slots": 4}, r"unknown key\(s\) \['slots'\]"),
    ]
    for raw, message in bad:
        with pytest.raises(ValueError, match=message):
            plugin_config.parse({"prefixattn": raw})
    with pytest.raises(ValueError, match="expected a dict, got list"):
        plugin_config.parse({"prefixattn": []})


# -- small pure functions --------------------------------------------------------------------------------
def test_layer_index_parses_vllm_layer_names():
    assert prefix_pool.layer_index("model.layers.12.self_attn.attn") == 12
    assert prefix_pool.layer_index("layers.0.self_attn.attn") == 0
    with pytest.raises(ValueError, match="expected a name containing 'layers.<i>.'"):
        prefix_pool.layer_index("model.decoder.attn")


def test_kv_head_range_follows_vllm_sharding():
    # vLLM (QKVParallelLinear): TP <= Hkv splits the heads evenly; TP > Hkv replicates, rank r -> head r // (TP/Hkv)
    assert prefix_pool.kv_head_range(4, 1, 0) == (0, 4)
    assert [prefix_pool.kv_head_range(4, 2, r) for r in range(2)] == [(0, 2), (2, 2)]
    assert [prefix_pool.kv_head_range(2, 4, r) for r in range(4)] == [(0, 1), (0, 1), (1, 1), (1, 1)]
    assert [prefix_pool.kv_head_range(3, 3, r) for r in range(3)] == [(0, 1), (1, 1), (2, 1)]


def test_cache_salt_is_unambiguous():
    cases = [(None, None), ("sql", None), (None, "sql"), ("sql", "x"), ("sql,x", None), ('["prefixattn"', None)]
    salts = [router.prefixed_salt(p, s) for p, s in cases]
    assert len(set(salts)) == len(salts)
    assert router.prefixed_salt("sql", "x") == router.prefixed_salt("sql", "x")


# -- adapters and the pool -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama(tiny_model):
    return tiny_model("llama")


def served(model_dir: str, dtype=torch.float32) -> prefix_pool.ServedModel:
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(model_dir)
    return prefix_pool.ServedModel("llama", "LlamaForCausalLM", 3, 2, 32, 128, dtype, hf)


def test_every_format_reads_as_prefixattn_itself_loads_it(llama):
    model_dir, adapters = llama
    ref = helpers.Reference(model_dir, adapters)
    from prefixattn.hf import get_flat_prefix

    model = served(model_dir)
    for name, directory in adapters.items():
        entry = prefix_pool.read_adapter_prefix(name, directory, model)
        want = get_flat_prefix(ref.model, name)["self_prefix"].float()
        assert entry.layers == ((0, 2) if name == "mlp" else (0, 1, 2))
        torch.testing.assert_close(entry.prefix, want, rtol=0, atol=1e-6)


def test_pool_holds_each_rank_s_kv_heads(llama):
    model_dir, adapters = llama
    model = served(model_dir)
    entries = prefix_pool.read_all(plugin_config.parse({"prefixattn": {"adapters": adapters}}), model)
    full = prefix_pool.PrefixPool.build(entries, model, device=torch.device("cpu"), heads=(0, 2))
    rank1 = prefix_pool.PrefixPool.build(entries, model, device=torch.device("cpu"), heads=(1, 1))
    assert full.names == ["flat", "mlp", "peft"] and full.index("peft") == 2
    for layer in range(3):
        k, v, lengths = full.layer(layer)
        k1, v1, lengths1 = rank1.layer(layer)
        assert k.shape == (3, 2, 7, 32) and k1.shape == (3, 1, 7, 32)
        assert torch.equal(k1, k[:, 1:2]) and torch.equal(v1, v[:, 1:2]) and torch.equal(lengths1, lengths)
    assert full.lengths.tolist() == [[5, 7, 4], [5, 0, 4], [5, 7, 4]]
    flat = entries[0].prefix
    assert torch.equal(full.k[2, 0, :, :5], flat[2, 0]) and torch.all(full.k[2, 0, :, 5:] == 0)
    with pytest.raises(ValueError, match=r"unknown prefix 'sq'; this server has \['flat', 'mlp', 'peft'\]"):
        full.index("sq")


def test_adapter_for_another_model_is_refused_naming_the_field(workdir, tokenizer_dir, llama):
    model_dir, _ = llama
    model = served(model_dir)
    for field, overrides in [("num_kv_heads", {"num_key_value_heads": 4}), ("num_layers", {"num_hidden_layers": 2})]:
        other = helpers.save_tiny_model(str(workdir / f"other-{field}"), "llama", tokenizer_dir, **overrides)
        dirs = helpers.make_adapters(other, str(workdir / f"other-adapters-{field}"))
        for name in ("flat", "peft"):
            with pytest.raises(
                prefix_pool.AdapterError, match=rf"prefixattn adapter 'x' .*({field}|num_attention_heads)"
            ):
                prefix_pool.read_adapter_prefix("x", dirs[name], model)


def test_prefix_that_overflows_the_model_dtype_is_refused(workdir, llama):
    from safetensors.torch import load_file, save_file

    model_dir, adapters = llama
    huge = workdir / "huge"
    huge.mkdir()
    for f in os.listdir(adapters["flat"]):
        data = open(os.path.join(adapters["flat"], f), "rb").read()
        open(huge / f, "wb").write(data)
    weights = str(huge / "prefixattn_adapter.safetensors")
    tensors = {k: v * 1e6 for k, v in load_file(weights).items()}
    save_file(tensors, weights, metadata={"format": "prefixattn.prefix_tuning"})
    prefix_pool.read_adapter_prefix("huge", str(huge), served(model_dir, torch.float32))  # fits float32
    with pytest.raises(prefix_pool.AdapterError, match=r"adapter 'huge' .*dtype: .*torch.float16"):
        prefix_pool.read_adapter_prefix("huge", str(huge), served(model_dir, torch.float16))


# -- the router ------------------------------------------------------------------------------------------
def test_router_follows_adds_removes_moves_and_swaps():
    from vllm import SamplingParams
    from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

    proc = router.PrefixRouter.__new__(router.PrefixRouter)
    proc.pool = prefix_pool.PrefixPool(["a", "b"], torch.zeros(1), torch.zeros(1), torch.zeros(1))
    router._allocate(6, torch.device("cpu"))

    def params(name):
        return SamplingParams(extra_args={"prefix": name} if name else None)

    def update(size, removed=(), added=(), moved=()):
        proc.update_state(BatchUpdate(size, list(removed), [(i, params(n), [1], []) for i, n in added], list(moved)))
        return router.request_prefix_index(size).tolist()

    assert update(4, added=[(0, "a"), (1, None), (2, "b"), (3, "a")]) == [0, -1, 1, 0]
    assert update(3, removed=[1], moved=[(3, 1, MoveDirectionality.UNIDIRECTIONAL)]) == [0, 0, 1]
    assert update(3, moved=[(0, 2, MoveDirectionality.SWAP)]) == [1, 0, 0]
    assert update(4, added=[(3, "b")]) == [1, 0, 0, 1]
    proc.update_state(None)  # no change this step
    assert router.request_prefix_index(4).tolist() == [1, 0, 0, 1]
    logits = torch.randn(4, 10)
    assert proc.apply(logits) is logits and proc.is_argmax_invariant()


def test_admission_checks_the_name():
    from vllm import SamplingParams

    cfg = plugin_config.PluginConfig(adapters=(("sql", "/x"), ("chat", "/y")))
    assert router.admit(cfg, SamplingParams()) is None
    assert router.admit(cfg, SamplingParams(extra_args={"prefix": "chat"})) == "chat"
    with pytest.raises(ValueError, match=r"unknown prefix 'SQL'; this server has \['sql', 'chat'\]"):
        router.admit(cfg, SamplingParams(extra_args={"prefix": "SQL"}))
    with pytest.raises(ValueError, match=r"expected a prefix name \(str\), got \['sql'\]"):
        router.admit(cfg, SamplingParams(extra_args={"prefix": ["sql"]}))


# -- start-up refusals (before any engine process) -------------------------------------------------------
def test_engine_start_refuses_a_bad_adapter_in_the_user_process(workdir, tokenizer_dir, llama):
    from vllm import LLM

    model_dir, adapters = llama
    other = helpers.save_tiny_model(str(workdir / "other-head-dim"), "llama", tokenizer_dir, head_dim=64)
    bad = helpers.make_adapters(other, str(workdir / "other-adapters-head-dim"))["flat"]
    with pytest.raises(ValueError, match=r"prefixattn adapter 'bad' \(.*\): head_dim: the adapter was made for 64"):
        LLM(
            model_dir,
            dtype="float32",
            additional_config={"prefixattn": {"adapters": {"ok": adapters["flat"], "bad": bad}}},
        )
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['adapter'\]"):
        LLM(model_dir, dtype="float32", additional_config={"prefixattn": {"adapter": adapters}})
