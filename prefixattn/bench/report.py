"""Tables, targets and plots from benchmark records (lists of dicts, as saved in the JSON files).

Nothing here imports torch or the package (benchmarks/summarize.py loads this file by path), so reading
results takes a fraction of a second: gpu_check.sh refreshes its summary after every step.
The benchmarks import their targets and anchors (the baseline measurements of docs/design.md, "Baselines and
targets") from here, so a table rebuilt from a JSON file that a timeout cut short matches the live one.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

# ---------------------------------------------------------------------------------------------- shared


def fmt_ms(x, width: int = 8) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-".rjust(width)
    return (f"{x:.3f}" if x < 100 else f"{x:.1f}").rjust(width)


def _pyplot():
    """matplotlib (the `bench` extra), imported only when a plot is asked for; None if missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print('matplotlib is not installed (from a checkout: pip install -e ".[bench]"): no PNG', file=sys.stderr)
        return None
    return plt


DRY_RUN_NOTE = (
    "CPU dry run (--smoke): tiny shapes in float32; the numbers only show that the benchmark runs. Nothing is "
    "judged here (no targets, verdicts, speedups, TFLOP/s or GPU time estimates): that takes a GPU run."
)


def is_dry_run(records: list[dict]) -> bool:
    """A --smoke (CPU) run: its timings say nothing about the kernels, so no target is applied to them."""
    env = next((r for r in records if r.get("kind") == "env"), {})
    return "--smoke" in (env.get("argv") or []) or str(env.get("device", "")).startswith("cpu")


# ---------------------------------------------------------------------------------------------- attention

FWD_TARGET, FWDBWD_TARGET = 1.2, 1.3  # prefixattn <= factor x floor x (1 + 2P/S)
ATTENTION_METHODS = (
    "concat_mask",
    "concat_lowerright",
    "concat_flex",
    "split_merge",
    "floor",
    "prefixattn",
    "prefixattn_fast",
    "prefixattn_sdpa",
)
TARGET_METHODS = ("prefixattn", "prefixattn_sdpa")  # the rows held to the targets
# docs/design.md, "Baselines and targets" (H200, 2026-11-29), main shape, ms: {(method, P, mode): ms}
ATTENTION_ANCHORS = {
    ("concat_mask", 16, "fwd"): 1.24,
    ("concat_mask", 16, "fwdbwd"): 4.38,
    ("concat_mask", 128, "fwd"): 1.28,
    ("concat_mask", 128, "fwdbwd"): 4.07,
    ("concat_mask", 512, "fwd"): 1.47,
    ("concat_mask", 512, "fwdbwd"): 4.65,
    ("concat_lowerright", 16, "fwd"): 0.94,
    ("concat_lowerright", 16, "fwdbwd"): 2.88,
    ("concat_lowerright", 128, "fwd"): 0.95,
    ("concat_lowerright", 128, "fwdbwd"): 2.92,
    ("concat_lowerright", 512, "fwd"): 1.12,
    ("concat_lowerright", 512, "fwdbwd"): 3.51,
    ("concat_flex", 128, "fwd"): 0.89,
    ("concat_flex", 128, "fwdbwd"): 2.36,
    ("split_merge", 16, "fwd"): 0.40,
    ("split_merge", 128, "fwd"): 0.63,
    ("split_merge", 512, "fwd"): 0.88,
    ("floor", 0, "fwd"): 0.28,
    ("floor", 0, "fwdbwd"): 1.23,
}


def attention_targets(records: list[dict]) -> list[dict]:
    """PASS/MISS of prefixattn (and its sdpa backend) against floor x (1 + 2P/S) x {1.2 fwd, 1.3 fwd+bwd}, per
    shape, P and mode. None for a dry run."""
    if is_dry_run(records):
        return []
    rows = [r for r in records if r.get("kind") == "attention"]
    floors = {(r["shape"], r["mode"]): r["ms"] for r in rows if r["method"] == "floor"}
    out = []
    for r in rows:
        if r["method"] not in TARGET_METHODS or (r["shape"], r["mode"]) not in floors:
            continue
        factor = FWD_TARGET if r["mode"] == "fwd" else FWDBWD_TARGET
        limit = factor * floors[(r["shape"], r["mode"])] * (1 + 2 * r["P"] / r["S"])
        ok = r["ms"] <= limit and r.get("correct") is not False
        out.append(
            dict(
                kind="attention_target",
                method=r["method"],
                shape=r["shape"],
                P=r["P"],
                mode=r["mode"],
                ms=r["ms"],
                floor_ms=floors[(r["shape"], r["mode"])],
                limit_ms=limit,
                factor=factor,
                ratio_to_limit=r["ms"] / limit,
                correct=r.get("correct"),
                verdict="PASS" if ok else ("WRONG" if r.get("correct") is False else "MISS"),
            )
        )
    return out


