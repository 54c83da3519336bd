"""PEFT prefix-tuning checkpoints: import reproduces PEFT's forward logits, export loads in PEFT with the same
logits, and bad checkpoints fail clearly without changing the model. The reference is real PEFT (0.21)
running the same tiny base model: its FORWARD, never its generate (broken on transformers 5: docs/design.md,
"Other prefix-tuning libraries")."""

import copy
import json
import os

import pytest
import torch
from hf_models import ENC_DEC, batch, build

import prefixattn
from prefixattn import PrefixTuningConfig
from prefixattn.hf import get_flat_prefix, get_store

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")

P = 3
TOL = 1e-5  # fp32, relative to the logit scale (max |logit|, at least 1): BART's logits reach ~4 here and its own
# fp32 forward differs from a float64 one by ~3e-6, so two fp32 computations can differ by ~1e-5 absolute.


def _max_diff(out, ref, real) -> float:
    """Max |out - ref| over real positions, in units of the logit scale."""
    return (out - ref)[real].abs().max().item() / max(1.0, ref[real].abs().max().item())


def _peft_model(base, p=P, projection=False, seed=0):
    task = "SEQ_2_SEQ_LM" if base.config.is_encoder_decoder else "CAUSAL_LM"
    cfg = peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=p, prefix_projection=projection)
    pm = peft.get_peft_model(copy.deepcopy(base), cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for prm in pm.prompt_encoder.parameters():
            prm.copy_(torch.randn(prm.shape, generator=g) * (0.3 if projection else 1.0))
    return pm.eval()


def _saved_peft(tmp_path, family, projection=False, **overrides):
    base = build(family, **overrides)
    pm = _peft_model(base, projection=projection)
    path = str(tmp_path / "peft")
    pm.save_pretrained(path)
    return base, pm, path


def _imported(base, path, **kw):
    model = copy.deepcopy(base)
    prefixattn.init(model)
    prefixattn.load_peft_prefix(model, path, "imp", set_active=True, **kw)
    return model


def _logits(model, kw):
    if isinstance(model, peft.PeftModel) and not model.config.is_encoder_decoder:
        # PEFT's forward counts positions from the first column, padding included; prefixattn's prefixed forward
        # takes them from the mask as generate() does. Give PEFT those positions (it adds P itself).
        mask = kw["attention_mask"]
        kw = {**kw, "position_ids": (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)}
    with torch.no_grad():
        return model(**kw).logits


def _snapshot(model):
    store = get_store(model)
    return store.names(), list(store.active), {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model, snap):
    names, active, state = snap
    store = get_store(model)
    assert store.names() == names and store.active == active
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)


# -- import: forward logits ------------------------------------------------------------------------------
@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gpt2", "bart", "t5"])
def test_import_reproduces_peft_forward(family, projection, tmp_path):
    # llama: GQA 4q/2kv; mistral: explicit head_dim 16 != 32/4; padded batches (left padding for decoders,
    # padded encoder inputs and a right-padded decoder for BART / T5).
    base, pm, path = _saved_peft(tmp_path, family, projection)
    model = _imported(base, path)
    kw, real = batch(family)
    ref = _logits(pm, kw)
    out = _logits(model, kw)
    assert _max_diff(out, ref, real) <= TOL
    assert (_logits(base, kw) - ref)[real].abs().max().item() > 0.05  # the prefix matters: the test can fail


@pytest.mark.parametrize("family", ["llama", "gpt2", "t5"])
def test_position_conversion_is_what_makes_it_exact(family, tmp_path):
    # Taking PEFT's prefix as it is (prefixattn's frame) must differ: rotation / offset / prefix bias matter.
    base, pm, path = _saved_peft(tmp_path, family)
    kw, real = batch(family)
    raw = _imported(base, path, positions="prefixattn")
    assert (_logits(raw, kw) - _logits(pm, kw))[real].abs().max().item() > 1e-3
    meta = get_store(raw).get("imp").metadata
    assert meta["positions"] == "prefixattn" and "position_offset" not in meta


