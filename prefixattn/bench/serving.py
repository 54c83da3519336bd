"""Serving: vLLM with prefixattn against plain vLLM and what a user has today.

Phases:
  merge  prefixattn.merge_prefix alone (the per-layer cost the GPU backend adds to FlashAttention): a decode
         step (T = requests tokens) and a prefill chunk (T = 16 x requests), P = 16 / 128, 64 pool entries,
         Llama-3.2-1B heads (Hq 32, Hkv 8, D 64); triton against the plain-PyTorch fold. Needs no vLLM.
  vllm   offline LLM.generate on a Llama-shaped 1B model with random weights saved to a temp dir (no hub), each
         engine in its own process: generated tok/s (every request generates exactly new_tokens, all
         submitted at once) and the batch's time to first token (the same number of fresh prompts with
         max_tokens=1, wall time until every request has its first token).
           plain       vLLM without the plugin: no prefix, and the prefix's text pasted into the prompt (P extra
                       prompt tokens; 1/8/64 distinct texts, prefix caching on, as vLLM defaults)
           prefixattn  vLLM + prefixattn (adapters for P = 16 and 128 loaded): 0% of requests prefixed, and
                       100% over 1/8/64 distinct prefixes per P
           prefixattn_paged  (--paged-decode) the same with decode steps through prefix_attention_paged
  hf     transformers generate() with prefixattn (all requests of one batch, one adapter), the path a user
         has without a server.
Targets (GPU, bf16, 256 concurrent requests): vLLM + prefixattn with every request prefixed >= 0.95x plain
vLLM's tok/s, and >= 10x HF generate(). --smoke runs a tiny float32 version on the CPU that judges nothing.
vLLM must be importable for the vllm phase; where it is not (the GPU machine lent to this project has no
network to install it), that phase is recorded as skipped with the reason and the others still run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from . import timing
from .timing import Deadline, Progress, ResultWriter

PHASES = ("merge", "vllm", "hf")
LLAMA_1B = dict(  # Llama-3.2-1B's shape
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    vocab_size=128256,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    tie_word_embeddings=True,
)
TINY = dict(  # head_dim 32: vLLM's CPU attention kernel has no head_dim 16
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    vocab_size=256,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
THROUGHPUT_TARGET = 0.95  # prefixattn (all prefixed) / plain vLLM
HF_TARGET = 10.0  # prefixattn in vLLM / HF generate() with prefixattn


@dataclass(frozen=True)
class Settings:
    model: dict
    dtype: str = "bfloat16"
    requests: int = 256
    prompt_len: int = 128
    new_tokens: int = 128
    prefix_lens: tuple = (16, 128)
    distinct: tuple = (1, 8, 64)
    hf_requests: int = 64
    merge_pool: int = 64
    gpu_memory_utilization: float = 0.8


FULL = Settings(LLAMA_1B)
QUICK = replace(FULL, new_tokens=64, distinct=(1, 64), hf_requests=32)
SMOKE = Settings(
    TINY,
    dtype="float32",
    requests=3,
    prompt_len=8,
    new_tokens=3,
    prefix_lens=(4,),
    distinct=(1, 2),
    hf_requests=2,
    merge_pool=3,
)


def adapter_name(plen: int, i: int) -> str:
    return f"p{plen}_{i}"


# ------------------------------------------------------------------------------------------- merge phase


def merge_cases(settings: Settings, device) -> list[dict]:
    heads_q, heads_kv = settings.model["num_attention_heads"], settings.model["num_key_value_heads"]
    dim = settings.model.get("head_dim") or settings.model["hidden_size"] // heads_q
    cases = []
    for step, tokens in (("decode", settings.requests), ("prefill_chunk", 16 * settings.requests)):
        for plen in settings.prefix_lens:
            cases.append(dict(step=step, tokens=tokens, heads_q=heads_q, heads_kv=heads_kv, head_dim=dim, P=plen))
    return cases


def time_merge(case: dict, settings: Settings, device, backend: str) -> dict:
    import prefixattn

    dtype = getattr(torch, settings.dtype) if device.type == "cuda" else torch.float32
    g = torch.Generator(device="cpu").manual_seed(0)
    t, hq, hkv, d, p = (case[k] for k in ("tokens", "heads_q", "heads_kv", "head_dim", "P"))
    n = settings.merge_pool

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    q, out = rnd(t, hq, d), rnd(t, hq, d)
    lse = torch.randn(hq, t, generator=g).to(device).t()  # FlashAttention's [Hq, T] layout, read via strides
    pk, pv = rnd(n, hkv, p, d), rnd(n, hkv, p, d)
    index = torch.randint(-1, n, (t,), generator=g, dtype=torch.int32).to(device)
    lengths = torch.full((n,), p, dtype=torch.int32, device=device)

    def call():
        prefixattn.merge_prefix(q, out, lse, pk, pv, index, lengths, backend=backend)

    result = timing.time_fns([call], device, warmup_ms=10, rep_ms=50)
    moved = timing.tensor_bytes(q, out) * 2 + t * hkv * p * d * 2 * q.element_size()  # upper bound: no reuse
    return dict(ms=result["ms"], us_per_token=result["ms"] * 1e3 / t, gb_s_upper=moved / result["ms"] / 1e6)


# -------------------------------------------------------------------------------------------- model files


def write_model_and_adapters(settings: Settings, root: Path, names_by_len: dict[int, list[str]]) -> Path:
    """Random-weight Llama saved with transformers (what vLLM loads) and flat prefixattn adapters saved with
    save_adapter (what the plugin loads), all from seed 0."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import prefixattn

    config = LlamaConfig(**settings.model)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(getattr(torch, settings.dtype))
    model_dir = root / "model"
    model.save_pretrained(model_dir)
    ret = prefixattn.init(model)
    model = ret if isinstance(ret, torch.nn.Module) else model
    for plen, names in names_by_len.items():
        for name in names:
            model.add_adapter(name, config=prefixattn.PrefixTuningConfig(prefix_length=plen, flat=True))
            model.save_adapter(str(root / "adapters" / name), name)
    return model_dir


