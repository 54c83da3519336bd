"""`prefixattn demo`: prefix-tune a small model end to end (about 10 s on a laptop CPU; with --model, a 135M
model in about a minute).

Builds a small Llama-shaped model with random weights (or loads `--model PATH`, a local transformers
checkpoint), freezes it, and trains only a prefix (adapters-style MLP reparametrisation) on a built-in task:
after any prompt and "=", continue with a fixed phrase. A frozen random model can only do that through its
prefix. Then: eject (MLP -> flat prefix), save, reload into a fresh copy of the model (outputs must be
identical), generate with and without the prefix, refuse a few bad inputs, and print the KV-cache bytes a
shared prefix saves against concatenating it into every sequence.

Backend "auto": the Triton/CUDA kernels on a GPU, the PyTorch reference on a CPU (`--backend` forces one).
The defaults depend on the model: the built-in one trains 300 steps of 32 prompts; a --model checkpoint, whose
steps cost far more, trains 40 steps of 8 prompts at a lower learning rate (a pretrained model needs a gentler
one). The output folder (the saved adapters) stays on disk.
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import sys
import tempfile
import time

import torch

TARGET = "quick brown"  # every character has a unique successor: learnable as a lookup through the prefix
SEP = "="
WORDS = (
    "apple river stone cloud green seven paper light music table horse winter ocean garden silver "
    "mountain yellow window forest candle summer purple orange rabbit bottle pencil butter castle "
    "dragon island kitten ladder magnet needle pillow rocket saddle tiger violin wagon zebra"
).split()
HELD_OUT = ("banana", "sunset", "coffee river", "tiny dragon", "blue")  # prompts never seen in training
CHARS = "abcdefghijklmnopqrstuvwxyz =.,!?'"

USAGE_EPILOG = (
    "Defaults: the built-in model: --steps 300 --batch 32 --lr 1e-2 (about 10 s on a laptop CPU); with --model: "
    "--steps 40 --batch 8 --lr 1e-3 (SmolLM2-135M: about a minute). Example: prefixattn demo --steps 200 --out DIR"
)
BUILTIN_DEFAULTS = {"steps": 300, "batch": 32, "lr": 1e-2}  # a 2-layer random model: cheap steps, no prior to keep
MODEL_DEFAULTS = {"steps": 40, "batch": 8, "lr": 1e-3}  # a pretrained model: costly steps, 1e-2 is too aggressive


class DemoError(Exception):
    """A bad argument or input: printed as one clear line, exit code 2."""


# -- text <-> ids ---------------------------------------------------------------------------------------------
class CharCodec:
    """A tiny character vocabulary: 0 = pad, 1 = bos, 2 = eos, then CHARS."""

    pad_id, bos_id, eos_id = 0, 1, 2
    unit = "character"

    def __init__(self):
        self.vocab_size = 3 + len(CHARS)

    def encode(self, text: str) -> list[int]:
        return [3 + CHARS.index(c) for c in text.lower() if c in CHARS]

    def decode(self, ids) -> str:
        return "".join(CHARS[i - 3] if 3 <= i < self.vocab_size else "" for i in ids)


class TokenizerCodec:
    """A transformers tokenizer found next to --model."""

    unit = "token"

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.eos_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        self.bos_id = tokenizer.bos_token_id
        self.vocab_size = len(tokenizer)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids) -> str:
        return self.tok.decode([i for i in ids if i not in (self.pad_id, self.eos_id)])


# -- model ----------------------------------------------------------------------------------------------------
def small_config(vocab_size: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )


def build_model(args, device, dtype):
    """-> (base model, codec, description). The base model is frozen and never gets the adapter."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    if args.model is None:
        codec = CharCodec()
        torch.manual_seed(args.seed)
        model = LlamaForCausalLM(small_config(codec.vocab_size))
        c = model.config
        desc = (
            f"Llama-shaped, random weights: {c.num_hidden_layers} layers, hidden {c.hidden_size}, "
            f"{c.num_attention_heads} query / {c.num_key_value_heads} KV heads, vocab {c.vocab_size} (characters)"
        )
    else:
        path = args.model
        if not os.path.isdir(path):
            raise DemoError(
                f"--model: {path!r} is not a directory (a local transformers checkpoint; nothing is downloaded)"
            )
        if not os.path.exists(os.path.join(path, "config.json")):
            raise DemoError(f"--model: {path!r} has no config.json; expected a transformers checkpoint directory")
        try:
            model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
        except Exception as e:  # noqa: BLE001 - report any loading failure as one line
            raise DemoError(f"--model: cannot load {path!r} as a causal LM: {type(e).__name__}: {e}") from None
        codec = _codec_for(path, model)
        n_params = sum(p.numel() for p in model.parameters())
        desc = f"{type(model).__name__} from {path} ({n_params / 1e6:.1f} M parameters)"
    model = model.to(device=device, dtype=dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    model.generation_config.pad_token_id = codec.pad_id
    model.generation_config.eos_token_id = codec.eos_id
    return model, codec, desc


def _codec_for(path, model):
    has_tokenizer = any(
        os.path.exists(os.path.join(path, f))
        for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
    )
    if has_tokenizer:
        from transformers import AutoTokenizer

        try:
            return TokenizerCodec(AutoTokenizer.from_pretrained(path, local_files_only=True))
        except Exception as e:  # noqa: BLE001
            raise DemoError(f"--model: cannot load the tokenizer in {path!r}: {type(e).__name__}: {e}") from None
    codec = CharCodec()
    if model.config.vocab_size < codec.vocab_size:
        raise DemoError(
            f"--model: {path!r} has no tokenizer and a vocabulary of {model.config.vocab_size} ids; the "
            f"built-in character vocabulary needs {codec.vocab_size}"
        )
    return codec


# -- data -----------------------------------------------------------------------------------------------------
def random_prompts(rng: random.Random, n: int) -> list[str]:
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 2))) for _ in range(n)]