def _target_line(label: str, tg: dict, shape: str, plens, key: str) -> str:
    """One table row of target fields (fwd and fwd+bwd per P): a time/ratio in ms format, or the verdict."""
    cells = []
    for p in plens:
        f, b = tg.get((shape, p, "fwd")), tg.get((shape, p, "fwdbwd"))
        if key == "verdict":
            cells.append(f"{(f or {}).get('verdict', '-'):>11} {(b or {}).get('verdict', '-'):>8}")
        else:
            cells.append(fmt_ms(f and f[key], 11) + " " + fmt_ms(b and b[key], 8))
    return f"{label:<21}" + "".join(cells)


def attention_table(records: list[dict]) -> str:
    """The side-by-side table (ms, median) per shape, then targets and peak memory."""
    rows = [r for r in records if r.get("kind") == "attention"]
    if not rows:
        return "attention: no timings recorded\n"
    lines = []
    env = next((r for r in records if r.get("kind") == "env"), {})
    lines.append(
        f"attention benchmark  {env.get('device_name', '?')}  torch {env.get('torch')}  "
        f"triton {env.get('triton')}  commit {env.get('git_commit')}  src {env.get('source_digest')}"
    )
    dry = is_dry_run(records)
    if dry:
        lines.append(DRY_RUN_NOTE)
    for c in (r for r in records if r.get("kind") == "ceiling"):
        lines.append(
            f"  ceiling {c['what']}: " + (f"{c['TFLOPs']:.0f} TFLOP/s" if "TFLOPs" in c else f"{c['TBps']:.2f} TB/s")
        )
    targets = attention_targets(records)
    tgt, tgt_sdpa = (
        {(t["shape"], t["P"], t["mode"]): t for t in targets if t.get("method", "prefixattn") == m}
        for m in TARGET_METHODS
    )
    by = {(r["shape"], r["method"], r["P"], r["mode"]): r for r in rows}
    for shape in dict.fromkeys(r["shape"] for r in rows):
        srows = [r for r in rows if r["shape"] == shape]
        s0 = srows[0]
        plens = sorted({r["P"] for r in srows if r["P"] > 0})
        lines.append("")
        lines.append(
            f"{shape}: B={s0['B']} Hq={s0['Hq']} Hkv={s0['Hkv']} S={s0['S']} D={s0['D']} {s0['dtype']}"
            f"  ms (median); fb = fwd+bwd"
        )
        header = f"{'method':<21}" + "".join(f"{'P=' + str(p) + ' fwd':>12}{'fb':>8}" for p in plens)
        lines.append(header)
        for method in ATTENTION_METHODS:
            if not any(r["method"] == method for r in srows):
                continue
            cells = []
            for p in plens:
                pp = 0 if method == "floor" else p
                f, b = by.get((shape, method, pp, "fwd")), by.get((shape, method, pp, "fwdbwd"))
                mark = "!" if (f or b or {}).get("correct") is False else ""
                cells.append(fmt_ms(f and f["ms"], 11) + (mark or " ") + fmt_ms(b and b["ms"], 8))
            lines.append(f"{method:<21}" + "".join(cells))
        if dry:
            continue
        rows_of = [
            ("limit (target)", tgt, "limit_ms"),
            ("prefixattn/limit", tgt, "ratio_to_limit"),
            ("verdict", tgt, "verdict"),
        ]
        if any(key[0] == shape for key in tgt_sdpa):
            rows_of += [("pa_sdpa/limit", tgt_sdpa, "ratio_to_limit"), ("pa_sdpa verdict", tgt_sdpa, "verdict")]
        lines += [_target_line(label, tg, shape, plens, key) for label, tg, key in rows_of]
        cells = []
        for p in plens:
            f, b = by.get((shape, "prefixattn", p, "fwd")), by.get((shape, "prefixattn", p, "fwdbwd"))
            cells.append(
                ("-" if f is None else f"{f['TFLOPs']:.0f}").rjust(11)
                + " "
                + ("-" if b is None else f"{b['TFLOPs']:.0f}").rjust(8)
            )
        lines.append(f"{'prefixattn TFLOP/s':<21}" + "".join(cells))
        for other in ("concat_mask", "split_merge"):
            cells = []
            for p in plens:
                vals = []
                for mode, width in (("fwd", 11), ("fwdbwd", 8)):
                    a, o = by.get((shape, "prefixattn", p, mode)), by.get((shape, other, p, mode))
                    vals.append(f"{o['ms'] / a['ms']:.2f}x".rjust(width) if a and o else "-".rjust(width))
                cells.append(vals[0] + " " + vals[1])
            lines.append(f"{'speedup vs ' + other.replace('concat_', 'cat_'):<21}" + "".join(cells))
        cells = []
        for p in plens:
            a, o = by.get((shape, "prefixattn", p, "fwdbwd")), by.get((shape, "concat_mask", p, "fwdbwd"))
            ma = a and a.get("peak_extra_MB")
            mo = o and o.get("peak_extra_MB")
            cells.append(f"{(f'{ma:.0f}/{mo:.0f}' if ma is not None and mo is not None else '-'):>20}")
        lines.append(f"{'fb peak MB pa/concat':<21}" + "".join(cells))
    wrong = [r for r in records if r.get("kind") == "attention_check" and not r.get("ok")]
    for w in wrong:
        errs = {k: v for k, v in w.items() if k.endswith("rel_err")}
        lines.append(f"CHECK FAILED {w['shape']} P={w['P']} {w['method']}: {errs}")
    errors = [r for r in records if r.get("kind") == "error"]
    for e in errors[:8]:
        lines.append(
            f"error {e.get('shape', '')} P={e.get('P', '')} {e.get('method', '')} {e.get('mode', '')}: "
            f"{e['error'][:160]}"
        )
    if len(errors) > 8:
        lines.append(f"... {len(errors) - 8} more errors in the JSON")
    skipped = [r for r in records if r.get("kind") == "skipped"]
    if skipped:
        lines.append(f"stopped early: {skipped[0]['reason']} (next was {skipped[0]['next']})")
    return "\n".join(lines) + "\n"