# --------------------------------------------------------------------------------------------- vLLM phase


def prompts_for(settings: Settings, seed: int, extra_len: int = 0, pasted: list[list[int]] | None = None):
    """Random token-id prompts (skip_tokenizer_init: no tokenizer needed); `pasted` texts are prepended in turn."""
    g = torch.Generator().manual_seed(seed)
    vocab = settings.model["vocab_size"]
    prompts = []
    for i in range(settings.requests):
        ids = torch.randint(3, vocab - 3, (settings.prompt_len,), generator=g).tolist()
        if pasted:
            ids = pasted[i % len(pasted)] + ids
        prompts.append({"prompt_token_ids": ids})
    return prompts


def engine_cases(settings: Settings, engine: str) -> list[dict]:
    """(label, prefix names per request or None, pasted texts) of each case an engine runs."""
    cases = []
    n = settings.requests
    if engine == "plain":
        cases.append(dict(case="no_prefix", prefixed=0.0, P=0, distinct=0))
        for plen in settings.prefix_lens:
            for k in settings.distinct:
                cases.append(dict(case="pasted_text", prefixed=1.0, P=plen, distinct=k, pasted=True))
    else:
        cases.append(dict(case="prefixed_0pct", prefixed=0.0, P=0, distinct=0))
        for plen in settings.prefix_lens:
            for k in settings.distinct:
                names = [adapter_name(plen, i % k) for i in range(n)]
                cases.append(dict(case="prefixed_100pct", prefixed=1.0, P=plen, distinct=k, names=names))
    return cases