def _prompt_ids(codec, prompt: str) -> list[int]:
    ids = codec.encode(prompt + " " + SEP)
    return ([codec.bos_id] if codec.bos_id is not None else []) + ids


def _target_ids(codec) -> list[int]:
    return codec.encode(TARGET) + [codec.eos_id]


def _position_kwargs(model, mask) -> dict:
    """position_ids like generate() computes them, for models whose forward takes them."""
    import inspect

    if "position_ids" in inspect.signature(model.forward).parameters:
        return {"position_ids": positions(mask)}
    return {}


def positions(mask):
    """Position ids that start at 0 at each sequence's first real token, as generate() computes them. The
    prefix carries no position, so its effect depends on the queries' absolute positions: training must see
    the positions generation will use (left padding without them would shift every target to the end)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def training_batch(codec, prompts, device):
    """Left-padded [prompt, sep, target, eos] with labels on the target and eos only."""
    target = _target_ids(codec)
    rows = [(_prompt_ids(codec, p), target) for p in prompts]
    width = max(len(a) + len(b) for a, b in rows)
    ids = torch.full((len(rows), width), codec.pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (a, b) in enumerate(rows):
        seq = a + b
        ids[i, width - len(seq) :] = torch.tensor(seq)
        mask[i, width - len(seq) :] = 1
        labels[i, width - len(b) :] = torch.tensor(b)
    return ids.to(device), mask.to(device), labels.to(device)


def prompt_batch(codec, prompts, device):
    rows = [_prompt_ids(codec, p) for p in prompts]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), codec.pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def target_accuracy(model, batch) -> float:
    """Teacher-forced next-token accuracy on the answer's tokens (characters with the built-in vocabulary) and eos."""
    ids, mask, labels = batch
    logits = model(input_ids=ids, attention_mask=mask, **_position_kwargs(model, mask)).logits[:, :-1]
    want = labels[:, 1:]
    hit = (logits.argmax(-1) == want) & (want != -100)
    return hit.sum().item() / (want != -100).sum().item()


@torch.no_grad()
def generate(model, codec, prompts, device) -> list[str]:
    ids, mask = prompt_batch(codec, prompts, device)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=len(_target_ids(codec)), do_sample=False)
    return [codec.decode(row[ids.shape[1] :].tolist()).strip() for row in out]


