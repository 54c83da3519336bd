"""transformers Trainer and TRL SFTTrainer with adapter_checkpoints: checkpoints hold the trained adapters (in
prefixattn's format) and an optimizer over their parameters only, and resuming from a checkpoint in a freshly
built model continues bit for bit."""

import os

import pytest
import torch
import transformers
from hf_models import VOCAB, build

import prefixattn
from prefixattn import PrefixTuningConfig
from prefixattn.hf import adapter_checkpoints, get_store
from prefixattn.tuning import CONFIG_NAME, WEIGHTS_NAME

STEPS, STOP = 6, 3
# dropout on the prefix makes the run depend on the RNG state, which resuming must restore too
CONFIG = PrefixTuningConfig(prefix_length=4, bottleneck_size=16, dropout=0.1)
FULL_MODEL_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")


def _prepared(adapter_seed: int):
    """A fresh model as a new process would build it; the adapter's initial values depend on adapter_seed."""
    model = build("llama")
    prefixattn.init(model)
    torch.manual_seed(adapter_seed)
    model.add_adapter("a", config=CONFIG)
    model.train_adapter("a")
    return model


def _examples(n=10, s=8):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, VOCAB, (n, s), generator=g)
    return [{"input_ids": row, "attention_mask": torch.ones(s, dtype=torch.long), "labels": row} for row in ids]


def _args(out, **kw):
    return dict(
        output_dir=str(out),
        max_steps=STEPS,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        save_steps=STOP,
        logging_steps=1,
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
        seed=7,
        **kw,
    )


def _train_trainer(out, adapter_seed, resume=None):
    model = _prepared(adapter_seed)
    trainer = transformers.Trainer(
        model=model, args=transformers.TrainingArguments(**_args(out)), train_dataset=_examples()
    )
    adapter_checkpoints(trainer)
    trainer.train(resume_from_checkpoint=resume)
    return model, trainer


def _losses(trainer):
    return [(h["step"], h["loss"], h["grad_norm"]) for h in trainer.state.log_history if "loss" in h]


def _adapter_state(model):
    return {k: v.detach().clone() for k, v in get_store(model).get("a").state_dict().items()}


def _assert_adapter_only(folder, model):
    names = os.listdir(folder)
    assert not set(names) & set(FULL_MODEL_FILES), names
    weights = [os.path.join(r, f) for r, _, fs in os.walk(folder) for f in fs if f.endswith((".safetensors", ".bin"))]
    weights = [w for w in weights if not w.endswith("training_args.bin")]
    assert weights == [os.path.join(folder, "a", WEIGHTS_NAME)]
    assert os.path.isfile(os.path.join(folder, "a", CONFIG_NAME))
    adapter_numel = sum(p.numel() for p in get_store(model).get("a").parameters())
    model_numel = sum(p.numel() for p in model.parameters())
    assert model_numel > 10 * adapter_numel  # the test only means something if the model dwarfs the adapter
    from safetensors.torch import load_file

    assert sum(t.numel() for t in load_file(weights[0]).values()) == adapter_numel
    if os.path.exists(os.path.join(folder, "optimizer.pt")):  # Adam: two moments per adapter parameter
        opt = torch.load(os.path.join(folder, "optimizer.pt"), weights_only=True)
        moments = [t for s in opt["state"].values() for k, t in s.items() if k in ("exp_avg", "exp_avg_sq")]
        assert sum(t.numel() for t in moments) == 2 * adapter_numel


def _assert_same_run(straight, resumed):
    model_a, trainer_a = straight
    model_b, trainer_b = resumed
    state_a, state_b = _adapter_state(model_a), _adapter_state(model_b)
    assert state_a.keys() == state_b.keys()
    for k in state_a:
        assert torch.equal(state_a[k], state_b[k]), k
    losses_a, losses_b = _losses(trainer_a), _losses(trainer_b)
    assert [s for s, *_ in losses_a] == list(range(1, STEPS + 1))
    assert losses_b == losses_a  # steps 1..STOP come from the checkpoint's trainer_state, the rest were rerun


def _assert_eject_save_load(trainer, tmp_path):
    """The trained adapter ejects, saves and loads into a fresh model with identical logits."""
    # with mixed precision, accelerate leaves the model's forward wrapped in autocast; this takes the wrapper off
    model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(9))
    model.eval()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    model.eject_prefix_tuning("a")
    model.save_adapter(str(tmp_path / "ejected"), "a")
    fresh = build("llama")
    prefixattn.init(fresh)
    fresh.load_adapter(str(tmp_path / "ejected"), set_active=True)
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, before)
        assert not torch.equal(build("llama")(input_ids=ids).logits, before)  # the prefix does change the output


