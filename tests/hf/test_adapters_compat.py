"""adapters (AdapterHub) prefix-tuning checkpoints: import gives the prefix K/V of adapters' own formulas and the
logits of a hand-concatenation oracle; bad checkpoints fail clearly and change nothing.

The `adapters` library pins transformers 4.57 and cannot be installed next to ours, so the checkpoints are
written here by hand following its format exactly (docs/hf.md, "adapters (AdapterHub)"): tensor names with the pool
duplicated under every attention module, the 1-D flat vector, gates, and the adapter_config.json layout."""

import copy
import json

import pytest
import torch
from hf_models import batch, build
from hf_oracle import ORACLE, set_impl

import prefixattn
from prefixattn import PrefixTuningConfig
from prefixattn.hf import get_flat_prefix, get_store

P, BOTTLENECK = 4, 12
TOL = 1e-5


def _sites(model):
    """{(location, global layer): attention module path} as adapters names the modules."""
    cfg = model.config
    if cfg.model_type == "llama":
        return {("self_prefix", i): f"model.layers.{i}.self_attn" for i in range(cfg.num_hidden_layers)}
    le, ld = cfg.encoder_layers, cfg.decoder_layers
    out = {("encoder_prefix", i): f"model.encoder.layers.{i}.self_attn" for i in range(le)}
    out.update({("self_prefix", le + i): f"model.decoder.layers.{i}.self_attn" for i in range(ld)})
    out.update({("cross_prefix", le + i): f"model.decoder.layers.{i}.encoder_attn" for i in range(ld)})
    return out


def _kv_shape(model):
    cfg = model.config
    if cfg.model_type == "llama":
        return cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads, cfg.hidden_size
    return cfg.encoder_attention_heads, cfg.d_model // cfg.encoder_attention_heads, cfg.d_model


def write_adapters_checkpoint(
    model,
    directory,
    *,
    name="ad",
    flat=False,
    leave_out=(),
    use_gating=False,
    shared_gating=True,
    encoder_prefix=True,
    cross_prefix=True,
    safetensors=False,
    saved_flat=None,
    seed=0,
):
    """Write what adapters 1.3.0's save_adapter writes for a prefix-tuning adapter; returns
    {location: (ordered layers, generator tensors)} and {module path: gate tensors} for the checks."""
    g = torch.Generator().manual_seed(seed)
    h, d, hidden = _kv_shape(model)
    sites = _sites(model)
    wanted = {"self_prefix": True, "encoder_prefix": encoder_prefix, "cross_prefix": cross_prefix}
    locs = {}
    for loc, layer in sites:
        if wanted[loc] and layer not in leave_out:
            locs.setdefault(loc, []).append(layer)
    gens = {}
    for loc, layers in locs.items():
        out = len(layers) * 2 * h * d
        if flat:
            gens[loc] = {"control_trans": torch.randn(P * out, generator=g)}
        else:
            gens[loc] = {
                "wte.weight": torch.randn(P, hidden, generator=g),
                "control_trans.0.weight": torch.randn(BOTTLENECK, hidden, generator=g) * 0.3,
                "control_trans.0.bias": torch.randn(BOTTLENECK, generator=g) * 0.1,
                "control_trans.2.weight": torch.randn(out, BOTTLENECK, generator=g) * 0.5,
                "control_trans.2.bias": torch.randn(out, generator=g) * 0.1,
            }
    state = {}
    pool_paths = ["model.prefix_tuning"] + [f"{path}.prefix_tuning.pool" for path in sites.values()]
    for pool in pool_paths:  # the pool is a submodule of every prefix-tuning layer: duplicated keys
        for loc, params in gens.items():
            for param, t in params.items():
                state[f"{pool}.prefix_tunings.{name}.{loc}.{param}"] = t.clone() if safetensors else t
    gates = {}
    if use_gating:
        for (loc, layer), path in sites.items():
            if loc in locs and layer in locs[loc]:
                k = 1 if shared_gating else 2
                gates[path] = {
                    "weight": torch.randn(k, hidden, generator=g) * 0.02,
                    "bias": torch.randn(k, generator=g),
                }
                for param, t in gates[path].items():
                    state[f"{path}.prefix_tuning.prefix_gates.{name}.{param}"] = t
    config = {
        "architecture": "prefix_tuning",
        "bottleneck_size": BOTTLENECK,
        "cross_prefix": cross_prefix,
        "dropout": 0.0,
        "encoder_prefix": encoder_prefix,
        "flat": flat if saved_flat is None else saved_flat,
        "init_weights_seed": None,
        "leave_out": list(leave_out),
        "non_linearity": "tanh",
        "prefix_length": P,
        "shared_gating": shared_gating,
        "use_gating": use_gating,
    }
    meta = {
        "config": config,
        "hidden_size": hidden,
        "model_class": type(model).__name__,
        "model_name": "",
        "model_type": model.config.model_type,
        "name": name,
        "version": "adapters.1.3.0",
    }
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "adapter_config.json").write_text(json.dumps(meta, indent=2))
    if safetensors:
        from safetensors.torch import save_file

        save_file(state, str(directory / "adapter.safetensors"))
    else:
        torch.save(state, str(directory / "pytorch_adapter.bin"))
    return {loc: (locs[loc], gens[loc]) for loc in locs}, gates