def run_engine(spec: dict) -> list[dict]:
    """One vLLM engine (in its own process) and its cases; returns one record per case."""
    from vllm import LLM, SamplingParams

    settings = Settings(**{**spec["settings"], "prefix_lens": tuple(spec["settings"]["prefix_lens"])})
    kwargs = dict(
        model=spec["model_dir"],
        dtype=settings.dtype,
        seed=0,
        skip_tokenizer_init=True,
        max_num_seqs=max(settings.requests, 2),
        max_model_len=settings.prompt_len + max(settings.prefix_lens) + settings.new_tokens + 16,
    )
    if spec["device"] == "cuda":
        kwargs["gpu_memory_utilization"] = settings.gpu_memory_utilization
    else:
        kwargs["enforce_eager"] = True
    if spec.get("adapters"):
        kwargs["additional_config"] = {
            "prefixattn": {"adapters": spec["adapters"], "max_prefix_length": max(settings.prefix_lens)}
        }
    t0 = time.perf_counter()
    llm = LLM(**kwargs)
    load_s = time.perf_counter() - t0

    def params(name, max_tokens):
        extra = {"prefix": name} if name else None
        return SamplingParams(
            max_tokens=max_tokens, min_tokens=max_tokens, ignore_eos=True, temperature=0.0, detokenize=False,
            extra_args=extra,
        )  # fmt: skip

    def generate(prompts, names, max_tokens):
        plist = [params(names[i] if names else None, max_tokens) for i in range(len(prompts))]
        t = time.perf_counter()
        outs = llm.generate(prompts, plist, use_tqdm=False)
        return time.perf_counter() - t, sum(len(o.outputs[0].token_ids) for o in outs)

    generate(prompts_for(settings, 99)[:2], None, 2)  # warm-up
    records = []
    for n, case in enumerate(engine_cases(settings, spec["engine"])):
        pasted = None
        if case.get("pasted"):
            g = torch.Generator().manual_seed(1000 + case["P"])
            pasted = [
                torch.randint(3, settings.model["vocab_size"] - 3, (case["P"],), generator=g).tolist()
                for _ in range(case["distinct"])
            ]
        names = case.get("names")
        ttft_s, _ = generate(prompts_for(settings, 2 * n + 1, pasted=pasted), names, 1)
        gen_s, tokens = generate(prompts_for(settings, 2 * n + 2, pasted=pasted), names, settings.new_tokens)
        case = {k: v for k, v in case.items() if k not in ("names", "pasted")}
        records.append(
            dict(
                kind="serving",
                engine=spec["engine"],
                **case,
                requests=settings.requests,
                new_tokens=settings.new_tokens,
                tok_s=tokens / gen_s,
                gen_s=gen_s,
                batch_ttft_s=ttft_s,
                load_s=load_s,
            )
        )
    return records


def vllm_available() -> str | None:
    """None if vLLM can be imported here, else why not (checked in a subprocess: importing it is slow)."""
    probe = subprocess.run([sys.executable, "-c", "import vllm"], capture_output=True, text=True, timeout=300)
    if probe.returncode == 0:
        return None
    last = (probe.stderr.strip().splitlines() or ["?"])[-1]
    return f"vLLM is not importable in this environment ({last})"


