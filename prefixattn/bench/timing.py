"""What every benchmark shares: timing, input rotation, FLOP/byte counts, the environment record, a JSON
writer that survives interruption, progress lines and a time budget. Method: benchmarks/NOTES.md.

Timing on CUDA uses device events around each call and reports the median over repeats, after a warm-up
(first call = compilation, excluded). Each repeat uses the next of several input sets, so that repeated
runs over one buffer do not measure the L2 cache; the eager timer also flushes L2 between repeats, as
triton.testing.do_bench does. On the CPU (smoke runs) the same loop runs with a host clock.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

L2_FALLBACK_BYTES = 50 * 2**20
FLUSH_BYTES = 256 * 2**20  # what triton.testing.do_bench writes between repeats to evict L2
FWD_BWD_FLOP_FACTOR = 3.5  # backward = 2.5x forward (5 matmuls against 2): the FlashAttention convention
REPO_ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------------- devices


def is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def synchronize(device) -> None:
    if is_cuda(device):
        torch.cuda.synchronize(device)


def l2_bytes(device) -> int:
    if not is_cuda(device):
        return L2_FALLBACK_BYTES
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "L2_cache_size", 0) or L2_FALLBACK_BYTES)


def rotation_sets(
    bytes_per_set: int, device, *, factor: float = 3.0, minimum: int = 2, cap: int = 256, memory_cap: float = 8e9
) -> int:
    """How many input sets to cycle through so that one pass over them is `factor` x the L2 size.

    At least `minimum` (when memory allows), at most `cap`, and never more than `memory_cap` bytes in all.
    """
    bytes_per_set = max(int(bytes_per_set), 1)
    want = max(minimum, math.ceil(factor * l2_bytes(device) / bytes_per_set))
    fit = max(1, int(memory_cap // bytes_per_set))
    return max(1, min(want, cap, fit))


@contextlib.contextmanager
def cpu_threads(n: int | None):
    """Run with n CPU threads (None: unchanged), restoring the count afterwards (tests run in-process)."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def tensor_bytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


# ---------------------------------------------------------------------------------------------- timing


def _summary(times_ms: Sequence[float], **extra) -> dict:
    ts = sorted(times_ms)
    q = statistics.quantiles(ts, n=5) if len(ts) >= 5 else [ts[0], ts[0], ts[-1], ts[-1]]
    return dict(ms=statistics.median(ts), ms_min=ts[0], ms_p20=q[0], ms_p80=q[-1], reps=len(ts), **extra)


