"""Learning-rate sweep on SmolLM2-135M-Instruct (not a test; the measurements behind docs/hf.md's advice).

    python tests/real/lr_sweep.py [--steps 20] [--batch 8] [--threads 1] [--model-dir DIR]

For each (form, lr): a fresh prefix (P=12; MLP form with bottleneck 512 as adapters' default, or flat),
AdamW, right-padded batches of the restaurant task in smollm2.py, loss on the answer only. Prints the loss
per step and, at the end, the loss and teacher-forced token accuracy on held-out restaurants.
--model-dir: a transformers copy of the model (save_pretrained), faster to load than the GGUF file.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import smollm2  # noqa: E402

import prefixattn  # noqa: E402
from prefixattn import PrefixTuningConfig  # noqa: E402

RUNS = [("mlp", 3e-4), ("mlp", 1e-3), ("mlp", 3e-3), ("flat", 3e-3), ("flat", 1e-2), ("flat", 3e-2)]


@torch.no_grad()
def held_out(model, tok):
    ids, mask, labels = smollm2.batch(tok, smollm2.examples(smollm2.HELD_OUT_NAMES, 8, seed=99))
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    pred, want = out.logits[:, :-1].argmax(-1), labels[:, 1:]
    acc = ((pred == want) & (want != -100)).sum().item() / (want != -100).sum().item()
    return out.loss.item(), acc


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--model-dir", default=None)
    p.add_argument("--runs", default=None, help="e.g. mlp:1e-3,flat:3e-2")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    runs = [(f, float(lr)) for f, lr in (r.split(":") for r in a.runs.split(","))] if a.runs else RUNS
    t0 = time.perf_counter()
    if a.model_dir:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        base = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(a.model_dir)
    else:
        base, tok = smollm2.load()
    print(f"loaded in {time.perf_counter() - t0:.0f}s", flush=True)
    train = smollm2.examples(smollm2.NAMES, a.steps * a.batch, seed=0)
    for form, lr in runs:
        torch.manual_seed(0)
        model = prefixattn.init(copy.deepcopy(base))
        model.add_adapter("t", PrefixTuningConfig(flat=form == "flat", prefix_length=12))
        model.train_adapter("t")
        params = [q for q in model.parameters() if q.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr)
        losses, t = [], time.perf_counter()
        for step in range(a.steps):
            ids, mask, labels = smollm2.batch(tok, train[step * a.batch : (step + 1) * a.batch])
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        model.eval()
        hl, acc = held_out(model, tok)
        n = sum(q.numel() for q in params)
        print(
            f"{form} lr {lr:g} ({n:,} params, {(time.perf_counter() - t) / a.steps:.1f} s/step): "
            f"loss {' '.join(f'{x:.2f}' for x in losses)} | held-out loss {hl:.3f}, token accuracy {acc:.0%}",
            flush=True,
        )
        del model, opt


if __name__ == "__main__":
    main()