def attention_plot(records: list[dict], path: Path) -> Path | None:
    """Bars per method for each shape (columns) and mode (rows), with the target limit marked."""
    plt = _pyplot()
    if plt is None:
        return None
    rows = [r for r in records if r.get("kind") == "attention"]
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    if not shapes:
        return None
    tgt = {(t["shape"], t["P"], t["mode"]): t["limit_ms"] for t in attention_targets(records)}
    fig, axes = plt.subplots(2, len(shapes), figsize=(5.5 * len(shapes), 7), squeeze=False)
    for col, shape in enumerate(shapes):
        srows = [r for r in rows if r["shape"] == shape]
        plens = sorted({r["P"] for r in srows if r["P"] > 0})
        methods = [m for m in ATTENTION_METHODS if any(r["method"] == m for r in srows)]
        width = 0.8 / max(len(methods), 1)
        for row, mode in enumerate(("fwd", "fwdbwd")):
            ax = axes[row][col]
            for i, m in enumerate(methods):
                ys = []
                for p in plens:
                    r = next(
                        (
                            r
                            for r in srows
                            if r["method"] == m and r["mode"] == mode and r["P"] == (0 if m == "floor" else p)
                        ),
                        None,
                    )
                    ys.append(r["ms"] if r else 0.0)
                # One colour per method across every panel (panels show different subsets of methods).
                color = f"C{ATTENTION_METHODS.index(m) % 10}"
                ax.bar([j + i * width for j in range(len(plens))], ys, width, label=m, color=color)
            for j, p in enumerate(plens):
                if (shape, p, mode) in tgt:
                    ax.hlines(
                        tgt[(shape, p, mode)],
                        j - width / 2,
                        j + 0.8 - width / 2,
                        colors="k",
                        linestyles="--",
                        label="target" if j == 0 else None,
                    )
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(plens))], [f"P={p}" for p in plens])
            ax.set_ylabel("ms (median)")
            s0 = srows[0]
            ax.set_title(
                f"{shape} {mode}: B={s0['B']} Hq={s0['Hq']} Hkv={s0['Hkv']} S={s0['S']} D={s0['D']}", fontsize=9
            )
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------- decode