def test_trainer_checkpoints_hold_only_the_adapter_and_resume_exactly(tmp_path):
    straight = _train_trainer(tmp_path / "straight", adapter_seed=0)
    checkpoint = tmp_path / "straight" / f"checkpoint-{STOP}"
    _assert_adapter_only(str(checkpoint), straight[0])
    resumed = _train_trainer(tmp_path / "resumed", adapter_seed=1, resume=str(checkpoint))
    _assert_same_run(straight, resumed)

    model, trainer = straight
    trainer.save_model(str(tmp_path / "final"))
    _assert_adapter_only(str(tmp_path / "final"), model)
    fresh = build("llama")
    prefixattn.init(fresh)
    fresh.load_adapter(str(tmp_path / "final" / "a"))
    loaded, trained = get_store(fresh).get("a").state_dict(), _adapter_state(model)
    assert all(torch.equal(loaded[k], trained[k]) for k in trained)
    _assert_eject_save_load(trainer, tmp_path)


def test_resuming_without_the_checkpoint_of_a_trained_adapter_fails_clearly(tmp_path):
    _, trainer = _train_trainer(tmp_path / "run", adapter_seed=0)
    checkpoint = tmp_path / "run" / f"checkpoint-{STOP}"
    model = build("llama")
    prefixattn.init(model)
    model.add_adapter("b", config=CONFIG)
    model.add_adapter("a", config=CONFIG)
    model.train_adapter(["a", "b"])
    other = transformers.Trainer(
        model=model, args=transformers.TrainingArguments(**_args(tmp_path / "other")), train_dataset=_examples()
    )
    adapter_checkpoints(other)
    with pytest.raises(ValueError, match=r"no checkpoint of the trained adapter\(s\) \['b'\]"):
        other.train(resume_from_checkpoint=str(checkpoint))


def test_adapter_checkpoints_refuses_what_it_cannot_checkpoint(tmp_path):
    model = build("llama")
    prefixattn.init(model)
    model.add_adapter("a", config=CONFIG)
    args = transformers.TrainingArguments(**_args(tmp_path))
    with pytest.raises(ValueError, match=r"outside the prefix adapters are trainable \(model.embed_tokens.weight, "):
        adapter_checkpoints(transformers.Trainer(model=model, args=args, train_dataset=_examples()))
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no adapter is being trained"):
        adapter_checkpoints(transformers.Trainer(model=model, args=args, train_dataset=_examples()))
    model.train_adapter("a", train_embeddings=True)
    with pytest.raises(ValueError, match=r"outside the prefix adapters are trainable \(model.embed_tokens.weight\)"):
        adapter_checkpoints(transformers.Trainer(model=model, args=args, train_dataset=_examples()))
    with pytest.raises(TypeError, match="expected a transformers Trainer"):
        adapter_checkpoints(model)


# -- TRL ---------------------------------------------------------------------------------------------------
def _word_tokenizer():
    """A whitespace word-level tokenizer over the tiny model's vocabulary: w3 .. w95, no download."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def _train_sft(out, adapter_seed, resume=None):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    g = torch.Generator().manual_seed(5)
    texts = [" ".join(f"w{int(i)}" for i in torch.randint(3, VOCAB, (7,), generator=g)) for _ in range(10)]
    model = _prepared(adapter_seed)
    # TRL's defaults stay on: gradient checkpointing (non-reentrant) and bf16 autocast
    config = trl.SFTConfig(**_args(out), max_length=16)
    trainer = trl.SFTTrainer(
        model=model,
        args=config,
        train_dataset=datasets.Dataset.from_dict({"text": texts}),
        processing_class=_word_tokenizer(),
    )
    adapter_checkpoints(trainer)
    trainer.train(resume_from_checkpoint=resume)
    return model, trainer


def test_sft_trainer_checkpoints_hold_only_the_adapter_and_resume_exactly(tmp_path):
    straight = _train_sft(tmp_path / "straight", adapter_seed=0)
    assert straight[1].args.gradient_checkpointing and straight[1].args.bf16
    checkpoint = tmp_path / "straight" / f"checkpoint-{STOP}"
    _assert_adapter_only(str(checkpoint), straight[0])
    assert os.path.isfile(checkpoint / "tokenizer.json")
    resumed = _train_sft(tmp_path / "resumed", adapter_seed=1, resume=str(checkpoint))
    _assert_same_run(straight, resumed)
    _assert_eject_save_load(straight[1], tmp_path)


def test_load_best_model_at_end_reloads_the_best_checkpoints_adapter(tmp_path):
    model = _prepared(0)
    args = _args(tmp_path, eval_strategy="steps", eval_steps=STOP, load_best_model_at_end=True)
    # "best" = the highest eval loss, i.e. the earlier checkpoint, so the reload visibly changes the adapter
    args.update(metric_for_best_model="loss", greater_is_better=True)
    trainer = transformers.Trainer(
        model=model, args=transformers.TrainingArguments(**args), train_dataset=_examples(), eval_dataset=_examples()
    )
    adapter_checkpoints(trainer)
    trainer.train()
    assert trainer.state.best_model_checkpoint == str(tmp_path / f"checkpoint-{STOP}")
    from safetensors.torch import load_file

    best = load_file(str(tmp_path / f"checkpoint-{STOP}" / "a" / WEIGHTS_NAME))
    last = load_file(str(tmp_path / f"checkpoint-{STEPS}" / "a" / WEIGHTS_NAME))
    state = _adapter_state(model)
    assert all(torch.equal(state[k], best[k]) for k in best)
    assert not all(torch.equal(state[k], last[k]) for k in last)