def time_fns(
    fns: Sequence[Callable[[], object]],
    device,
    *,
    warmup_ms: float = 25.0,
    rep_ms: float = 100.0,
    min_reps: int = 5,
    max_reps: int = 2000,
    flush_l2: bool = True,
) -> dict:
    """Median milliseconds of one call, each repeat calling the next closure of `fns` (one per input set).

    The first call of every closure happens before timing (compilation, autotuning, lazy init).
    Returns dict(ms, ms_min, ms_p20, ms_p80, reps, sets, timing).
    """
    fns = list(fns)
    n = len(fns)
    for f in fns:
        f()
    synchronize(device)
    if not is_cuda(device):
        return _time_host(fns, warmup_ms, rep_ms, min_reps, max_reps)

    est_calls = max(5, n)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(est_calls):
        fns[i % n]()
    end.record()
    torch.cuda.synchronize(device)
    est = max(start.elapsed_time(end) / est_calls, 1e-4)
    n_warm = int(min(max(warmup_ms / est, 1), max_reps))
    n_rep = int(min(max(rep_ms / est, min_reps), max_reps))
    flush = torch.empty(FLUSH_BYTES // 4, dtype=torch.int32, device=device) if flush_l2 else None
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    for i in range(n_warm):
        fns[i % n]()
    for i in range(n_rep):
        if flush is not None:
            flush.zero_()
        starts[i].record()
        fns[i % n]()
        ends[i].record()
    torch.cuda.synchronize(device)
    return _summary(
        [s.elapsed_time(e) for s, e in zip(starts, ends)], sets=n, timing="events+l2flush" if flush_l2 else "events"
    )


def _time_host(fns, warmup_ms, rep_ms, min_reps, max_reps) -> dict:
    n = len(fns)
    t0 = time.perf_counter()
    fns[0]()
    est = max((time.perf_counter() - t0) * 1e3, 1e-3)
    for i in range(int(min(max(warmup_ms / est, 1), max_reps))):
        fns[i % n]()
    times = []
    for i in range(int(min(max(rep_ms / est, min_reps), max_reps))):
        t0 = time.perf_counter()
        fns[i % n]()
        times.append((time.perf_counter() - t0) * 1e3)
    return _summary(times, sets=n, timing="host_clock")


def time_graph(
    fns: Sequence[Callable[[], object]],
    device,
    *,
    warmup_ms: float = 25.0,
    rep_ms: float = 100.0,
    min_graph_ms: float = 0.5,
    max_calls: int = 512,
    min_reps: int = 5,
) -> dict:
    """Median milliseconds per call, timed as replays of a CUDA graph that calls fns in turn.

    A graph of many calls removes the launch gaps that dominate microsecond kernels (decode). If capture
    fails (an op that syncs or launches off-stream), falls back to time_fns and says why in graph_error.
    """
    fns = list(fns)
    if not is_cuda(device):
        return time_fns(fns, device, warmup_ms=warmup_ms, rep_ms=rep_ms)
    n = len(fns)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm-up off the capture stream, as torch.cuda.graphs advises
        for f in fns:
            f()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for f in fns:
            f()
        end.record()
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    est = max(start.elapsed_time(end) / n, 1e-4)
    calls = int(min(max(math.ceil(min_graph_ms / est), n), max(max_calls, n)))
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(calls):
                fns[i % n]()
        torch.cuda.synchronize(device)
    except Exception as exc:  # noqa: BLE001 - any capture failure means: time it eagerly instead
        torch.cuda.synchronize(device)
        result = time_fns(fns, device, warmup_ms=warmup_ms, rep_ms=rep_ms)
        result["graph_error"] = f"{type(exc).__name__}: {exc}"[:300]
        return result
    graph.replay()
    torch.cuda.synchronize(device)
    t0 = torch.cuda.Event(enable_timing=True)
    t1 = torch.cuda.Event(enable_timing=True)
    t0.record()
    graph.replay()
    t1.record()
    torch.cuda.synchronize(device)
    per_replay = max(t0.elapsed_time(t1), 1e-4)
    for _ in range(int(min(max(warmup_ms / per_replay, 1), 200))):
        graph.replay()
    n_rep = int(min(max(rep_ms / per_replay, min_reps), 1000))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    for i in range(n_rep):
        starts[i].record()
        graph.replay()
        ends[i].record()
    torch.cuda.synchronize(device)
    result = _summary(
        [s.elapsed_time(e) / calls for s, e in zip(starts, ends)], sets=n, timing="cuda_graph", calls_per_graph=calls
    )
    del graph
    return result


def peak_extra_bytes(fn: Callable[[], object], device) -> int | None:
    """Peak device memory one call allocates above what was allocated before it (None on the CPU)."""
    if not is_cuda(device):
        fn()
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device) - base)