def adapters_kv(params, n_layers, h, d):
    """adapters' PrefixTuning / FlatPrefixTuning forward for batch 1, written out: -> [(K, V)] per layer,
    each [H, P, d]."""
    if "control_trans" in params:
        out = params["control_trans"].view(1, P, -1)
    else:
        x = params["wte.weight"].unsqueeze(0)  # embedding of arange(P), batch 1
        x = torch.tanh(x @ params["control_trans.0.weight"].T + params["control_trans.0.bias"])
        out = x @ params["control_trans.2.weight"].T + params["control_trans.2.bias"]
    kv = out.view(1, P, n_layers * 2, h, d).permute(2, 0, 3, 1, 4).split(2)
    return [(t[0, 0], t[1, 0]) for t in kv]


def _prepared(family, **overrides):
    model = build(family, **overrides)
    prefixattn.init(model)
    return model


@pytest.mark.parametrize("flat", [False, True])
@pytest.mark.parametrize("use_gating", [False, True])
def test_llama_gqa_leave_out(flat, use_gating, tmp_path):
    base = build("llama", num_hidden_layers=3)
    gens, gates = write_adapters_checkpoint(
        base, tmp_path / "ck", flat=flat, leave_out=[1], use_gating=use_gating, shared_gating=False
    )
    model = copy.deepcopy(base)
    prefixattn.init(model)
    name = prefixattn.load_adapters_prefix(model, str(tmp_path / "ck"), set_active=True)
    assert name == "ad"
    adapter = get_store(model).get("ad")
    assert adapter.rows == {"self_prefix": (0, 2)} and adapter.config.flat == flat
    _check_kv(model, gens)
    for path, params in gates.items():
        layer = int(path.split(".")[2])
        gate = adapter.gate("self_prefix", layer).linear
        assert torch.equal(gate.weight, params["weight"]) and torch.equal(gate.bias, params["bias"])
    assert adapter.gate("self_prefix", 1) is None
    if not use_gating:
        _check_logits_against_oracle(model, base, gens, "llama")


def _check_kv(model, gens):
    h, d, _ = _kv_shape(model)
    flat = get_flat_prefix(model, "ad")
    assert set(flat) == set(gens)
    for loc, (layers, params) in gens.items():
        for i, (k, v) in enumerate(adapters_kv(params, len(layers), h, d)):
            assert torch.allclose(flat[loc][i, 0], k, atol=1e-6) and torch.allclose(flat[loc][i, 1], v, atol=1e-6)