# -- training ---------------------------------------------------------------------------------------------------
class ProgressBar:
    """One updating line on stderr (no dependency), from the first step, with an estimate of the time left; on a
    non-terminal a line at the first step, every tenth of the run or 10 s, and the last step."""

    def __init__(self, total: int, width: int = 30):
        self.total, self.width = total, width
        self.tty = sys.stderr.isatty()
        self.every = 1 if self.tty else max(1, total // 10)
        self.start = self.last = time.perf_counter()

    def update(self, step: int, loss: float) -> None:
        now = time.perf_counter()
        due = step == 1 or step == self.total or step % self.every == 0 or now - self.last >= 10
        if not due:
            return
        self.last = now
        filled = self.width * step // self.total
        elapsed = now - self.start
        left = elapsed / step * (self.total - step)
        eta = f", ~{left:.0f}s left" if step < self.total else ""
        line = (
            f"  train [{'#' * filled}{'.' * (self.width - filled)}] {step}/{self.total} loss {loss:.3f} "
            f"{elapsed:.0f}s{eta}"
        )
        sys.stderr.write(("\r" if self.tty else "") + line + ("" if self.tty else "\n"))
        sys.stderr.flush()

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()


def train(model, codec, args, device) -> float:
    rng = random.Random(args.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=args.lr)
    bar = ProgressBar(args.steps)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        ids, mask, labels = training_batch(codec, random_prompts(rng, args.batch), device)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels, **_position_kwargs(model, mask)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.update(step, loss.item())
    bar.close()
    return time.perf_counter() - start


# -- KV-cache arithmetic ------------------------------------------------------------------------------------------
def kv_bytes(kv_heads: int, head_dim: int, prefix_len: int, batch: int, elt: int) -> tuple[int, int]:
    """Per layer: (bytes of prefix K/V a concatenating cache keeps, one copy per sequence; bytes of
    prefixattn's single shared buffer)."""
    per_copy = 2 * kv_heads * prefix_len * head_dim * elt  # K and V
    return batch * per_copy, per_copy


def _size(n: float) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _cache_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


@torch.no_grad()
def kv_report(model, codec, prompts, prefix_len: int, batch: int, dtype, device) -> list[str]:
    from .hf import get_store

    spec = get_store(model).geometry.locations["self_prefix"]
    layers, hkv, d = len(spec.layers), spec.num_kv_heads, spec.head_dim
    elt = torch.finfo(dtype).bits // 8
    ids, mask = prompt_batch(codec, prompts, device)
    out = model(input_ids=ids, attention_mask=mask, use_cache=True, **_position_kwargs(model, mask))
    cache = out["cache"] if "cache" in out else out["past_key_values"]  # transformers >= 5.24 / 5.17
    b, s = ids.shape
    concat, shared = kv_bytes(hkv, d, prefix_len, b, elt)
    lines = [
        f"  measured: after {b} prompts of {s} tokens the cache holds {cache.get_seq_length()} tokens per "
        f"sequence, {_size(_cache_bytes(cache))}; the prefix is not in it (one shared buffer, "
        f"{_size(shared * layers)} for all sequences)",
        f"  a concatenating cache (as PEFT's) would add {_size(concat * layers)} for these {b} sequences (calculated)",
    ]
    concat, shared = kv_bytes(hkv, d, prefix_len, batch, elt)
    lines.append(
        f"  calculated for B={batch}: {_size(concat - shared)} saved per layer, "
        f"{_size((concat - shared) * layers)} over {layers} layers"
    )
    big = [(p, kv_bytes(8, 64, p, 64, 2)) for p in (prefix_len, 64)]  # Llama-3.2-1B: 16 layers, 8 KV x 64, bf16
    lines.append(
        "  calculated for Llama-3.2-1B shapes (16 layers, 8 KV heads x 64, bf16), B=64: "
        + ", ".join(f"P={p}: {_size((c - sh) * 16)} saved" for p, (c, sh) in big)
    )
    return lines


# -- bad inputs ---------------------------------------------------------------------------------------------------
def refusals(model, name: str, saved_dir: str, seed: int) -> list[str]:
    """Three bad inputs: each raises a clear error and leaves the model as it was."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import prefixattn
    from prefixattn import PrefixTuningConfig

    before = {k: v.clone() for k, v in model.state_dict().items()}
    store = prefixattn.hf.get_store(model)
    names, active = store.names(), list(store.active)
    lines = []
    cfg = model.config
    other_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    other = prefixattn.init(LlamaForCausalLM(other_cfg))
    attempts = [
        (
            "a config that does not fit (leave_out=[99])",
            lambda: model.add_adapter("x", config=PrefixTuningConfig(prefix_length=4, leave_out=[99])),
        ),
        ("an unknown adapter name", lambda: model.set_active_adapters("nope")),
        ("a checkpoint made for another model", lambda: other.load_adapter(saved_dir)),
    ]
    for what, fn in attempts:
        try:
            fn()
            lines.append(f"  {what}: NOT refused")
        except (ValueError, TypeError, FileNotFoundError) as e:
            lines.append(f"  {what}: {type(e).__name__}: {e}")
    after = model.state_dict()
    unchanged = (
        store.names() == names
        and store.active == active
        and after.keys() == before.keys()
        and all(torch.equal(after[k], before[k]) for k in before)
    )
    lines.append(f"  model unchanged after all three: {unchanged}")
    return lines


# -- main -----------------------------------------------------------------------------------------------------------
def parse_args(argv):
    from .validation import BACKENDS

    p = argparse.ArgumentParser(prog="prefixattn demo", description=__doc__.split("\n\n")[0], epilog=USAGE_EPILOG)
    p.add_argument(
        "--model",
        default=None,
        help="a local transformers checkpoint directory (default: a small random Llama built from a config)",
    )
    p.add_argument("--steps", type=int, default=None, help="training steps (default 300; 40 with --model)")
    p.add_argument("--prefix-length", type=int, default=8, help="prefix tokens per layer (default 8)")
    p.add_argument("--batch", type=int, default=None, help="training batch (default 32; 8 with --model)")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate (default 1e-2; 1e-3 with --model)")
    p.add_argument("--seed", type=int, default=0)
    # "sdpa" is left out: it takes no padding, and the demo's prompts are padded batches.
    p.add_argument(
        "--backend",
        default="auto",
        choices=[b for b in BACKENDS if b != "sdpa"],
        help="attention backend (default auto: kernels on a GPU, the reference on a CPU)",
    )
    p.add_argument(
        "--out", default=None, help="where to save the adapter (default: a new temporary directory, left on disk)"
    )
    args = p.parse_args(argv)
    for name, value in (MODEL_DEFAULTS if args.model is not None else BUILTIN_DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if not args.lr > 0:
        raise DemoError(f"--lr: expected a positive float, got {args.lr}")
    for name in ("steps", "prefix_length", "batch"):
        if getattr(args, name) < 1:
            raise DemoError(f"--{name.replace('_', '-')}: expected a positive int, got {getattr(args, name)}")
    return args


def run(args) -> int:
    import prefixattn
    from prefixattn import PrefixTuningConfig
    from prefixattn.tuning import checkpoint_bytes

    t0 = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cpu" and args.backend == "cuda":
        raise DemoError("--backend cuda: no CUDA device here")
    if device.type == "cpu" and args.backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        raise DemoError(
            "--backend triton: no CUDA device here; set TRITON_INTERPRET=1 to run Triton's interpreter "
            "on the CPU (slow)"
        )
    base, codec, desc = build_model(args, device, dtype)
    print(f"prefixattn demo: prefix-tune a frozen model to answer '{TARGET}' after any prompt")
    print(f"model: {desc}; device {device}, {dtype}, backend {args.backend!r}")
    print(f"training: {args.steps} steps, batch {args.batch}, Adam lr {args.lr:g}")

    model = copy.deepcopy(base)
    try:
        prefixattn.init(model, backend=args.backend)
    except ValueError as e:
        raise DemoError(f"--model: {e}") from None
    name = "quick_brown"
    config = PrefixTuningConfig(prefix_length=args.prefix_length, bottleneck_size=128, flat=False)
    model.add_adapter(name, config=config)
    n_train = sum(p.numel() for p in prefixattn.hf.get_store(model).get(name).parameters())
    n_base = sum(p.numel() for p in base.parameters())
    print(
        f"adapter {name!r}: P={args.prefix_length}, MLP reparametrisation, {n_train:,} trainable parameters "
        f"(the model's {n_base:,} stay frozen)"
    )

    rng = random.Random(args.seed + 1)
    eval_batch = training_batch(codec, random_prompts(rng, 64), device)
    before = target_accuracy(model, eval_batch)  # no adapter active yet: the plain model
    model.train_adapter(name)
    seconds = train(model, codec, args, device)
    model.eval()
    after = target_accuracy(model, eval_batch)
    print(
        f"trained {args.steps} steps in {seconds:.1f}s; next-{codec.unit} accuracy on '{TARGET}' (teacher-forced, "
        f"64 unseen prompts): {before:.0%} without the prefix -> {after:.0%} with it"
    )

    out_dir = args.out or tempfile.mkdtemp(prefix="prefixattn_demo_")
    kept = "" if args.out else "; a temporary folder, left on disk: delete it when done"
    print(f"saving the adapter under {out_dir}{kept}")
    mlp_dir, flat_dir = os.path.join(out_dir, "mlp"), os.path.join(out_dir, "ejected")
    model.save_adapter(mlp_dir, name)
    with torch.no_grad():
        ref = model(input_ids=eval_batch[0], attention_mask=eval_batch[1]).logits
    model.eject_prefix_tuning(name)
    with torch.no_grad():
        ejected = model(input_ids=eval_batch[0], attention_mask=eval_batch[1]).logits
    model.save_adapter(flat_dir, name)
    print(
        f"eject: the MLP runs once and is dropped (max logit change {(ejected - ref).abs().max().item():.1e}); "
        f"checkpoint {checkpoint_bytes(mlp_dir):,} bytes before, {checkpoint_bytes(flat_dir):,} after "
        f"({flat_dir})"
    )

    fresh = prefixattn.init(copy.deepcopy(base), backend=args.backend)
    fresh.load_adapter(flat_dir, set_active=True)
    with torch.no_grad():
        reloaded = fresh(input_ids=eval_batch[0], attention_mask=eval_batch[1]).logits
    same = torch.equal(reloaded, ejected)
    print(f"reloaded into a fresh copy of the model: outputs identical: {same}")

    prompts = list(HELD_OUT)
    fresh.set_active_adapters(None)
    plain = generate(fresh, codec, prompts, device)
    fresh.set_active_adapters(name)
    tuned = generate(fresh, codec, prompts, device)
    print("generation (greedy) for prompts never seen in training, without -> with the prefix:")
    for prompt, a, b in zip(prompts, plain, tuned):
        print(f"  {prompt + ' ' + SEP:<16} {a!r:<18} -> {b!r}")
    hits = sum(t == TARGET for t in tuned)
    print(f"  exact '{TARGET}': {sum(t == TARGET for t in plain)}/{len(prompts)} without, {hits}/{len(prompts)} with")

    print("bad inputs are refused with a clear error:")
    for line in refusals(fresh, name, flat_dir, args.seed):
        print(line)

    print("KV cache:")
    for line in kv_report(fresh, codec, prompts, args.prefix_length, args.batch, dtype, device):
        print(line)
    print(f"done in {time.perf_counter() - t0:.0f}s")
    return 0 if same else 1


def main(argv=None) -> int:
    threads = torch.get_num_threads()
    try:
        args = parse_args(list(sys.argv[1:] if argv is None else argv))
        if args.model is None:  # tiny matmuls: more threads only add overhead (and stall on a busy CPU)
            torch.set_num_threads(1)
        return run(args)
    except DemoError as e:
        print(f"prefixattn demo: error: {e}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)