def test_rope_keys_rotated_by_minus_p_values_unchanged(tmp_path):
    base, pm, path = _saved_peft(tmp_path, "llama")
    raw = _imported(base, path, positions="prefixattn")
    conv = _imported(base, path)
    a, b = get_flat_prefix(raw, "imp")["self_prefix"], get_flat_prefix(conv, "imp")["self_prefix"]
    assert torch.equal(a[:, 1], b[:, 1])
    # Independent rotation: theta_j = base^(-2j/D), angle -P*theta_j, rotate_half convention.
    d = a.shape[-1]
    theta = 1.0 / (base.config.rope_parameters["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    ang = torch.cat([theta, theta]) * -P
    k = a[:, 0].double()
    rot = k * ang.cos() + torch.cat([-k[..., d // 2 :], k[..., : d // 2]], -1) * ang.sin()
    assert torch.allclose(b[:, 0].double(), rot, atol=1e-6)
    assert get_store(conv).get("imp").metadata["positions"] == "peft"


@pytest.mark.parametrize("n_layers", [3, 4])
def test_seq2seq_slot_mapping_matches_peft_get_prompt(n_layers, tmp_path):
    # PEFT's cat([pkv, pkv]).split(4): decoder layer l reads slots (4l mod 2n, 4l+1 mod 2n); check it against
    # the cache PEFT itself builds, for an odd and an even layer count.
    base, pm, path = _saved_peft(tmp_path, "bart", encoder_layers=n_layers, decoder_layers=n_layers)
    model = _imported(base, path)
    ours = get_flat_prefix(model, "imp")["self_prefix"]
    cache = pm.get_prompt(1).self_attention_cache
    for layer in range(n_layers):
        assert torch.equal(ours[layer, 0], cache.layers[layer].keys[0].float())
        assert torch.equal(ours[layer, 1], cache.layers[layer].values[0].float())
    assert set(get_store(model).get("imp").rows) == {"self_prefix"}  # no encoder / cross prefix
    kw, real = batch("bart")
    assert _max_diff(_logits(model, kw), _logits(pm, kw), real) <= TOL


def test_imported_offset_survives_save_and_load(tmp_path):
    base, pm, path = _saved_peft(tmp_path, "gpt2")
    model = _imported(base, path)
    assert get_store(model).get("imp").metadata["position_offset"] == P
    model.save_adapter(str(tmp_path / "pa"), "imp")
    fresh = copy.deepcopy(base)
    prefixattn.init(fresh)
    fresh.load_adapter(str(tmp_path / "pa"), set_active=True)
    kw, real = batch("gpt2")
    assert _max_diff(_logits(fresh, kw), _logits(pm, kw), real) <= TOL


def _greedy_peft(pm, kw, steps):
    """Greedy decoding by PEFT forwards on the whole sequence (generate()'s position ids for decoders).
    Returns (tokens, [B, steps, V] last-position logits of each step)."""
    enc_dec = pm.config.is_encoder_decoder
    ids, mask = kw["input_ids"], kw["attention_mask"]
    dec = torch.full((ids.shape[0], 1), pm.config.decoder_start_token_id) if enc_dec else None
    scores = []
    for _ in range(steps):
        with torch.no_grad():
            if enc_dec:
                logits = pm(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits[:, -1]
            else:
                pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
                logits = pm(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1]
        scores.append(logits)
        nxt = logits.argmax(-1, keepdim=True)
        if enc_dec:
            dec = torch.cat([dec, nxt], dim=1)
        else:
            ids = torch.cat([ids, nxt], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return (dec if enc_dec else ids), torch.stack(scores, dim=1)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bart", "t5"])
def test_generate_matches_step_by_step_peft(family, tmp_path):
    # Cached decoding exercises the offsets and T5's prefix bias with past tokens (queries at past + i).
    base, pm, path = _saved_peft(tmp_path, family)
    model = _imported(base, path)
    kw, _ = batch(family)
    kw = {k: kw[k] for k in ("input_ids", "attention_mask")}
    steps = 5
    want, want_logits = _greedy_peft(pm, kw, steps)
    gen = dict(
        max_new_tokens=steps, min_new_tokens=steps, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    with torch.no_grad():
        got = model.generate(**kw, **gen)
        plain = base.generate(**kw, **gen)
    assert torch.equal(got.sequences, want)
    every = torch.ones(want_logits.shape[:2], dtype=torch.bool)
    assert _max_diff(torch.stack(got.logits, dim=1), want_logits, every) <= TOL
    assert _max_diff(torch.stack(plain.logits, dim=1), want_logits, every) > 1e-2  # the prefix matters


# -- export ----------------------------------------------------------------------------------------------
def _peft_from(base, path):
    return peft.PeftModel.from_pretrained(copy.deepcopy(base), path).eval()


@pytest.mark.parametrize(
    "family,overrides",
    [
        ("llama", {}),
        ("mistral", {}),
        ("gpt2", {}),
        ("bart", {"encoder_layers": 3, "decoder_layers": 3}),
        ("t5", {"num_layers": 3, "num_decoder_layers": 3}),
    ],
)
def test_export_loads_in_peft_with_the_same_logits(family, overrides, tmp_path):
    base = build(family, **overrides)
    model = copy.deepcopy(base)
    prefixattn.init(model)
    enc_dec = family in ENC_DEC
    meta = {"position_offset": P} if family in ("gpt2", "bart", "t5") else None
    cfg = PrefixTuningConfig(prefix_length=P, bottleneck_size=16, encoder_prefix=False, cross_prefix=False)
    model.add_adapter("a", config=cfg, set_active=True, metadata=meta)
    with torch.no_grad():
        for prm in get_store(model).get("a").parameters():
            prm.normal_(0, 0.5)
    nbytes = prefixattn.save_peft_prefix(model, "a", str(tmp_path / "out"))
    assert nbytes > 0
    with open(tmp_path / "out" / "adapter_config.json") as f:
        assert json.load(f)["num_transformer_submodules"] == (2 if enc_dec else 1)
    pm = _peft_from(base, str(tmp_path / "out"))
    kw, real = batch(family)
    assert _max_diff(_logits(model, kw), _logits(pm, kw), real) <= TOL


def test_import_export_round_trip_keeps_prompt_embeddings(tmp_path):
    from safetensors.torch import load_file

    base, pm, path = _saved_peft(tmp_path, "llama", projection=True)
    model = _imported(base, path)
    prefixattn.save_peft_prefix(model, "imp", str(tmp_path / "back"))
    a = load_file(os.path.join(path, "adapter_model.safetensors"))["prompt_embeddings"]
    b = load_file(str(tmp_path / "back" / "adapter_model.safetensors"))["prompt_embeddings"]
    assert a.shape == b.shape and torch.allclose(a, b, atol=1e-6)
    kw, real = batch("llama")
    assert _max_diff(_logits(_peft_from(base, str(tmp_path / "back")), kw), _logits(pm, kw), real) <= TOL


def test_export_even_seq2seq_from_peft_import_works(tmp_path):
    # PEFT shares one prefix between decoder layers l and l+n/2 when n is even: an imported adapter has that
    # structure and exports; a free one does not (next test).
    base, pm, path = _saved_peft(tmp_path, "bart")
    model = _imported(base, path)
    prefixattn.save_peft_prefix(model, "imp", str(tmp_path / "back"))
    kw, real = batch("bart")
    assert _max_diff(_logits(_peft_from(base, str(tmp_path / "back")), kw), _logits(pm, kw), real) <= TOL


@pytest.mark.parametrize(
    "case,match",
    [
        ("gpt2_no_offset", "learned absolute positions"),
        ("gating", "gating"),
        ("leave_out", "leaves out layers"),
        ("bart_encoder_prefix", "encoder_prefix"),
        ("bart_even_layers", "same prefix"),
        ("bad_positions", "positions"),
    ],
)
def test_export_refuses_what_peft_cannot_hold(case, match, tmp_path):
    family = "gpt2" if case.startswith("gpt2") else "bart" if case.startswith("bart") else "llama"
    model = build(family)
    prefixattn.init(model)
    cfg = dict(prefix_length=P, bottleneck_size=8, encoder_prefix=False, cross_prefix=False)
    meta = {"position_offset": P} if family != "llama" and case != "gpt2_no_offset" else None
    if case == "gating":
        cfg["use_gating"] = True
    if case == "leave_out":
        cfg["leave_out"] = [1]
    if case == "bart_encoder_prefix":
        cfg["encoder_prefix"] = True
    model.add_adapter("a", config=PrefixTuningConfig(**cfg), metadata=meta)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=match):
        prefixattn.save_peft_prefix(model, "a", str(out), positions="nope" if case == "bad_positions" else "peft")
    assert not out.exists()


# -- bad checkpoints -------------------------------------------------------------------------------------
def _bad_checkpoint(case, tmp_path):
    """A checkpoint made wrong in one way, for a 2-layer GQA llama (or None: the path to give)."""
    if case == "lora":
        base = build("llama")
        pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["q_proj"]))
        pm.save_pretrained(str(tmp_path / "c"))
    elif case == "layers":
        _peft_model(build("llama", num_hidden_layers=3)).save_pretrained(str(tmp_path / "c"))
    elif case == "kv_width":
        _peft_model(build("llama", num_key_value_heads=4)).save_pretrained(str(tmp_path / "c"))
    elif case == "seq2seq":
        _peft_model(build("bart")).save_pretrained(str(tmp_path / "c"))
    else:
        _peft_model(build("llama")).save_pretrained(str(tmp_path / "c"))
        weights = tmp_path / "c" / "adapter_model.safetensors"
        cfg_file = tmp_path / "c" / "adapter_config.json"
        if case == "truncated":
            data = weights.read_bytes()
            weights.write_bytes(data[: len(data) - 40])
        elif case == "no_weights":
            weights.unlink()
        elif case == "no_config":
            cfg_file.unlink()
        elif case == "bad_json":
            cfg_file.write_text("{not json")
        elif case == "shape":
            cfg = json.loads(cfg_file.read_text())
            cfg["num_virtual_tokens"] = P + 1
            cfg_file.write_text(json.dumps(cfg))
        elif case == "missing_dir":
            return str(tmp_path / "nowhere")
    return str(tmp_path / "c")


@pytest.mark.parametrize(
    "case,error,match",
    [
        ("lora", ValueError, "peft_type 'LORA'"),
        ("layers", ValueError, "num_layers=3"),
        ("kv_width", ValueError, "num_attention_heads=4"),
        ("seq2seq", ValueError, "num_transformer_submodules=2"),
        ("truncated", ValueError, "truncated or corrupt"),
        ("no_weights", FileNotFoundError, "no weights file"),
        ("no_config", FileNotFoundError, "no adapter_config.json"),
        ("bad_json", ValueError, "not valid JSON"),
        ("shape", ValueError, "prompt_embeddings has shape"),
        ("missing_dir", FileNotFoundError, "not a directory"),
    ],
)
def test_bad_checkpoints_fail_clearly_and_change_nothing(case, error, match, tmp_path):
    path = _bad_checkpoint(case, tmp_path)
    model = build("llama")
    prefixattn.init(model)
    model.add_adapter("keep", config=PrefixTuningConfig(prefix_length=2, bottleneck_size=8), set_active=True)
    snap = _snapshot(model)
    with pytest.raises(error, match=match):
        prefixattn.load_peft_prefix(model, path, "imp", set_active=True)
    _assert_unchanged(model, snap)


def test_name_and_positions_are_checked_first(tmp_path):
    base, _, path = _saved_peft(tmp_path, "llama")
    model = _imported(base, path)
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="already exists"):
        prefixattn.load_peft_prefix(model, path, "imp")
    with pytest.raises(ValueError, match="positions"):
        prefixattn.load_peft_prefix(model, path, "other", positions="rope")
    with pytest.raises(ValueError, match="prefixattn.init"):
        prefixattn.load_peft_prefix(copy.deepcopy(base), path, "x")
    _assert_unchanged(model, snap)


def test_dynamic_rope_is_refused(tmp_path):
    _, _, path = _saved_peft(tmp_path, "llama")
    model = build("llama", rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    prefixattn.init(model)
    with pytest.raises(ValueError, match="dynamic"):
        prefixattn.load_peft_prefix(model, path, "imp")
    assert get_store(model).names() == []


# -- position offsets with several adapters ----------------------------------------------------------------
def test_mixed_position_offsets_in_one_batch_raise(tmp_path):
    base, pm, path = _saved_peft(tmp_path, "gpt2")
    model = _imported(base, path)
    model.add_adapter("plain", config=PrefixTuningConfig(prefix_length=2, bottleneck_size=8))
    model.set_active_adapters(["imp", "plain"])
    kw, real = batch("gpt2")
    with pytest.raises(ValueError, match="position"):
        model(**kw, prefix_choice=["imp", "plain", "imp"])
    # One offset for the whole batch is fine, and matches PEFT.
    out = _logits_choice(model, kw, ["imp", "imp", "imp"])
    assert _max_diff(out, _logits(pm, kw), real) <= TOL


def _logits_choice(model, kw, choice):
    with torch.no_grad():
        return model(**kw, prefix_choice=choice).logits


def test_t5_peft_frame_needs_a_single_adapter(tmp_path):
    base, pm, path = _saved_peft(tmp_path, "t5")
    model = _imported(base, path)
    model.add_adapter(
        "plain",
        config=PrefixTuningConfig(prefix_length=2, bottleneck_size=8, encoder_prefix=False, cross_prefix=False),
        metadata={"position_offset": P},
    )
    model.set_active_adapters(["imp", "plain"])
    kw, _ = batch("t5")
    with pytest.raises(ValueError, match="single active adapter"):
        model(**kw, prefix_choice=["imp", "plain", "imp"])


# -- the kernels ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter test is for CPU runs")
def test_t5_peft_frame_through_the_triton_interpreter(tmp_path):
    # T5 in PEFT's frame hands the kernel the prefix as leading sequence keys with a bias on every column and
    # bottom-right causal alignment over P + S keys. Head dim 16: tl.dot needs dimensions >= 16.
    base, pm, path = _saved_peft(tmp_path, "t5", d_model=64, d_kv=16)  # PEFT needs heads * d_kv == d_model
    model = _imported(base, path)
    prefixattn.init(model, backend="triton")
    kw, real = batch("t5", b=2, s=5)
    assert _max_diff(_logits(model, kw), _logits(pm, kw), real) <= 1e-4  # fp32 kernel vs PEFT's sdpa


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama", "gpt2", "bart", "t5"])
def test_import_on_gpu_kernels_matches_peft(family, tmp_path):
    base, pm, path = _saved_peft(tmp_path, family)
    model = _imported(base, path).cuda()
    pm = pm.cuda()
    kw, real = batch(family)
    kw = {k: v.cuda() for k, v in kw.items()}
    out, ref = _logits(model, kw), _logits(pm, kw)  # backend "auto": the kernels
    real = real.cuda()
    assert _max_diff(out, ref, real) <= 2e-3  # fp32 on the kernels (TF32-free tolerance of tests/helpers.py)


@pytest.mark.parametrize(
    "family,offset,match",
    [("llama", 3, "no position offset"), ("gpt2", -1, "non-negative"), ("gpt2", "3", "non-negative")],
)
def test_position_offset_metadata_is_checked(family, offset, match):
    model = build(family)
    prefixattn.init(model)
    with pytest.raises(ValueError, match=match):
        model.add_adapter(
            "a", config=PrefixTuningConfig(prefix_length=2, bottleneck_size=8), metadata={"position_offset": offset}
        )
    assert get_store(model).names() == []


def test_sliding_window_import_warns(tmp_path):
    base, pm, path = _saved_peft(tmp_path, "mistral", sliding_window=6)
    model = copy.deepcopy(base)
    prefixattn.init(model)
    with pytest.warns(UserWarning, match="sliding window of 6"):
        prefixattn.load_peft_prefix(model, path, "imp", set_active=True)
    # While PEFT's prefix is inside its window (window - P = 3 tokens) the logits still match; after that, not.
    ids = torch.randint(3, 90, (2, 6), generator=torch.Generator().manual_seed(3))
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
    out, ref = _logits(model, kw), _logits(pm, kw)
    inside = torch.zeros(ids.shape, dtype=torch.bool)
    inside[:, :3] = True
    assert _max_diff(out, ref, inside) <= TOL
    assert _max_diff(out, ref, ~inside) > 1e-3