def spawn_engine(spec: dict, work: Path, deadline: Deadline, env_extra: dict | None = None) -> list[dict]:
    spec_path, result_path = work / f"{spec['engine']}.spec.json", work / f"{spec['engine']}.result.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, **(env_extra or {}))
    timeout = max(30.0, deadline.left() - 10) if deadline.budget_s else None
    proc = subprocess.run(
        [sys.executable, "-m", "prefixattn.bench.serving", "--engine-spec", str(spec_path), "--result",
         str(result_path)],
        env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    if proc.returncode != 0 or not result_path.exists():
        lines = (proc.stderr + proc.stdout).strip().splitlines()
        errors = [line for line in lines if "Error" in line][-4:]  # the root cause is among vLLM's error lines
        raise RuntimeError(
            f"engine {spec['engine']} failed (rc={proc.returncode}): " + " | ".join(errors or lines[-5:])
        )
    return json.loads(result_path.read_text())


# ----------------------------------------------------------------------------------------------- HF phase


def run_hf(settings: Settings, model_dir: Path, adapter_dir: Path, plen: int, device) -> dict:
    from transformers import LlamaForCausalLM

    import prefixattn

    dtype = getattr(torch, settings.dtype)
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    ret = prefixattn.init(model)
    model = ret if isinstance(ret, torch.nn.Module) else model
    name = model.load_adapter(str(adapter_dir))
    model.set_active_adapters(name)
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, settings.model["vocab_size"] - 3, (settings.hf_requests, settings.prompt_len), generator=g)
    ids = ids.to(device)
    kw = dict(do_sample=False, pad_token_id=0)
    model.generate(ids[:, :4], max_new_tokens=2, min_new_tokens=2, **kw)  # warm-up
    timing.synchronize(device)
    t = time.perf_counter()
    out = model.generate(ids, max_new_tokens=settings.new_tokens, min_new_tokens=settings.new_tokens, **kw)
    timing.synchronize(device)
    gen_s = time.perf_counter() - t
    tokens = (out.shape[1] - ids.shape[1]) * out.shape[0]
    return dict(kind="serving", engine="hf_generate", case="prefixed_100pct", prefixed=1.0, P=plen, distinct=1,
                requests=settings.hf_requests, new_tokens=settings.new_tokens, tok_s=tokens / gen_s,
                gen_s=gen_s)  # fmt: skip


# ------------------------------------------------------------------------------------------------- report


def judge(records: list[dict], smoke: bool) -> list[str]:
    rows = [r for r in records if r.get("kind") == "serving"]
    lines = [
        f"{'engine':<18} {'case':<16} {'P':>4} {'dist':>4} {'req':>4} {'tok/s':>10} {'batch TTFT s':>12}",
    ]
    for r in rows:
        ttft = f"{r['batch_ttft_s']:.3f}" if "batch_ttft_s" in r else "-"
        lines.append(
            f"{r['engine']:<18} {r['case']:<16} {r.get('P', 0):>4} {r.get('distinct', 0):>4} {r['requests']:>4} "
            f"{r['tok_s']:>10.1f} {ttft:>12}"
        )
    for r in records:
        if r.get("kind") == "merge":
            lines.append(
                f"merge_prefix {r['backend']:<6} {r['step']:<13} T={r['tokens']:<5} P={r['P']:<4} "
                f"{r['ms'] * 1e3:9.1f} us  ({r['us_per_token'] * 1e3:.1f} ns/token)"
            )
        if r.get("kind") == "skipped":
            lines.append(f"skipped {r.get('phase', '')}: {r['reason']}")
    if smoke:
        lines.append("dry run (--smoke: tiny model on the CPU): nothing is judged")
        return lines
    plain = [r["tok_s"] for r in rows if r["engine"] == "plain" and r["case"] == "no_prefix"]
    hf = [r["tok_s"] for r in rows if r["engine"] == "hf_generate"]
    for r in rows:
        if r["engine"] == "prefixattn" and r["case"] == "prefixed_100pct" and plain:
            ratio = r["tok_s"] / plain[0]
            verdict = "PASS" if ratio >= THROUGHPUT_TARGET else "FAIL"
            lines.append(
                f"target vLLM+prefixattn P={r['P']} over {r['distinct']} prefixes / plain vLLM: {ratio:.3f} "
                f"(>= {THROUGHPUT_TARGET}) {verdict}"
            )
        if r["engine"] == "prefixattn" and r["case"] == "prefixed_100pct" and r["distinct"] == 1 and hf:
            ratio = r["tok_s"] / hf[0]
            verdict = "PASS" if ratio >= HF_TARGET else "FAIL"
            lines.append(f"target vLLM+prefixattn P={r['P']} / HF generate(): {ratio:.1f}x (>= {HF_TARGET}x) {verdict}")
    if not plain:
        lines.append("targets: not judged (no vLLM rows)")
    return lines


