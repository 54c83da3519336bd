"""Decode attention (one query token per sequence): prefixattn against concat + SDPA and the no-prefix floor.

Methods, all on random bf16 data, checked against concat_sdpa's output before timing:
  floor           F.scaled_dot_product_attention(q, k, v, enable_gqa=True) on caches without a prefix.
  concat_sdpa     the same on caches [B, Hkv, P+Sk, D] that already hold a copy of the prefix in every
                  sequence (what HF/PEFT serve with; "concat_sdpa_default" in the baselines).
  prefixattn_X    prefixattn.prefix_attention(q, k, v, prefix_k, prefix_v, causal=True, backend=X) with
                  the prefix [Hkv, P, D] in its own buffer, X in {triton, cuda}.
  paged_X         prefixattn.prefix_attention_paged(q, k_cache, v_cache, block_table, seq_lens, prefix_k,
                  prefix_v, backend=X): the same K/V in pages [num_pages, page_size, Hkv, D] placed in a
                  random order (when the package has the paged form).
  variant_nosplit triton with split-K forced off, at B <= 8 only (where the plan splits): the candidate fix
                  for the B=1, Sk=256 miss (the merge launch). Information for the next change, not a target
                  row and never "best".
Each timing is the median per call over replays of a CUDA graph that calls the method on several input
sets in turn (graphs remove launch gaps, rotation keeps L2 honest); the same for every method.
Bandwidth is counted on the bytes a shared prefix must read: (B*Sk + P) * Hkv * D * 2 bytes, for K and V.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import report, timing
from .timing import Deadline, Progress, ResultWriter, error_text, rel_err

CHECK_TOL = 5e-2
ANCHOR_COPY_TBPS = 4.276  # docs/design.md, "Baselines and targets"; used when the ceiling phase did not run
PHASES = ("ceiling", "grid")


@dataclass(frozen=True)
class Config:
    heads_q: int
    heads_kv: int
    head_dim: int
    batches: tuple
    seqlens: tuple
    prefix_lens: tuple
    page_size: int


GPU = Config(32, 8, 128, (1, 32, 128, 256), (256, 2048, 16384), (16, 128, 512), 16)
QUICK = Config(32, 8, 128, (1, 128), (256, 2048), (16, 128, 512), 16)
SMOKE = Config(4, 2, 16, (1, 2), (16, 32), (4, 8), 8)


def build_paged(k: torch.Tensor, page_size: int, perm: torch.Tensor) -> torch.Tensor:
    """[B, Hkv, Sk, D] -> pages [B*Sk/page_size, page_size, Hkv, D], sequence b's page j at perm[b*pps + j]."""
    b, hkv, sk, d = k.shape
    pps = sk // page_size
    pages = torch.empty(b * pps, page_size, hkv, d, dtype=k.dtype, device=k.device)
    chunk = max(1, (1 << 30) // max(k[0].numel() * k.element_size(), 1))  # ~1 GB of transient copy at a time
    for start in range(0, b, chunk):
        part = k[start : start + chunk]
        n = part.shape[0]
        rows = part.reshape(n, hkv, pps, page_size, d).permute(0, 2, 3, 1, 4).reshape(n * pps, page_size, hkv, d)
        pages[perm[start * pps : (start + n) * pps]] = rows
    return pages


@dataclass
class Group:
    """The input sets of one (B, Sk): queries and sequence caches, shared by every P."""

    q: list
    k: list
    v: list
    k_pages: list
    v_pages: list
    block_table: list
    seq_lens: torch.Tensor


def _unsplit(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """fn with the triton decode plan forced to one split (set while it runs, so a graph capture records it)."""

    def call():
        from ..kernels import triton_decode

        with triton_decode.force(splits=1):
            return fn()

    return call


class Bench(timing.BenchRun):
    def __init__(self, args, cfg: Config, device, dtype, writer: ResultWriter, deadline: Deadline, progress: Progress):
        super().__init__(writer, deadline, progress)
        self.args, self.cfg, self.device, self.dtype = args, cfg, device, dtype
        self.copy_TBps = ANCHOR_COPY_TBPS
        self.copy_source = "anchor"
        import prefixattn

        self.pa = prefixattn
        self.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
        self.has_paged = hasattr(prefixattn, "prefix_attention_paged")

    def timer(self, fns):
        if not timing.is_cuda(self.device):
            return timing.time_fns(fns, self.device, warmup_ms=1, rep_ms=5, min_reps=3)
        if self.args.no_graphs:
            return timing.time_fns(fns, self.device, warmup_ms=self.args.warmup_ms, rep_ms=self.args.rep_ms)
        return timing.time_graph(fns, self.device, warmup_ms=self.args.warmup_ms, rep_ms=self.args.rep_ms)

    # -- phases
    def ceiling(self) -> None:
        if not timing.is_cuda(self.device):
            return
        try:
            rec = self.record(**timing.measure_copy_ceiling(self.device))
        except Exception as exc:  # noqa: BLE001
            self.fail(exc, phase="ceiling")
            return
        self.copy_TBps, self.copy_source = rec["TBps"], "measured"
        self.progress(f"ceiling {rec['what']}: {rec['TBps']:.2f} TB/s")

    def make_group(self, batch: int, seqlen: int, n_sets: int) -> Group:
        c, dev, dt = self.cfg, self.device, self.dtype
        q, k, v, kp, vp, bt = [], [], [], [], [], []
        pps = seqlen // c.page_size
        for _ in range(n_sets):
            q.append(torch.randn(batch, c.heads_q, 1, c.head_dim, device=dev, dtype=dt))
            k.append(torch.randn(batch, c.heads_kv, seqlen, c.head_dim, device=dev, dtype=dt))
            v.append(torch.randn(batch, c.heads_kv, seqlen, c.head_dim, device=dev, dtype=dt))
            if self.has_paged:
                perm = torch.randperm(batch * pps, device=dev)
                kp.append(build_paged(k[-1], c.page_size, perm))
                vp.append(build_paged(v[-1], c.page_size, perm))
                bt.append(perm.view(batch, pps).to(torch.int32))
        seq_lens = torch.full((batch,), seqlen, dtype=torch.int32, device=dev)
        return Group(q, k, v, kp, vp, bt, seq_lens)

    def group_bytes(self, batch: int, seqlen: int, plen: int) -> int:
        c = self.cfg
        seq = timing.kv_bytes(batch * seqlen, c.heads_kv, c.head_dim, self.dtype.itemsize)
        concat = timing.kv_bytes(batch * (seqlen + plen), c.heads_kv, c.head_dim, self.dtype.itemsize)
        return seq * (2 if self.has_paged else 1) + concat

    def fits(self, need: int) -> bool:
        if not timing.is_cuda(self.device):
            return True
        free, _ = torch.cuda.mem_get_info(self.device)
        return need * 1.1 + (1 << 30) < free and need < self.args.max_gb * 1e9

    def methods(self, g: Group, i: int, pk, pv, kc, vc) -> dict[str, Callable[[], torch.Tensor]]:
        """Zero-argument calls of every method on input set i."""
        pa = self.pa
        q, k, v = g.q[i], g.k[i], g.v[i]
        out = {"concat_sdpa": lambda: F.scaled_dot_product_attention(q, kc, vc, enable_gqa=True)}
        for be in self.backends:
            out[f"prefixattn_{be}"] = lambda be=be: pa.prefix_attention(q, k, v, pk, pv, causal=True, backend=be)
            if be == "triton" and q.shape[0] <= 8:
                out["variant_nosplit"] = _unsplit(
                    lambda: pa.prefix_attention(q, k, v, pk, pv, causal=True, backend="triton")
                )
            if self.has_paged:
                kp, vp, bt = g.k_pages[i], g.v_pages[i], g.block_table[i]
                out[f"paged_{be}"] = lambda be=be: pa.prefix_attention_paged(
                    q, kp, vp, bt, g.seq_lens, pk, pv, backend=be
                )
        return out

    def time_method(self, name: str, fns: list, base: dict, bytes_read: int, kv_cache: int, check=None) -> None:
        try:
            t = self.timer(fns)
        except Exception as exc:  # noqa: BLE001
            self.fail(exc, **{k: base[k] for k in ("B", "Sk", "P")}, method=name)
            return
        c = self.cfg
        needed = timing.decode_bytes_shared(
            base["B"], base["Sk"], base["P"], c.heads_kv, c.head_dim, self.dtype.itemsize
        )
        sec = t["ms"] * 1e-3
        rec = dict(
            base,
            method=name,
            **t,
            us=t["ms"] * 1e3,
            bytes_needed=needed,
            TBps_needed=needed / sec / 1e12,
            pct_of_copy=needed / sec / 1e12 / self.copy_TBps,
            bytes_read=bytes_read,
            TBps_read=bytes_read / sec / 1e12,
            kv_cache_GB_per_layer=kv_cache / 1e9,
            copy_TBps=self.copy_TBps,
            copy_source=self.copy_source,
            anchor_us=report.DECODE_ANCHORS_US.get((base["B"], base["Sk"], base["P"]))
            if name in ("concat_sdpa", "floor")
            else None,
        )
        if check is not None:
            rec.update(rel_err=check, correct=bool(check <= CHECK_TOL))
        self.record(**rec)
        flag = "" if rec.get("correct", True) else "  WRONG"
        self.progress(
            f"B={base['B']} Sk={base['Sk']} P={base['P']} {name}: {rec['us']:.1f} us, "
            f"{rec['TBps_needed']:.2f} TB/s ({100 * rec['pct_of_copy']:.0f}% of copy){flag}"
        )

    def group(self, batch: int, seqlen: int) -> None:
        c, dev, dt = self.cfg, self.device, self.dtype
        if self.out_of_time(f"B={batch} Sk={seqlen}"):
            return
        need = self.group_bytes(batch, seqlen, max(c.prefix_lens))
        if not self.fits(need):
            self.record(kind="skipped", reason=f"memory: needs ~{need / 1e9:.1f} GB", B=batch, Sk=seqlen)
            self.progress.note(f"B={batch} Sk={seqlen}: skipped, needs ~{need / 1e9:.1f} GB")
            return
        per_set = timing.kv_bytes(batch * seqlen, c.heads_kv, c.head_dim, dt.itemsize)
        n_sets = 1
        if timing.is_cuda(dev):  # enough sets that one pass over the smallest method's bytes is 3x L2
            n_sets = timing.rotation_sets(per_set, dev, minimum=1, memory_cap=self.args.max_gb * 1e9 / 4)
        try:
            g = self.make_group(batch, seqlen, n_sets)
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory: go on with smaller groups
            self.fail(exc, B=batch, Sk=seqlen, method="inputs")
            timing.synchronize(dev)
            torch.cuda.empty_cache() if timing.is_cuda(dev) else None
            return
        self.progress.note(f"B={batch} Sk={seqlen}: {n_sets} input sets")
        base = dict(
            kind="decode",
            B=batch,
            Sk=seqlen,
            P=0,
            Hq=c.heads_q,
            Hkv=c.heads_kv,
            D=c.head_dim,
            dtype=str(dt).replace("torch.", ""),
            page_size=c.page_size,
        )
        floor_fns = [
            lambda i=i: F.scaled_dot_product_attention(g.q[i], g.k[i], g.v[i], enable_gqa=True)  # noqa: F821 (g is deleted after use to free device memory)
            for i in range(n_sets)
        ]
        seq_kv = timing.kv_bytes(batch * seqlen, c.heads_kv, c.head_dim, dt.itemsize)
        self.time_method("floor", floor_fns, base, seq_kv, seq_kv)
        for plen in c.prefix_lens:
            if self.out_of_time(f"B={batch} Sk={seqlen} P={plen}"):
                break
            self.prefix_point(g, n_sets, dict(base, P=plen))
        del g
        if timing.is_cuda(dev):
            torch.cuda.empty_cache()

    def prefix_point(self, g: Group, n_sets: int, base: dict) -> None:
        c, dev, dt = self.cfg, self.device, self.dtype
        batch, seqlen, plen = base["B"], base["Sk"], base["P"]
        pks = [torch.randn(c.heads_kv, plen, c.head_dim, device=dev, dtype=dt) for _ in range(n_sets)]
        pvs = [torch.randn(c.heads_kv, plen, c.head_dim, device=dev, dtype=dt) for _ in range(n_sets)]
        kcs = [torch.cat([pk.unsqueeze(0).expand(batch, -1, -1, -1), k], dim=2) for pk, k in zip(pks, g.k)]
        vcs = [torch.cat([pv.unsqueeze(0).expand(batch, -1, -1, -1), v], dim=2) for pv, v in zip(pvs, g.v)]
        calls = [self.methods(g, i, pks[i], pvs[i], kcs[i], vcs[i]) for i in range(n_sets)]
        shared_kv = timing.decode_bytes_shared(batch, seqlen, plen, c.heads_kv, c.head_dim, dt.itemsize)
        concat_kv = timing.decode_bytes_concat(batch, seqlen, plen, c.heads_kv, c.head_dim, dt.itemsize)
        where = dict(B=batch, Sk=seqlen, P=plen)
        try:
            ref = calls[0]["concat_sdpa"]()
        except Exception as exc:  # noqa: BLE001
            self.fail(exc, **where, method="concat_sdpa")
            ref = None
        if ref is not None:
            self.time_method("concat_sdpa", [c_["concat_sdpa"] for c_ in calls], base, concat_kv, concat_kv)
        names = [n for n in calls[0] if n != "concat_sdpa"]
        for name in names:
            if self.out_of_time(f"B={batch} Sk={seqlen} P={plen} {name}"):
                return
            try:
                out = calls[0][name]()
                err = rel_err(out, ref) if ref is not None else None
            except Exception as exc:  # noqa: BLE001 - e.g. the cuda backend is not built: say so, go on
                if timing.is_fatal_cuda_error(exc):
                    self.fail(exc, **where, method=name)
                self.record(kind="unavailable", **where, method=name, error=error_text(exc))
                self.progress.note(f"B={batch} Sk={seqlen} P={plen} {name}: unavailable ({error_text(exc, 120)})")
                continue
            self.time_method(name, [c_[name] for c_ in calls], base, shared_kv, shared_kv, check=err)
        if not self.has_paged and (batch, seqlen, plen) == (c.batches[0], c.seqlens[0], c.prefix_lens[0]):
            self.record(kind="unavailable", method="paged", error="prefixattn has no prefix_attention_paged")

    def run(self, phases) -> None:
        if "ceiling" in phases:
            self.ceiling()
        if "grid" not in phases:
            return
        c = self.cfg
        # Most informative first: the target points, then the rest of the grid, largest memory last.
        groups = [(b, s) for s in c.seqlens for b in c.batches]
        priority = {(128, 2048): 0, (128, 256): 1, (1, 2048): 2, (1, 256): 3}
        groups.sort(key=lambda bs: (priority.get(bs, 10), bs[0] * bs[1]))
        for batch, seqlen in groups:
            self.group(batch, seqlen)


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv):
    p = argparse.ArgumentParser(prog="prefixattn bench decode", description=__doc__.split("\n")[0])
    p.add_argument("--phases", default=",".join(PHASES), help=f"comma list of {','.join(PHASES)}")
    p.add_argument("--quick", action="store_true", help="B in {1,128}, Sk in {256,2048}: the target points")
    p.add_argument("--backends", default=None, help="prefixattn backends, comma list (default: triton,cuda)")
    p.add_argument("--page-size", type=int, default=None)
    p.add_argument("--max-gb", type=float, default=80.0, help="skip (B, Sk) groups needing more device memory")
    p.add_argument("--no-graphs", action="store_true", help="time eager calls with events instead of graphs")
    p.add_argument(
        "--out",
        default=None,
        help=(
            "output directory (default: benchmarks/results; with --smoke a temporary directory, "
            "so CPU numbers never overwrite GPU results)"
        ),
    )
    p.add_argument("--warmup-ms", type=float, default=10.0)
    p.add_argument("--rep-ms", type=float, default=60.0)
    p.add_argument("--budget-s", type=float, default=None)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, float32, backend torch")
    p.add_argument("--device", default=None)
    return p.parse_args(argv)


ESTIMATES = dict(ceiling=2, grid=75)
QUICK_ESTIMATES = dict(ceiling=2, grid=30)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    device, phases = timing.device_and_phases(args, PHASES)
    if device is None:
        return 2
    cfg = SMOKE if args.smoke else (QUICK if args.quick else GPU)
    if args.page_size:
        cfg = Config(**{**cfg.__dict__, "page_size": args.page_size})
    args.backends = args.backends or ("torch" if device.type == "cpu" else "triton,cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    timing.print_estimates("decode", {p: (QUICK_ESTIMATES if args.quick else ESTIMATES)[p] for p in phases})
    out_dir = timing.results_dir(args.out, args.smoke)
    writer = ResultWriter(out_dir / "decode.json", timing.environment(device, argv))
    bench = Bench(args, cfg, device, dtype, writer, Deadline(args.budget_s), Progress("decode"))
    timing.run_phases(bench, phases, 1 if device.type == "cpu" else None)
    return timing.finish_run("decode", writer, out_dir, report.decode_targets, report.decode_table, report.decode_plot)


if __name__ == "__main__":
    sys.exit(main())
