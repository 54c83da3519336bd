"""End to end: a 1.1B Llama-shaped model (TinyLlama-1.1B's config, random bf16 weights) through transformers.

Phases (each builds fresh models from the same seed, so every method sees identical weights):
  train     one training step (forward with labels, backward, optimizer step) at B=8, S=1024, P=128:
            floor = the same model with frozen weights and input embeddings requiring grad, so the
            backward runs through the whole network (base_frozen_input_grad_floor in docs/design.md);
            peft = get_peft_model(PrefixTuningConfig(num_virtual_tokens=P)) (prefix_projection=False);
            prefixattn = prefixattn.init + add_adapter(PrefixTuningConfig(prefix_length=P, flat=False)) +
            train_adapter (the MLP runs once per forward); prefixattn_flat = the same with flat=True;
            prefixattn_sdpa = the MLP adapter on init(model, backend="sdpa", deterministic=False) (cuDNN on
            the sequence keys, Triton prefix merge; a non-deterministic backward, like the floor's).
  generate  greedy generate(), B=64, prompt 256, 128 new tokens (min_new_tokens = max_new_tokens):
            noprefix; peft (PEFT's own generate(), recorded for what it does: whether its tokens equal
            the no-prefix run's or the run with PEFT's prefix in the cache); concat = the model's own
            DynamicCache preloaded with the prefix for every sequence (the concatenated-cache approach);
            prefixattn = eject_prefix_tuning + set_active_adapters, prefix outside the cache.
  serve     generate() at B=128 and 256 with a prefix: prefixattn against concat, with memory.
  kvbudget  bytes of KV cache per sequence and the largest batch that fits a fixed KV budget.
Generation is timed with a host clock around generate() after a 2-token warm-up call (one timed run
by default: HF generate's Python overhead dominates and varies little).
"""

from __future__ import annotations

import argparse
import gc
import inspect
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from .. import kernels
from . import report, timing
from .timing import Deadline, Progress, ResultWriter

PHASES = ("train", "generate", "serve", "kvbudget")
TINYLLAMA_1B = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    vocab_size=32000,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)


@dataclass(frozen=True)
class Settings:
    model: dict
    prefix_len: int = 128
    train_batch: int = 8
    train_seqlen: int = 1024
    train_warmup: int = 3
    train_steps: int = 10
    gen_batch: int = 64
    prompt_len: int = 256
    new_tokens: int = 128
    gen_repeats: int = 3
    serve_batches: tuple = (128, 256)
    kv_budget_gb: float = 32.0


FULL = Settings(TINYLLAMA_1B)
QUICK = replace(FULL, new_tokens=32, train_steps=6)
SMOKE = Settings(
    TINY,
    prefix_len=4,
    train_batch=2,
    train_seqlen=16,
    train_warmup=1,
    train_steps=2,
    gen_batch=2,
    prompt_len=8,
    new_tokens=4,
    serve_batches=(3,),
    kv_budget_gb=0.01,
)


# ---------------------------------------------------------------------------------------------- model helpers