BW_TARGET = 0.85  # x the measured copy ceiling, at B=128, Sk=2048
SPEEDUP_TARGET = 2.0  # x faster than concat_sdpa at B=128, Sk=256, P=512
# docs/design.md, "Baselines and targets": concat + SDPA decode, us: {(B, Sk, P): us}
DECODE_ANCHORS_US = {
    (128, 2048, 0): 254.8,
    (128, 2048, 16): 259.3,
    (128, 2048, 128): 270.0,
    (128, 2048, 512): 313.3,
    (32, 2048, 0): 76.2,
    (32, 2048, 16): 78.1,
    (32, 2048, 128): 80.4,
    (32, 2048, 512): 91.2,
}


def decode_method_order(names) -> list[str]:
    """floor, concat_sdpa, then prefixattn_<backend>, then paged_<backend>."""
    rank = {"floor": 0, "concat_sdpa": 1}
    return sorted(set(names), key=lambda m: (rank.get(m, 2 if m.startswith("prefixattn_") else 3), m))


def decode_short(method: str) -> str:
    return {"concat_sdpa": "concat"}.get(
        method, method.replace("prefixattn_", "").replace("paged_", "pg_").replace("variant_", "")
    )


def decode_targets(records: list[dict]) -> list[dict]:
    if is_dry_run(records):
        return []
    rows = [r for r in records if r.get("kind") == "decode"]
    by = {(r["B"], r["Sk"], r["P"], r["method"]): r for r in rows}
    out = []
    for r in rows:
        if not (r["method"].startswith("prefixattn_") or r["method"].startswith("paged_")):
            continue
        key = (r["B"], r["Sk"], r["P"])
        concat = by.get(key + ("concat_sdpa",))
        wrong = r.get("correct") is False
        base = dict(kind="decode_target", B=r["B"], Sk=r["Sk"], P=r["P"], method=r["method"], us=r["us"])
        if (r["B"], r["Sk"]) == (128, 2048):
            ok = r["pct_of_copy"] >= BW_TARGET
            out.append(
                dict(
                    base,
                    target=f">= {BW_TARGET:.0%} of copy ceiling",
                    value=r["pct_of_copy"],
                    verdict="WRONG" if wrong else ("PASS" if ok else "MISS"),
                )
            )
        if (r["B"], r["Sk"], r["P"]) == (128, 256, 512) and concat:
            speedup = concat["ms"] / r["ms"]
            out.append(
                dict(
                    base,
                    target=f">= {SPEEDUP_TARGET:.0f}x faster than concat_sdpa",
                    value=speedup,
                    verdict="WRONG" if wrong else ("PASS" if speedup >= SPEEDUP_TARGET else "MISS"),
                )
            )
        if r["B"] == 1 and concat:
            ratio = r["ms"] / concat["ms"]
            out.append(
                dict(
                    base,
                    target="not slower than concat_sdpa at B=1",
                    value=ratio,
                    verdict="WRONG" if wrong else ("PASS" if ratio <= 1.0 else "MISS"),
                )
            )
    return out