def parse_args(argv):
    p = argparse.ArgumentParser(prog="prefixattn bench serving", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench_results", help="directory for serving.json")
    p.add_argument("--phases", default=",".join(PHASES), help=f"comma list of {', '.join(PHASES)}")
    p.add_argument("--smoke", action="store_true", help="tiny float32 model on the CPU; judges nothing")
    p.add_argument("--quick", action="store_true", help="fewer distinct-prefix points and tokens")
    p.add_argument("--paged-decode", action="store_true", help="also run decode through prefix_attention_paged")
    p.add_argument("--budget-s", type=float, default=None, help="stop cleanly after this many seconds")
    p.add_argument("--engine-spec", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    phases = [x for x in args.phases.split(",") if x]
    bad = sorted(set(phases) - set(PHASES))
    if bad:
        p.error(f"--phases: unknown {bad}; choose from {list(PHASES)}")
    args.phases = phases
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.engine_spec:  # a child process: one engine
        records = run_engine(json.loads(Path(args.engine_spec).read_text()))
        Path(args.result).write_text(json.dumps(records))
        return 0
    settings = SMOKE if args.smoke else QUICK if args.quick else FULL
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    writer = ResultWriter(Path(args.out) / "serving.json", env=timing.environment(device))
    deadline, progress = Deadline(args.budget_s), Progress("serving")
    records = []

    def add(rec):
        records.append(writer.add(rec))
        progress(json.dumps({k: v for k, v in rec.items() if k in ("engine", "case", "P", "distinct", "tok_s",
                                                                   "step", "backend", "ms", "reason")}))  # fmt: skip

    if "merge" in args.phases:
        backends = ["triton", "torch"] if device.type == "cuda" else ["torch"]
        for case in merge_cases(settings, device):
            for backend in backends:
                add(dict(kind="merge", backend=backend, **case, **time_merge(case, settings, device, backend)))

    why_no_vllm = vllm_available() if "vllm" in args.phases else None
    if why_no_vllm is not None:
        add(dict(kind="skipped", phase="vllm", reason=why_no_vllm + ": the vLLM rows are unmeasured here"))
    run_vllm = "vllm" in args.phases and why_no_vllm is None
    need_model = run_vllm or "hf" in args.phases
    with tempfile.TemporaryDirectory(prefix="prefixattn-serving-") as tmp:
        root = Path(tmp)
        names_by_len = {p: [adapter_name(p, i) for i in range(max(settings.distinct))] for p in settings.prefix_lens}
        model_dir = write_model_and_adapters(settings, root, names_by_len) if need_model else None
        if run_vllm:
            base = dict(settings=asdict(settings), model_dir=str(model_dir), device=device.type)
            adapters = {n: str(root / "adapters" / n) for names in names_by_len.values() for n in names}
            env = {"VLLM_CPU_KVCACHE_SPACE": "1"} if device.type == "cpu" else {}
            engines = [("plain", None, {}), ("prefixattn", adapters, {})]
            if args.paged_decode:
                engines.append(("prefixattn_paged", adapters, {"PREFIXATTN_VLLM_PAGED_DECODE": "1"}))
            for engine, ads, extra in engines:
                if deadline.expired(reserve_s=30):
                    add(dict(kind="skipped", phase="vllm", reason=f"time budget spent before engine {engine}"))
                    break
                try:
                    for rec in spawn_engine(dict(base, engine=engine, adapters=ads), root, deadline, {**env, **extra}):
                        add(rec)
                except (RuntimeError, subprocess.TimeoutExpired) as e:
                    add(dict(kind="skipped", phase="vllm", reason=timing.error_text(e, 1500)))
        if "hf" in args.phases and not deadline.expired(reserve_s=20):
            plen = settings.prefix_lens[0]
            add(run_hf(settings, model_dir, root / "adapters" / adapter_name(plen, 0), plen, device))

    lines = judge(records, args.smoke)
    print("\n".join(lines))
    (Path(args.out) / "serving.txt").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