def measure_copy_ceiling(device, nbytes: int = 2 * 2**30) -> dict:
    """Device-to-device copy bandwidth, counting bytes read plus bytes written (docs/design.md, "Timing method")."""
    src = torch.randn(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    r = time_fns([lambda: dst.copy_(src)], device, warmup_ms=10, rep_ms=50, flush_l2=False)  # noqa: F821 (deleted after use to free device memory)
    del src, dst
    return dict(kind="ceiling", what=f"d2d copy {nbytes / 1e9:.2f} GB", TBps=2 * nbytes / (r["ms"] * 1e-3) / 1e12, **r)


def measure_gemm_ceiling(device, n: int = 8192) -> dict:
    """bf16 matrix product rate on random data (zeros run faster: docs/design.md, "Timing method")."""
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    r = time_fns([lambda: a @ b], device, warmup_ms=10, rep_ms=60, flush_l2=False)  # noqa: F821 (deleted after use to free device memory)
    del a, b
    return dict(kind="ceiling", what=f"bf16 gemm {n}^3", TFLOPs=2 * n**3 / (r["ms"] * 1e-3) / 1e12, **r)


# ---------------------------------------------------------------------------------------------- counts


def attention_flops(
    batch: int, heads_q: int, seqlen_q: int, seqlen_k: int, prefix_len: int, head_dim: int, *, causal: bool = True
) -> float:
    """Forward FLOPs of the useful work: 2 matmuls x 2 FLOP per multiply-add over visible (query, key) pairs.

    Causal (bottom-right): Sq*(Sq+1)/2 pairs in the triangle, diagonal included, as the baselines count,
    plus Sq*(Sk-Sq) keys before the queries; plus Sq*P prefix pairs (every query sees the whole prefix).
    fwd+bwd = FWD_BWD_FLOP_FACTOR x this.
    """
    if causal:
        pairs = seqlen_q * (seqlen_k - seqlen_q) + seqlen_q * (seqlen_q + 1) / 2
    else:
        pairs = seqlen_q * seqlen_k
    pairs += seqlen_q * prefix_len
    return 4.0 * batch * heads_q * head_dim * pairs


def kv_bytes(tokens: int, heads_kv: int, head_dim: int, elt: int = 2) -> int:
    """Bytes of K plus V for `tokens` cached tokens of one layer."""
    return int(tokens) * heads_kv * head_dim * elt * 2


def decode_bytes_shared(batch: int, seqlen_k: int, prefix_len: int, heads_kv: int, head_dim: int, elt: int = 2) -> int:
    """The bytes a shared-prefix decode step must read: every sequence's K/V once and the prefix once."""
    return kv_bytes(batch * seqlen_k + prefix_len, heads_kv, head_dim, elt)


def decode_bytes_concat(batch: int, seqlen_k: int, prefix_len: int, heads_kv: int, head_dim: int, elt: int = 2) -> int:
    """The bytes concat + SDPA reads: a copy of the prefix in every sequence's cache."""
    return kv_bytes(batch * (seqlen_k + prefix_len), heads_kv, head_dim, elt)


# ---------------------------------------------------------------------------------------------- records


def _version(distribution: str) -> str | None:
    """Installed version from package metadata (no import: transformers alone takes seconds to import)."""
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def git_commit() -> str | None:
    if os.environ.get("PREFIXATTN_GIT_COMMIT"):
        return os.environ["PREFIXATTN_GIT_COMMIT"]
    try:
        sha = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except Exception:  # noqa: BLE001 - no git on the machine, or not a checkout
        return None
    if not re.fullmatch(r"[0-9a-f]{40}", sha):  # e.g. a copied tree whose .git holds no commits: "HEAD"
        return None
    return sha + ("+dirty" if dirty else "")


def source_digest() -> str:
    """A short hash of the package and kernel sources, so results tie to code even without git."""
    h = hashlib.sha256()
    for top in ("prefixattn", "csrc"):
        root = REPO_ROOT / top
        if not root.is_dir():
            continue
        for path in sorted(root.rglob("*")):
            if path.suffix in (".py", ".cu", ".cuh", ".cpp", ".h") and "__pycache__" not in path.parts:
                h.update(str(path.relative_to(REPO_ROOT)).encode())
                h.update(path.read_bytes())
    return h.hexdigest()[:12]


def _nvidia_smi() -> dict | None:
    query = "driver_version,clocks.sm,clocks.mem,clocks.max.sm,power.limit,temperature.gpu"
    try:
        out = (
            subprocess.run(
                ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=15,
            )
            .stdout.strip()
            .splitlines()
        )
    except Exception:  # noqa: BLE001 - no nvidia-smi
        return None
    return dict(zip(query.split(","), (v.strip() for v in out[0].split(",")))) if out else None


def environment(device, argv: Sequence[str] | None = None) -> dict:
    """The record that opens every results file: machine, versions, code."""
    import prefixattn

    env = dict(
        kind="env",
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        argv=list(argv) if argv is not None else sys.argv[1:],
        python=platform.python_version(),
        host=platform.node(),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        triton=_version("triton"),
        transformers=_version("transformers"),
        peft=_version("peft"),
        prefixattn=getattr(prefixattn, "__version__", None),
        prefixattn_path=str(Path(prefixattn.__file__).parent),
        git_commit=git_commit(),
        source_digest=source_digest(),
        triton_interpret=os.environ.get("TRITON_INTERPRET"),
        device=str(device),
    )
    try:
        import prefixattn._C  # noqa: F401

        env["cuda_extension"] = "built"
    except Exception as exc:  # noqa: BLE001 - report why the extension is missing
        env["cuda_extension"] = f"unavailable: {type(exc).__name__}: {exc}"[:200]
    if is_cuda(device):
        props = torch.cuda.get_device_properties(device)
        env.update(
            device_name=props.name,
            sm_count=props.multi_processor_count,
            capability=f"{props.major}.{props.minor}",
            total_memory_GB=props.total_memory / 1e9,
            l2_MB=l2_bytes(device) / 2**20,
            nvidia_smi=_nvidia_smi(),
        )
    else:
        env.update(device_name=platform.processor() or "cpu", cpu_count=os.cpu_count())
    return env


class ResultWriter:
    """Collects records and rewrites `path` (a JSON list) after each one, atomically, so a run that is
    killed half-way still leaves a valid file with everything measured so far."""

    def __init__(self, path, env: dict | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.records: list[dict] = []
        if env is not None:
            self.add(env)

    def add(self, record: dict) -> dict:
        self.records.append(_jsonable(record))
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.records, indent=1) + "\n")
        os.replace(tmp, self.path)
        return record


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def load_records(path) -> list[dict]:
    return json.loads(Path(path).read_text())