def decode_table(records: list[dict]) -> str:
    rows = [r for r in records if r.get("kind") == "decode"]
    if not rows:
        return "decode: no timings recorded\n"
    env = next((r for r in records if r.get("kind") == "env"), {})
    r0 = rows[0]
    copy = rows[-1].get("copy_TBps")
    timing_kind = {r.get("timing") for r in rows}
    dry = is_dry_run(records)
    lines = [DRY_RUN_NOTE] if dry else []
    lines += [
        f"decode benchmark  {env.get('device_name', '?')}  Hq={r0['Hq']} Hkv={r0['Hkv']} D={r0['D']} "
        f"{r0['dtype']}  copy ceiling {copy:.2f} TB/s ({rows[-1].get('copy_source')})  "
        f"timing: {','.join(sorted(timing_kind))}",
        "us per call (median); BW = (B*Sk+P)*Hkv*D*2*2 bytes / time of the best prefixattn method; "
        "KV GB per layer: prefixattn / concat",
    ]
    present = decode_method_order(r["method"] for r in rows)
    lines.append(
        f"{'B':>4} {'Sk':>6} {'P':>4} |"
        + "".join(f"{decode_short(m):>10}" for m in present)
        + (" | KV GB pa/concat" if dry else " | best       TB/s  %copy  x_concat | KV GB pa/concat")
    )
    by = {(r["B"], r["Sk"], r["P"], r["method"]): r for r in rows}
    points = sorted({(r["B"], r["Sk"], r["P"]) for r in rows if r["P"] > 0}, key=lambda x: (x[1], x[0], x[2]))
    for b, s, p in points:
        cells = []
        for m in present:
            r = by.get((b, s, 0 if m == "floor" else p, m))
            mark = "!" if r and r.get("correct") is False else " "
            cells.append(("-" if r is None else f"{r['us']:.1f}").rjust(9) + mark)
        cands = [
            by[(b, s, p, m)]
            for m in present
            if m not in ("floor", "concat_sdpa")
            and (b, s, p, m) in by
            and not m.startswith("variant_")
            and by[(b, s, p, m)].get("correct") is not False
        ]
        best = min(cands, key=lambda r: r["ms"]) if cands else None
        concat = by.get((b, s, p, "concat_sdpa"))
        tail = "" if dry else "   -"
        if best and not dry:
            x = f"{concat['ms'] / best['ms']:.2f}x" if concat else "-"
            tail = (
                f" {decode_short(best['method']):<9}{best['TBps_needed']:>6.2f} {100 * best['pct_of_copy']:>5.0f}% "
                f"{x:>8}"
            )
        kv_pa = best["kv_cache_GB_per_layer"] if best else None
        kv_c = concat["kv_cache_GB_per_layer"] if concat else None
        kv = f"{kv_pa:.3f}/{kv_c:.3f}" if kv_pa is not None and kv_c is not None else "-"
        lines.append(f"{b:>4} {s:>6} {p:>4} |" + "".join(cells) + ("" if dry else " |" + tail) + f" | {kv}")
    anchored = [r for r in rows if r.get("anchor_us")]
    if anchored:
        lines.append(
            "concat/floor vs anchors (us, measured/anchor): "
            + ", ".join(f"B={r['B']} Sk={r['Sk']} P={r['P']} {r['us']:.1f}/{r['anchor_us']:.1f}" for r in anchored)
        )
    groups: dict = {}
    for t in decode_targets(records):
        groups.setdefault((t["target"], t["method"]), []).append(t)
    if groups:
        lines.append("targets, per point Sk/P:value (value = fraction of copy ceiling, speedup, or time / concat):")
    for (target, method), ts in groups.items():
        verdicts = [t["verdict"] for t in ts]
        verdict = (
            "WRONG"
            if "WRONG" in verdicts
            else ("PASS" if set(verdicts) == {"PASS"} else f"MISS {verdicts.count('MISS')}/{len(ts)}")
        )
        values = " ".join(f"{t['Sk']}/{t['P']}:{t['value']:.2f}" for t in ts[:9]) + (" ..." if len(ts) > 9 else "")
        lines.append(f"  {verdict:<9} {method:<18} {target}: {values}")
    for r in records:
        if r.get("kind") == "skipped":
            lines.append(
                f"skipped: {r.get('reason')} " + " ".join(f"{k}={r[k]}" for k in ("B", "Sk", "next") if k in r)
            )
    unavailable = {r["method"]: r["error"] for r in records if r.get("kind") == "unavailable"}
    for m, e in unavailable.items():
        lines.append(f"unavailable {m}: {e[:150]}")
    errors = [r for r in records if r.get("kind") == "error"]
    for e in errors[:6]:
        lines.append(f"error B={e.get('B')} Sk={e.get('Sk')} P={e.get('P')} {e.get('method')}: {e['error'][:150]}")
    graph_errors = {r["method"]: r["graph_error"] for r in rows if r.get("graph_error")}
    for m, e in graph_errors.items():
        lines.append(f"graph capture failed for {m} (timed eagerly): {e[:150]}")
    return "\n".join(lines) + "\n"