def _check_logits_against_oracle(model, base, gens, family):
    """prefixattn's logits equal a float64 hand concatenation of adapters' K/V (computed here, not by prefixattn)."""
    h, d, _ = _kv_shape(base)
    oracle = copy.deepcopy(base)
    set_impl(oracle, ORACLE)
    sites = _sites(base)
    for path in sites.values():
        oracle.get_submodule(path).__dict__["_oracle_prefix"] = None
    for loc, (layers, params) in gens.items():
        for layer, kv in zip(layers, adapters_kv(params, len(layers), h, d)):
            oracle.get_submodule(sites[(loc, layer)]).__dict__["_oracle_prefix"] = kv
    kw, real = batch(family)
    frame = {}  # the oracle is no prefixattn model: give it the positions prefixattn takes from the mask
    if not base.config.is_encoder_decoder:
        mask = kw["attention_mask"]
        frame = {"position_ids": (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)}
    with torch.no_grad():
        out, ref, plain = model(**kw).logits, oracle(**kw, **frame).logits, base(**kw, **frame).logits
    assert (out - ref)[real].abs().max().item() <= TOL * max(1.0, ref[real].abs().max().item())
    assert (plain - ref)[real].abs().max().item() > 1e-2


@pytest.mark.parametrize("flat", [False, True])
def test_bart_all_three_locations(flat, tmp_path):
    base = build("bart")
    gens, _ = write_adapters_checkpoint(base, tmp_path / "ck", flat=flat, safetensors=flat)
    model = copy.deepcopy(base)
    prefixattn.init(model)
    prefixattn.load_adapters_prefix(model, str(tmp_path / "ck"), "mine", set_active=True)
    adapter = get_store(model).get("mine")
    assert adapter.rows == {"encoder_prefix": (0, 1), "self_prefix": (2, 3), "cross_prefix": (2, 3)}
    flat_now = get_flat_prefix(model, "mine")
    h, d, _ = _kv_shape(base)
    for loc, (layers, params) in gens.items():
        for i, (k, v) in enumerate(adapters_kv(params, len(layers), h, d)):
            assert torch.allclose(flat_now[loc][i, 0], k, atol=1e-6)
            assert torch.allclose(flat_now[loc][i, 1], v, atol=1e-6)
    _check_logits_against_oracle(model, base, gens, "bart")


def test_ejected_adapter_saved_with_flat_false_reads_as_flat(tmp_path):
    # adapters' eject keeps "flat": false in the config next to a flat vector (docs/design.md, a bug
    # there: its own loader then silently rebuilds an MLP). The tensors decide here.
    base = build("llama")
    gens, _ = write_adapters_checkpoint(base, tmp_path / "ck", flat=True, saved_flat=False)
    model = _prepared("llama")
    prefixattn.load_adapters_prefix(model, str(tmp_path / "ck"), set_active=True)
    assert get_store(model).get("ad").config.flat
    assert "eject" in get_store(model).get("ad").metadata["note"]
    _check_kv(model, gens)


def test_imported_adapter_saves_and_reloads_exactly(tmp_path):
    base = build("llama")
    write_adapters_checkpoint(base, tmp_path / "ck", use_gating=True)
    model = copy.deepcopy(base)
    prefixattn.init(model)
    prefixattn.load_adapters_prefix(model, str(tmp_path / "ck"), set_active=True)
    model.save_adapter(str(tmp_path / "pa"), "ad")
    other = copy.deepcopy(base)
    prefixattn.init(other)
    other.load_adapter(str(tmp_path / "pa"), set_active=True)
    kw, _ = batch("llama")
    with torch.no_grad():
        assert torch.equal(model(**kw).logits, other(**kw).logits)