def error_text(exc: BaseException, limit: int = 400) -> str:
    return f"{type(exc).__name__}: {exc}".replace("\n", " ")[:limit]


def is_fatal_cuda_error(exc: BaseException) -> bool:
    """A sticky CUDA error (illegal address, launch failure): nothing on this device works afterwards."""
    text = str(exc).lower()
    return any(
        s in text
        for s in (
            "illegal memory access",
            "illegal address",
            "unspecified launch failure",
            "device-side assert",
            "misaligned address",
            "an illegal instruction",
        )
    )


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; inf if shapes differ, nan if out has NaN."""
    if out.shape != ref.shape:
        return float("inf")
    out, ref = out.double(), ref.double()
    if torch.isnan(out).any():
        return float("nan")
    denom = ref.norm().item()
    diff = (out - ref).norm().item()
    return diff / denom if denom > 0 else diff


# ---------------------------------------------------------------------------------------------- progress


class Deadline:
    """The wall-clock budget of a run; benchmarks stop cleanly (and say so) when it runs out."""

    def __init__(self, budget_s: float | None):
        self.t0 = time.monotonic()
        self.budget_s = budget_s

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def left(self) -> float:
        return math.inf if self.budget_s is None else self.budget_s - self.elapsed()

    def expired(self, reserve_s: float = 0.0) -> bool:
        return self.left() <= reserve_s


class Progress:
    """Concise progress lines on stderr: `[attention 12/69 41s] main P=128 concat_mask fwd 1.283 ms`."""

    def __init__(self, label: str, total: int | None = None, stream=None):
        self.label, self.total, self.done = label, total, 0
        self.stream = stream if stream is not None else sys.stderr
        self.t0 = time.monotonic()

    def __call__(self, message: str, advance: bool = True) -> None:
        if advance:
            self.done += 1
        count = f"{self.done}/{self.total}" if self.total else f"{self.done}"
        print(f"[{self.label} {count} {time.monotonic() - self.t0:.0f}s] {message}", file=self.stream, flush=True)

    def note(self, message: str) -> None:
        self(message, advance=False)


class BenchRun:
    """What every benchmark run shares: the results writer, the time budget, progress lines, and how a
    failure is recorded (a sticky CUDA error stops the run: nothing on the device works afterwards)."""

    reserve_s = 5.0  # stop this long before the budget ends, so the results are written in time

    def __init__(self, writer: ResultWriter, deadline: Deadline, progress: Progress):
        self.writer, self.deadline, self.progress = writer, deadline, progress
        self.stopped = False

    def record(self, **rec) -> dict:
        return self.writer.add(rec)

    def out_of_time(self, what: str) -> bool:
        if self.stopped:
            return True
        if self.deadline.expired(reserve_s=self.reserve_s):
            self.stopped = True
            self.record(kind="skipped", reason="time budget spent", next=what, elapsed_s=self.deadline.elapsed())
            self.progress.note(f"time budget spent; skipping the rest (next was {what})")
            return True
        return False

    def fail(self, exc: BaseException, kind: str = "error", limit: int = 400, **where) -> None:
        self.record(kind=kind, **where, error=error_text(exc, limit))
        label = " ".join(f"{k}={v}" for k, v in where.items())
        self.progress.note(f"{kind.upper() if kind == 'error' else kind} {label}: {error_text(exc, 200)}")
        if is_fatal_cuda_error(exc):
            self.stopped = True
            raise SystemExit(f"fatal CUDA error, stopping: {error_text(exc)}")


def device_and_phases(args, known_phases) -> tuple[torch.device | None, list]:
    """The device (--device, else CUDA unless --smoke) and the --phases list of a benchmark's command line;
    (None, []) after printing why when there is no GPU for a real run or a phase is unknown."""
    device = torch.device(args.device or ("cpu" if args.smoke or not torch.cuda.is_available() else "cuda"))
    if not args.smoke and device.type != "cuda":
        print("no CUDA device: run with --smoke for the CPU dry run", file=sys.stderr)
        return None, []
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = set(phases) - set(known_phases)
    if unknown:
        print(
            f"--phases: unknown {sorted(unknown)}; expected a comma list of {','.join(known_phases)}", file=sys.stderr
        )
        return None, []
    return device, phases


def print_estimates(label: str, estimates: dict, stream=None) -> None:
    """Print each phase's expected wall time before starting (the GPU lease is short)."""
    stream = stream if stream is not None else sys.stderr
    parts = ", ".join(f"{k} ~{v:.0f}s" for k, v in estimates.items())
    print(
        f"[{label}] phases and H200 estimates: {parts} (total ~{sum(estimates.values()):.0f}s)", file=stream, flush=True
    )