def decode_plot(records: list[dict], path: Path) -> Path | None:
    """Achieved bandwidth (on the bytes a shared prefix needs) against batch, one panel per Sk."""
    plt = _pyplot()
    if plt is None:
        return None
    rows = [r for r in records if r.get("kind") == "decode" and r["P"] > 0]
    if not rows:
        return None
    seqlens = sorted({r["Sk"] for r in rows})
    plens = sorted({r["P"] for r in rows})
    fig, axes = plt.subplots(len(plens), len(seqlens), figsize=(4.5 * len(seqlens), 3.2 * len(plens)), squeeze=False)
    copy = rows[-1].get("copy_TBps")
    for i, p in enumerate(plens):
        for j, s in enumerate(seqlens):
            ax = axes[i][j]
            for m in decode_method_order(r["method"] for r in rows):
                pts = sorted(
                    (r["B"], r["TBps_needed"]) for r in rows if r["Sk"] == s and r["P"] == p and r["method"] == m
                )
                if pts:
                    ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=m)
            if copy:
                ax.axhline(copy, color="k", linestyle=":", label="copy ceiling")
                ax.axhline(BW_TARGET * copy, color="k", linestyle="--", linewidth=0.8, label="target")
            ax.set_xscale("log", base=2)
            ax.set_ylim(bottom=0)
            ax.set_title(f"Sk={s} P={p}", fontsize=9)
            ax.set_xlabel("batch")
            ax.set_ylabel("TB/s on needed bytes")
            if i == 0 and j == 0:
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------- e2e

TRAIN_TARGET = 1.03  # prefixattn training step within 3% of the no-prefix floor
GEN_TARGET = 0.97  # prefixattn generation at >= 0.97x the no-prefix throughput
E2E_ANCHORS = {
    ("train", "peft"): 117.24,
    ("train", "floor"): 104.41,
    ("generate", "noprefix"): 732.97,
    ("generate", "peft"): 778.03,
}


def e2e_targets(records: list[dict]) -> list[dict]:
    if is_dry_run(records):
        return []
    out = []
    train = {r["method"]: r for r in records if r.get("kind") == "e2e_train_step"}
    if "floor" in train:
        for m in ("prefixattn", "prefixattn_flat", "prefixattn_sdpa", "peft"):
            if m in train:
                ratio = train[m]["ms"] / train["floor"]["ms"]
                out.append(
                    dict(
                        kind="e2e_target",
                        what=f"train step {m} / no prefix",
                        value=ratio,
                        limit=TRAIN_TARGET,
                        verdict=("PASS" if ratio <= TRAIN_TARGET else "MISS") if m.startswith("prefixattn") else "info",
                    )
                )
    gen = {r["method"]: r for r in records if r.get("kind") == "e2e_generate" and r["phase"] == "generate"}
    if "noprefix" in gen:
        for m in ("prefixattn", "concat", "peft"):
            if m in gen:
                ratio = gen[m]["tok_per_s"] / gen["noprefix"]["tok_per_s"]
                out.append(
                    dict(
                        kind="e2e_target",
                        what=f"generate tok/s {m} / no prefix",
                        value=ratio,
                        limit=GEN_TARGET,
                        verdict=("PASS" if ratio >= GEN_TARGET else "MISS") if m == "prefixattn" else "info",
                    )
                )
    return out