def build_model(settings: Settings, device, dtype):
    """A Llama-shaped model with random weights, built directly on the device (fast), same seed each time."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**settings.model)
    torch.manual_seed(0)
    with torch.device(device):
        try:
            model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa", dtype=dtype)
        except TypeError:  # older transformers spell it torch_dtype
            model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa", torch_dtype=dtype)
    if next(model.parameters()).dtype != dtype:  # a transformers that ignored the dtype argument
        model = model.to(dtype)
    w = model.lm_head.weight
    if not float(w.float().std()) > 0:
        raise RuntimeError("model weights are not initialised (all equal): refusing to time on them")
    return model


def weights_checksum(model) -> float:
    """Equal across methods when they run on the same weights (every build uses the same seed)."""
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    return float(model.lm_head.weight.float().sum()) + float(
        model.model.layers[0].self_attn.k_proj.weight.float().sum()
    )


def cache_kwarg(model) -> str:
    """transformers 5.24 calls the cache argument `cache`; 5.17 calls it `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def cache_layers(cache):
    """(keys, values) per layer of a transformers cache object, a legacy tuple, or None."""
    if cache is None:
        return []
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [(getattr(l, "keys", None), getattr(l, "values", None)) for l in layers]
    if hasattr(cache, "key_cache"):
        return list(zip(cache.key_cache, cache.value_cache))
    if hasattr(cache, "self_attention_cache"):
        return cache_layers(cache.self_attention_cache)
    return [(kv[0], kv[1]) for kv in cache]


def cache_stats(cache) -> dict:
    layers = [(k, v) for k, v in cache_layers(cache) if k is not None and torch.is_tensor(k) and k.numel()]
    if not layers:
        return {}
    return dict(kv_cache_bytes=sum(timing.tensor_bytes(k, v) for k, v in layers), cache_seqlen=layers[0][0].shape[-2])


def prefilled_cache(model, prefix_kv, batch: int):
    """The concatenated-cache approach: a DynamicCache holding a per-sequence copy of every layer's prefix."""
    from transformers import DynamicCache

    try:
        cache = DynamicCache(config=model.config)
    except TypeError:
        cache = DynamicCache()
    for layer, (k, v) in enumerate(prefix_kv):
        cache.update(k.expand(batch, -1, -1, -1).contiguous(), v.expand(batch, -1, -1, -1).contiguous(), layer)
    return cache


def random_prefix(model, plen: int, device, dtype):
    """Per-layer [1, Hkv, P, D] keys/values at the scale of this model's keys."""
    cfg = model.config
    hkv = cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    g = torch.Generator(device="cpu").manual_seed(1)
    return [
        (
            torch.randn(1, hkv, plen, d, generator=g).to(device, dtype),
            torch.randn(1, hkv, plen, d, generator=g).to(device, dtype),
        )
        for _ in range(cfg.num_hidden_layers)
    ]


def prefixattn_model(
    settings: Settings, device, dtype, *, flat: bool, train: bool, backend: str = "auto", deterministic: bool = True
):
    """A model with a prefixattn adapter, per the package's transformers API (prefixattn/hf)."""
    import prefixattn

    model = build_model(settings, device, dtype)
    ret = prefixattn.init(model, backend=backend, deterministic=deterministic)
    if isinstance(ret, torch.nn.Module):
        model = ret
    model.add_adapter("p", config=prefixattn.PrefixTuningConfig(prefix_length=settings.prefix_len, flat=flat))
    if train:
        model.train_adapter("p")
    else:
        model.eject_prefix_tuning("p")
        model.set_active_adapters("p")
    return model


def free(device) -> None:
    """Give a dropped model's memory back before the next one is built (gc: modules hold cycles)."""
    if timing.is_cuda(device):
        gc.collect()
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def peak_gb(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 1e9 if timing.is_cuda(device) else None


# ---------------------------------------------------------------------------------------------- the run


class Bench(timing.BenchRun):
    reserve_s = 10.0

    def __init__(
        self, args, settings: Settings, device, dtype, writer: ResultWriter, deadline: Deadline, progress: Progress
    ):
        super().__init__(writer, deadline, progress)
        self.args, self.s, self.device, self.dtype = args, settings, device, dtype

    def attempt(self, what: dict, fn: Callable[[], dict | None]) -> dict | None:
        """Run one method; on failure record why (unavailable API, OOM, ...) and free memory."""
        label = " ".join(f"{k}={v}" for k, v in what.items())
        if self.out_of_time(label):
            return None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # PEFT/transformers deprecation chatter, once per step
                return fn()
        except Exception as exc:  # noqa: BLE001 - record, free, go on with the next method
            kind = "unavailable" if isinstance(exc, (ImportError, AttributeError, NotImplementedError)) else "error"
            self.fail(exc, kind=kind, limit=600, **what)
            return None
        finally:
            free(self.device)

    # -- train
    def time_steps(self, step: Callable[[], None]) -> dict:
        s, dev = self.s, self.device
        for _ in range(s.train_warmup):
            step()
        timing.synchronize(dev)
        if timing.is_cuda(dev):
            torch.cuda.reset_peak_memory_stats(dev)
            ev = [
                (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                for _ in range(s.train_steps)
            ]
            for a, b in ev:
                a.record()
                step()
                b.record()
            torch.cuda.synchronize(dev)
            times = [a.elapsed_time(b) for a, b in ev]
        else:
            times = []
            for _ in range(s.train_steps):
                t0 = time.perf_counter()
                step()
                times.append((time.perf_counter() - t0) * 1e3)
        return timing._summary(times, peak_GB=peak_gb(dev))

    def train_record(self, method: str, model, step, note: str) -> dict:
        s = self.s
        t = self.time_steps(step)
        rec = self.record(
            kind="e2e_train_step",
            method=method,
            note=note,
            B=s.train_batch,
            S=s.train_seqlen,
            P=0 if method == "floor" else s.prefix_len,
            **t,
            trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
            weights_checksum=weights_checksum(model),
            anchor_ms=None if self.args.smoke else report.E2E_ANCHORS.get(("train", method)),
        )
        self.progress(f"train {method}: {t['ms']:.1f} ms/step, peak {t['peak_GB'] or 0:.1f} GB")
        return rec

    def train(self) -> None:
        s, dev, dt = self.s, self.device, self.dtype
        vocab = s.model["vocab_size"]
        g = torch.Generator(device="cpu").manual_seed(2)
        ids = torch.randint(3, vocab, (s.train_batch, s.train_seqlen), generator=g).to(dev)

        def floor():
            model = build_model(s, dev, dt)
            model.train()
            model.requires_grad_(False)
            embed = model.get_input_embeddings()

            def step():
                x = embed(ids).detach().requires_grad_(True)
                model(inputs_embeds=x, labels=ids).loss.backward()

            return self.train_record("floor", model, step, "frozen weights, input embeddings require grad, sdpa")

        def peft():
            from peft import PrefixTuningConfig, get_peft_model

            model = build_model(s, dev, dt)
            model.train()
            pm = get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=s.prefix_len))
            opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-4)

            def step():
                pm(input_ids=ids, labels=ids).loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            return self.train_record("peft", pm, step, "PEFT PrefixTuningConfig(prefix_projection=False), sdpa")

        def ours(flat: bool, backend: str = "auto"):
            def run():
                model = prefixattn_model(
                    s, dev, dt, flat=flat, train=True, backend=backend, deterministic=backend != "sdpa"
                )
                model.train()
                params = [p for p in model.parameters() if p.requires_grad]
                if not params:
                    raise RuntimeError("train_adapter left no parameter requiring grad")
                opt = torch.optim.AdamW(params, lr=1e-4)

                def step():
                    model(input_ids=ids, labels=ids).loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)

                name = "prefixattn_sdpa" if backend == "sdpa" else "prefixattn_flat" if flat else "prefixattn"
                return self.train_record(name, model, step, f"prefixattn adapter flat={flat} backend={backend}")

            return run

        runs = dict(
            floor=floor,
            prefixattn=ours(False),
            peft=peft,
            prefixattn_flat=ours(True),
            prefixattn_sdpa=ours(False, "sdpa"),
        )
        if dev.type == "cpu" and not kernels.triton_interpreting():
            del runs["prefixattn_sdpa"]  # its prefix part is Triton
        wanted = self.args.train_methods.split(",") if self.args.train_methods else list(runs)
        for name in (n for n in runs if n in wanted):
            self.attempt(dict(phase="train", method=name), runs[name])

    # -- generation
    def prompt(self, batch: int):
        g = torch.Generator(device="cpu").manual_seed(3)
        ids = torch.randint(3, self.s.model["vocab_size"], (batch, self.s.prompt_len), generator=g)
        return ids.to(self.device), torch.ones_like(ids).to(self.device)

    def generate(self, model, ids, mask, new_tokens: int, make_kwargs: Callable[[], dict] = dict):
        """One greedy generate() of exactly new_tokens tokens; returns (sequences, cache)."""
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
            use_cache=True,
            return_dict_in_generate=True,
            **make_kwargs(),
        )
        cache = getattr(out, "cache", None)  # transformers 5.24; 5.17 calls it past_key_values
        if cache is None:
            cache = getattr(out, "past_key_values", None)
        return out.sequences, cache

    def timed_generate(
        self, phase: str, method: str, model, batch: int, *, concat_prefix=None, extra: dict | None = None
    ) -> tuple:
        """Warm-up (full length), then gen_repeats timed runs (median); records throughput and memory."""
        s, dev = self.s, self.device
        ids, mask = self.prompt(batch)
        make_kwargs = dict
        if concat_prefix is not None:  # dummy ids stand for the P cached prefix slots; generate skips them
            plen = concat_prefix[0][0].shape[-2]
            ids = torch.cat([torch.full((batch, plen), 3, dtype=ids.dtype, device=dev), ids], dim=1)
            mask = torch.ones_like(ids)
            kw = cache_kwarg(model)
            make_kwargs = lambda: {kw: prefilled_cache(model, concat_prefix, batch)}  # noqa: E731
        model.eval()
        with torch.no_grad():
            # Warm up at full length, so allocator growth and lazy initialisation are out of the timing.
            self.generate(model, ids, mask, s.new_tokens, make_kwargs)
            timing.synchronize(dev)
            base = torch.cuda.memory_allocated(dev) if timing.is_cuda(dev) else 0
            if timing.is_cuda(dev):
                torch.cuda.reset_peak_memory_stats(dev)
            times = []
            for _ in range(s.gen_repeats):
                t0 = time.perf_counter()
                seqs, cache = self.generate(model, ids, mask, s.new_tokens, make_kwargs)
                timing.synchronize(dev)
                times.append(time.perf_counter() - t0)
        sec = sorted(times)[len(times) // 2]  # median
        new = seqs[:, ids.shape[1] :]
        if new.shape[1] != s.new_tokens:
            raise RuntimeError(f"generate produced {new.shape[1]} new tokens, expected {s.new_tokens}")
        stats = cache_stats(cache)
        peak = peak_gb(dev)
        rec = dict(
            kind="e2e_generate",
            phase=phase,
            method=method,
            B=batch,
            prompt=s.prompt_len,
            new=s.new_tokens,
            P=0 if method == "noprefix" else s.prefix_len,
            s=sec,
            s_all=times,
            tok_per_s=batch * s.new_tokens / sec,
            peak_GB=peak,
            peak_extra_GB=None if peak is None else peak - base / 1e9,
            **stats,
            weights_checksum=weights_checksum(model),
            anchor_tok_per_s=None if self.args.smoke or batch != 64 else report.E2E_ANCHORS.get(("generate", method)),
        )
        if stats:  # a sequence has at most prompt + new tokens; anything beyond that in the cache is a prefix
            rec["cache_holds_prefix"] = stats["cache_seqlen"] > s.prompt_len + s.new_tokens
        rec.update(extra or {})
        self.record(**rec)
        self.progress(f"{phase} {method} B={batch}: {sec:.2f} s, {rec['tok_per_s']:.0f} tok/s, peak {peak or 0:.1f} GB")
        return new.cpu(), rec

    def generate_phase(self) -> None:
        s, dev, dt = self.s, self.device, self.dtype
        b = s.gen_batch
        tokens: dict[str, torch.Tensor] = {}
        peft_prefix: list = []

        def noprefix():
            model = build_model(s, dev, dt)
            tokens["noprefix"], _ = self.timed_generate("generate", "noprefix", model, b)

        def peft():
            from peft import PrefixTuningConfig, get_peft_model

            model = build_model(s, dev, dt)
            pm = get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=s.prefix_len))
            pm.eval()
            with torch.no_grad():
                peft_prefix.extend(
                    (k.detach().clone(), v.detach().clone()) for k, v in cache_layers(pm.get_prompt(batch_size=1))
                )
            toks, rec = self.timed_generate(
                "generate", "peft", pm, b, extra=dict(note="PEFT's own generate(); see peft_* fields for what it did")
            )
            tokens["peft"] = toks

        def concat():
            model = build_model(s, dev, dt)
            prefix = peft_prefix or random_prefix(model, s.prefix_len, dev, dt)
            src = "PEFT's prefix (get_prompt)" if peft_prefix else "random prefix"
            tokens["concat"], _ = self.timed_generate(
                "generate",
                "concat",
                model,
                b,
                concat_prefix=prefix,
                extra=dict(note=f"DynamicCache preloaded with {src}"),
            )

        def ours():
            model = prefixattn_model(s, dev, dt, flat=False, train=False)
            tokens["prefixattn"], _ = self.timed_generate("generate", "prefixattn", model, b)

        self.attempt(dict(phase="generate", method="noprefix"), noprefix)
        self.attempt(dict(phase="generate", method="prefixattn"), ours)
        self.attempt(dict(phase="generate", method="peft"), peft)
        self.attempt(dict(phase="generate", method="concat"), concat)
        if "peft" in tokens:  # what PEFT's generate() actually did, by comparing tokens
            verdict = dict(kind="e2e_peft_generate")
            for other in ("noprefix", "concat"):
                if other in tokens:
                    same = (tokens["peft"] == tokens[other]).float().mean().item()
                    verdict[f"token_agreement_with_{other}"] = same
            if "concat" in tokens and not peft_prefix:
                verdict["note"] = "concat used a random prefix, not PEFT's"
            agree_np = verdict.get("token_agreement_with_noprefix")
            agree_cat = verdict.get("token_agreement_with_concat")
            if agree_cat is not None and peft_prefix:
                verdict["conclusion"] = (
                    "PEFT generate applies its prefix"
                    if agree_cat > 0.99
                    else "PEFT generate does NOT produce the prefixed model's tokens"
                )
            elif agree_np is not None:
                verdict["conclusion"] = "same tokens as no prefix" if agree_np > 0.99 else "differs from no prefix"
            self.record(**verdict)
            self.progress.note(f"PEFT generate: {verdict}")

    def serve_phase(self) -> None:
        s, dev, dt = self.s, self.device, self.dtype

        def concat():
            model = build_model(s, dev, dt)
            prefix = random_prefix(model, s.prefix_len, dev, dt)
            for b in s.serve_batches:
                self.attempt(
                    dict(phase="serve", method="concat", B=b),
                    lambda b=b: self.timed_generate("serve", "concat", model, b, concat_prefix=prefix),
                )

        def ours():
            model = prefixattn_model(s, dev, dt, flat=False, train=False)
            for b in s.serve_batches:
                self.attempt(
                    dict(phase="serve", method="prefixattn", B=b),
                    lambda b=b: self.timed_generate("serve", "prefixattn", model, b),
                )

        self.attempt(dict(phase="serve", method="prefixattn"), ours)
        self.attempt(dict(phase="serve", method="concat"), concat)

    def kvbudget(self) -> None:
        """Largest batch whose KV cache fits the budget, from the config (checked against measured caches)."""
        s, cfg = self.s, self.s.model
        layers, hkv = cfg["num_hidden_layers"], cfg["num_key_value_heads"]
        d = cfg["hidden_size"] // cfg["num_attention_heads"]
        elt = self.dtype.itemsize
        tokens = s.prompt_len + s.new_tokens
        per_seq = {
            "prefixattn": layers * timing.kv_bytes(tokens, hkv, d, elt),
            "concat": layers * timing.kv_bytes(tokens + s.prefix_len, hkv, d, elt),
        }
        shared = {"prefixattn": layers * timing.kv_bytes(s.prefix_len, hkv, d, elt), "concat": 0}
        budget = s.kv_budget_gb * 1e9
        measured = {}
        for r in self.writer.records:  # caches returned by generate() in this run: bytes per sequence
            if r.get("kind") == "e2e_generate" and r.get("kv_cache_bytes") and r["method"] in per_seq:
                measured[r["method"]] = r["kv_cache_bytes"] / r["B"]
        for method in ("prefixattn", "concat"):
            max_b = int((budget - shared[method]) // per_seq[method])
            self.record(
                kind="e2e_kvbudget",
                method=method,
                kv_budget_GB=s.kv_budget_gb,
                tokens_per_seq=tokens,
                P=s.prefix_len,
                bytes_per_seq=per_seq[method],
                shared_prefix_bytes=shared[method],
                measured_bytes_per_seq=measured.get(method),
                max_batch=max_b,
            )
            self.progress(
                f"kvbudget {method}: {per_seq[method] / 1e6:.2f} MB/seq -> max batch {max_b} in {s.kv_budget_gb:g} GB"
            )

    def run(self, phases) -> None:
        if "train" in phases:
            self.train()
        if "generate" in phases:
            self.generate_phase()
        if "serve" in phases:
            self.serve_phase()
        if "kvbudget" in phases:
            self.kvbudget()


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv):
    p = argparse.ArgumentParser(prog="prefixattn bench e2e", description=__doc__.split("\n")[0])
    p.add_argument("--phases", default=",".join(PHASES), help=f"comma list of {','.join(PHASES)}")
    p.add_argument("--quick", action="store_true", help="32 new tokens instead of 128, 6 timed train steps")
    p.add_argument(
        "--train-methods",
        default=None,
        help="comma list of floor,prefixattn,peft,prefixattn_flat,prefixattn_sdpa (default: all)",
    )
    p.add_argument("--gen-repeats", type=int, default=None)
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--kv-budget-gb", type=float, default=None)
    p.add_argument(
        "--out",
        default=None,
        help=(
            "output directory (default: benchmarks/results; with --smoke a temporary directory, "
            "so CPU numbers never overwrite GPU results)"
        ),
    )
    p.add_argument("--budget-s", type=float, default=None)
    p.add_argument(
        "--smoke", action="store_true", help="a CPU dry run: a tiny Llama, float32; shows that it runs, judges nothing"
    )
    p.add_argument("--device", default=None)
    return p.parse_args(argv)


def estimates(settings: Settings, phases) -> dict:
    """H200 guesses: ~90 ms per generated token (HF generate's Python overhead) plus model builds."""
    # a full-length warm-up, then gen_repeats timed runs, per method
    per_gen = 0.09 * settings.new_tokens * (settings.gen_repeats + 1) + 3
    est = dict(train=45, generate=4 * per_gen + 10, serve=4 * per_gen * 1.1 + 6, kvbudget=1)
    return {p: est[p] for p in phases}


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    device, phases = timing.device_and_phases(args, PHASES)
    if device is None:
        return 2
    settings = SMOKE if args.smoke else (QUICK if args.quick else FULL)
    overrides = {
        k: v
        for k, v in dict(
            gen_repeats=args.gen_repeats, new_tokens=args.new_tokens, kv_budget_gb=args.kv_budget_gb
        ).items()
        if v is not None
    }
    settings = replace(settings, **overrides)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    if args.smoke:
        print(f"[e2e] {report.DRY_RUN_NOTE}", file=sys.stderr, flush=True)
    else:
        timing.print_estimates("e2e", estimates(settings, phases))
    out_dir = timing.results_dir(args.out, args.smoke)
    writer = ResultWriter(out_dir / "e2e.json", timing.environment(device, argv))
    writer.add(dict(kind="e2e_settings", **{k: v for k, v in settings.__dict__.items()}))
    bench = Bench(args, settings, device, dtype, writer, Deadline(args.budget_s), Progress("e2e"))
    timing.run_phases(bench, phases, 2 if device.type == "cpu" else None)
    return timing.finish_run("e2e", writer, out_dir, report.e2e_targets, report.e2e_table)


if __name__ == "__main__":
    sys.exit(main())