def results_dir(out: str | None, smoke: bool) -> Path:
    """--out, else benchmarks/results; a smoke run writes to a temporary directory so CPU numbers never
    overwrite GPU results."""
    if out:
        return Path(out)
    return Path(tempfile.gettempdir()) / "prefixattn-smoke" if smoke else Path("benchmarks/results")


def run_phases(bench, phases, cpu_threads_n: int | None) -> None:
    """Run a benchmark's phases; a fatal CUDA error (SystemExit from BenchRun.fail) ends the run, not the
    script, so everything measured until then is still reported."""
    try:
        with cpu_threads(cpu_threads_n):
            bench.run(phases)
    except SystemExit as exc:
        print(str(exc), file=sys.stderr)


def finish_run(name: str, writer: ResultWriter, out_dir: Path, targets, table, plot=None) -> int:
    """Add the target verdicts, write and print NAME.txt, draw NAME.png; exit code 1 if anything failed."""
    for t in targets(writer.records):
        writer.add(t)
    text = table(writer.records)
    (out_dir / f"{name}.txt").write_text(text)
    print(text)
    if plot is not None:
        try:  # a plotting problem must not cost the measurements
            png = plot(writer.records, out_dir / f"{name}.png")
        except Exception as exc:  # noqa: BLE001
            png = None
            print(f"no plot: {error_text(exc)}", file=sys.stderr)
        if png:
            print(f"wrote {out_dir / (name + '.json')}, {png}", file=sys.stderr)
    return 1 if any(r.get("kind") == "error" for r in writer.records) else 0