def e2e_table(records: list[dict]) -> str:
    env = next((r for r in records if r.get("kind") == "env"), {})
    lines = [
        f"e2e benchmark  {env.get('device_name', '?')}  transformers {env.get('transformers')}  peft {env.get('peft')}"
    ]
    if is_dry_run(records):
        lines.append(DRY_RUN_NOTE)
    train = [r for r in records if r.get("kind") == "e2e_train_step"]
    if train:
        r0 = train[0]
        lines.append(f"train step  B={r0['B']} S={r0['S']} P={train[-1]['P']}   ms (median)   peak GB   [anchor ms]")
        for r in train:
            anchor = f"[{r['anchor_ms']:.0f}]" if r.get("anchor_ms") else ""
            lines.append(f"  {r['method']:<16}{r['ms']:>9.1f}{(r.get('peak_GB') or 0):>10.1f}   {anchor}")
    gen = [r for r in records if r.get("kind") == "e2e_generate"]
    if gen:
        lines.append(
            "generate    phase     method        B   new      s    tok/s  peak GB  KV cache GB  [anchor tok/s]"
        )
        for r in gen:
            kv = r.get("kv_cache_bytes")
            anchor = f"[{r['anchor_tok_per_s']:.0f}]" if r.get("anchor_tok_per_s") else ""
            lines.append(
                f"            {r['phase']:<9} {r['method']:<12}{r['B']:>4}{r['new']:>6}{r['s']:>7.2f}"
                f"{r['tok_per_s']:>9.0f}{(r.get('peak_GB') or 0):>9.1f}"
                f"{(kv / 1e9 if kv else 0):>13.3f}  {anchor}"
            )
    for r in records:
        if r.get("kind") == "e2e_peft_generate":
            agree = ", ".join(
                f"{k.replace('token_agreement_with_', 'agree w/ ')} {v:.2f}"
                for k, v in r.items()
                if k.startswith("token_agreement")
            )
            lines.append(f"PEFT generate(): {r.get('conclusion', '?')} ({agree})")
    kvb = [r for r in records if r.get("kind") == "e2e_kvbudget"]
    for r in kvb:
        meas = r.get("measured_bytes_per_seq")
        meas_s = f", measured {meas / 1e6:.2f}" if meas else ""
        lines.append(
            f"KV budget {r['kv_budget_GB']:g} GB: {r['method']:<10} {r['bytes_per_seq'] / 1e6:.2f} MB/seq"
            f"{meas_s} -> max batch {r['max_batch']}"
        )
    for t in e2e_targets(records):
        lines.append(f"  {t['verdict']:<5} {t['what']}: {t['value']:.3f} (limit {t['limit']})")
    for r in records:
        if r.get("kind") in ("error", "unavailable"):
            where = " ".join(f"{k}={r[k]}" for k in ("phase", "method", "B") if k in r)
            lines.append(f"{r['kind']} {where}: {r['error'][:200]}")
        if r.get("kind") == "skipped":
            lines.append(f"stopped early: {r['reason']} (next was {r.get('next')})")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- summary

BRIEF_DECODE_POINTS = {(1, 256), (1, 2048), (128, 256), (128, 2048)}


def render_dir(directory: Path, brief: bool = False) -> str:
    """Every benchmark's table from DIR/{attention,decode,e2e}.json (complete or cut short by a timeout).

    brief keeps the decode table to the target points (for the end of a GPU run's output)."""
    parts = []
    tables = dict(attention=attention_table, decode=decode_table, e2e=e2e_table)
    for name, table in tables.items():
        path = Path(directory) / f"{name}.json"
        if not path.exists():
            parts.append(f"{name}: no results ({path.name} missing)\n")
            continue
        try:
            records = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            parts.append(f"{name}: unreadable {path.name}: {exc}\n")
            continue
        if brief and name == "decode":
            kept = [r for r in records if r.get("kind") != "decode" or (r["B"], r["Sk"]) in BRIEF_DECODE_POINTS]
            if any(r.get("kind") == "decode" for r in kept):
                records = kept
        parts.append(table(records))
    return "\n".join(parts)


def summary_main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="prefixattn bench summary", description="Print the benchmark tables and targets from saved JSON results."
    )
    p.add_argument("directory", nargs="?", default="benchmarks/results")
    p.add_argument("--brief", action="store_true", help="decode table at the target points only")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    print(render_dir(Path(args.directory), brief=args.brief))
    return 0