# -- bad checkpoints -------------------------------------------------------------------------------------
def _corrupt(case, tmp_path):
    ck = tmp_path / "ck"
    if case == "other_model":
        write_adapters_checkpoint(build("bart"), ck)
        return ck
    if case == "kv_width":  # same model type, 4 KV heads instead of 2
        write_adapters_checkpoint(build("llama", num_key_value_heads=4), ck, flat=True)
        return ck
    if case == "layers":
        write_adapters_checkpoint(build("llama", num_hidden_layers=3), ck)
        return ck
    write_adapters_checkpoint(build("llama"), ck, use_gating=True)
    cfg_file, weights = ck / "adapter_config.json", ck / "pytorch_adapter.bin"
    meta = json.loads(cfg_file.read_text())
    if case == "architecture":
        meta["config"]["architecture"] = "lora"
    elif case == "unknown_field":
        meta["config"]["prefix_mode"] = "x"
    elif case == "truncated":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    elif case == "no_weights":
        weights.unlink()
    elif case == "bad_gate":
        state = torch.load(str(weights), weights_only=True)
        state["model.layers.9.self_attn.prefix_tuning.prefix_gates.ad.weight"] = torch.zeros(1, 32)
        torch.save(state, str(weights))
    elif case == "disagreeing_copies":
        state = torch.load(str(weights), weights_only=True)
        key = next(k for k in state if ".pool." in k and k.endswith("wte.weight"))
        state[key] = state[key] + 1
        torch.save(state, str(weights))
    elif case == "missing_tensor":
        state = torch.load(str(weights), weights_only=True)
        state = {k: v for k, v in state.items() if not k.endswith("control_trans.2.bias")}
        torch.save(state, str(weights))
    elif case == "peft":
        meta = {"peft_type": "PREFIX_TUNING"}
    cfg_file.write_text(json.dumps(meta))
    return ck


@pytest.mark.parametrize(
    "case,error,match",
    [
        ("other_model", ValueError, "made for BartForConditionalGeneration"),
        ("kv_width", ValueError, "expected a vector of"),
        ("layers", ValueError, "shape"),
        ("architecture", ValueError, "architecture 'lora'"),
        ("unknown_field", ValueError, "prefix_mode"),
        ("truncated", ValueError, "truncated or corrupt"),
        ("no_weights", FileNotFoundError, "no weights file"),
        ("bad_gate", ValueError, "gate at 'model.layers.9.self_attn'"),
        ("disagreeing_copies", ValueError, "disagree"),
        ("missing_tensor", ValueError, "control_trans.2.bias"),
        ("peft", ValueError, "load_peft_prefix"),
    ],
)
def test_bad_checkpoints_fail_clearly_and_change_nothing(case, error, match, tmp_path):
    ck = _corrupt(case, tmp_path)
    model = _prepared("llama")
    model.add_adapter("keep", config=PrefixTuningConfig(prefix_length=2, bottleneck_size=8), set_active=True)
    names, state = get_store(model).names(), {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=match):
        prefixattn.load_adapters_prefix(model, str(ck), set_active=True)
    assert get_store(model).names() == names and get_store(model).active == ["keep"]
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)


# -- a checkpoint written by the real adapters 1.3.0 -------------------------------------------------------
def test_real_adapters_130_checkpoint(tmp_path):
    """tests/hf/fixtures/adapters130_llama: written by adapters 1.3.0 on transformers 4.57.6 (GQA Llama,
    leave_out=[1], separate K/V gates, MLP form) with its eager forward logits; make_adapters_fixture.py
    regenerates it."""
    import os

    import transformers as tf

    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "adapters130_llama")
    ref = torch.load(os.path.join(here, "reference.pt"), weights_only=True)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**ref["config"])).eval()
    model.load_state_dict(ref["base_state"])
    prefixattn.init(model)
    assert prefixattn.load_adapters_prefix(model, here, set_active=True) == "real"
    assert get_store(model).get("real").rows == {"self_prefix": (0, 2)}
    with torch.no_grad():
        out = model(input_ids=ref["input_ids"]).logits
    assert (out - ref["logits"]).abs().max().item() <= TOL
    assert (ref["plain"] - ref["logits"]).abs().max().item() > 0.1
