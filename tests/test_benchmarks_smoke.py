"""The benchmarks run (CPU smoke mode), write the JSON the GPU run will produce, and measure the right things.

The GPU run happens once, so whatever can be checked here is: each script end to end on tiny shapes,
the baselines computing the same function as the reference, the FLOP/byte formulas against the anchors
(the baseline measurements in docs/design.md),
the paged-cache layout, the target verdicts, and gpu_check.sh's dry mode.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import prefixattn
from prefixattn.bench import attention, decode, e2e, report, timing

REPO = Path(__file__).resolve().parents[1]
ENV_KEYS = {"kind", "date", "torch", "triton", "transformers", "peft", "git_commit", "source_digest", "device"}


def load(path: Path) -> list[dict]:
    records = json.loads(path.read_text())
    assert records[0]["kind"] == "env" and ENV_KEYS <= set(records[0])
    return records


def as_gpu_run(records: list[dict]) -> list[dict]:
    """A smoke run's records as if a GPU run had written them: a dry run applies no targets, so the target
    logic is checked on its records this way."""
    return [dict(r, device="cuda", argv=[]) if r["kind"] == "env" else r for r in records]


# ---------------------------------------------------------------------------------------------- scripts


def test_attention_smoke_writes_table_json(tmp_path):
    rc = attention.main(["--smoke", "--out", str(tmp_path), "--phases", "main,gqa"])
    assert rc == 0
    records = load(tmp_path / "attention.json")
    rows = [r for r in records if r["kind"] == "attention"]
    keys = {"shape", "B", "Hq", "Hkv", "S", "D", "P", "method", "mode", "ms", "ms_p20", "ms_p80", "TFLOPs", "correct"}
    assert rows and all(keys <= set(r) for r in rows)
    # under TRITON_INTERPRET=1 (every CPU test run) the sdpa backend runs too: CPU flash + Triton interpreter
    assert {r["method"] for r in rows} == {"prefixattn", "concat_mask", "floor", "prefixattn_sdpa"}
    assert {r["mode"] for r in rows} == {"fwd", "fwdbwd"}
    assert {r["shape"] for r in rows} == {"main", "gqa"}
    assert all(r["ms"] > 0 for r in rows)
    checks = [r for r in records if r["kind"] == "attention_check"]
    assert checks and all(c["ok"] for c in checks)
    assert any("dprefix_k_rel_err" in c for c in checks)  # gradients are checked too, the prefix's included
    # a CPU dry run judges nothing: no targets in the JSON, no verdicts, speedups or TFLOP/s in the table
    assert not any(r["kind"] == "attention_target" for r in records)
    text = (tmp_path / "attention.txt").read_text()
    assert "CPU dry run" in text and "prefixattn" in text
    body = text.replace(report.DRY_RUN_NOTE, "")  # the note itself names what is left out
    assert not any(word in body for word in ("verdict", "MISS", "PASS", "TFLOP/s", "speedup", "limit"))
    tg = report.attention_targets(as_gpu_run(records))
    assert {(t["method"], t["shape"], t["mode"]) for t in tg} == {
        (a, s, m) for a in ("prefixattn", "prefixattn_sdpa") for s in ("main", "gqa") for m in ("fwd", "fwdbwd")
    }
    assert "pa_sdpa verdict" in report.attention_table(as_gpu_run(records))


def test_attention_methods_option_times_only_those(tmp_path):
    rc = attention.main(["--smoke", "--out", str(tmp_path), "--phases", "main", "--methods", "prefixattn_sdpa"])
    assert rc == 0
    rows = [r for r in load(tmp_path / "attention.json") if r["kind"] == "attention"]
    assert {r["method"] for r in rows} == {"prefixattn_sdpa", "concat_mask"}


def test_decode_smoke_writes_table_json(tmp_path):
    rc = decode.main(["--smoke", "--out", str(tmp_path)])
    assert rc == 0
    records = load(tmp_path / "decode.json")
    rows = [r for r in records if r["kind"] == "decode"]
    keys = {
        "B",
        "Sk",
        "P",
        "method",
        "us",
        "bytes_needed",
        "TBps_needed",
        "pct_of_copy",
        "kv_cache_GB_per_layer",
        "timing",
        "sets",
    }
    assert rows and all(keys <= set(r) for r in rows)
    assert {"floor", "concat_sdpa", "prefixattn_torch"} <= {r["method"] for r in rows}
    assert all(r["correct"] for r in rows if r["method"] == "prefixattn_torch")
    points = {(r["B"], r["Sk"], r["P"]) for r in rows if r["P"] > 0}
    assert points == {(b, s, p) for b in (1, 2) for s in (16, 32) for p in (4, 8)}
    if not hasattr(prefixattn, "prefix_attention_paged"):
        assert any(r["kind"] == "unavailable" and r["method"] == "paged" for r in records)
    # the B=1 "never slower than concat" target is evaluated for every B=1 point, once per layout
    layouts = 2 if hasattr(prefixattn, "prefix_attention_paged") else 1
    assert not any(r["kind"] == "decode_target" for r in records)  # a dry run judges nothing
    assert sum(t["B"] == 1 for t in report.decode_targets(as_gpu_run(records))) == 4 * layouts


def test_e2e_smoke_writes_json(tmp_path):
    rc = e2e.main(["--smoke", "--out", str(tmp_path), "--phases", "train,generate,kvbudget"])
    records = load(tmp_path / "e2e.json")
    train = {r["method"]: r for r in records if r["kind"] == "e2e_train_step"}
    gen = {r["method"]: r for r in records if r["kind"] == "e2e_generate"}
    assert {"floor", "peft"} <= set(train) and {"noprefix", "peft", "concat"} <= set(gen)
    assert all({"ms", "peak_GB", "B", "S", "P", "trainable_params"} <= set(r) for r in train.values())
    assert all({"s", "tok_per_s", "B", "new", "kv_cache_bytes", "cache_seqlen"} <= set(r) for r in gen.values())
    assert train["floor"]["trainable_params"] == 0 and train["peft"]["trainable_params"] > 0
    # same weights everywhere; the concatenated cache really holds the prefix, the no-prefix cache does not
    assert len({r["weights_checksum"] for r in list(train.values()) + list(gen.values())}) == 1
    assert gen["concat"]["cache_holds_prefix"] and not gen["noprefix"]["cache_holds_prefix"]
    assert any(r["kind"] == "e2e_peft_generate" for r in records)
    assert {r["method"] for r in records if r["kind"] == "e2e_kvbudget"} == {"prefixattn", "concat"}
    if hasattr(prefixattn, "init"):  # once the transformers integration lands, it must run here
        assert rc == 0 and "prefixattn" in train and "prefixattn" in gen
        assert "prefixattn_sdpa" in train  # the interpreter runs its Triton prefix part on the CPU
        assert not any(r["kind"] == "e2e_target" for r in records)  # a dry run judges nothing
        targets = {t["what"] for t in report.e2e_targets(as_gpu_run(records))}
        assert "train step prefixattn_sdpa / no prefix" in targets
        assert gen["prefixattn"]["cache_holds_prefix"] is False
    else:
        assert any(r["kind"] == "unavailable" and r["method"] == "prefixattn" for r in records)


def test_e2e_train_methods_option(tmp_path):
    rc = e2e.main(["--smoke", "--out", str(tmp_path), "--phases", "train", "--train-methods", "floor,prefixattn_sdpa"])
    assert rc == 0
    train = {r["method"] for r in load(tmp_path / "e2e.json") if r["kind"] == "e2e_train_step"}
    assert train == {"floor", "prefixattn_sdpa"}


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash, timeout")
def test_gpu_check_dry_run(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path / "out"), WORK=str(tmp_path / "work"), PYTHON=sys.executable)
    proc = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry", "--steps", "env,decode", "--budget", "120"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = tmp_path / "out"
    files = {p.name for p in out.iterdir()}
    assert (
        {"summary.txt", "results.tar.gz", "decode.json"}
        <= files
        <= {"summary.txt", "results.tar.gz", "decode.json", "decode.png"}
    )
    summary = (out / "summary.txt").read_text()
    assert "decode benchmark" in summary and "env        ok" in summary
    assert proc.stdout.rstrip().endswith(summary.rstrip().splitlines()[-1])  # the summary ends stdout


# ---------------------------------------------------------------------------------------------- what is measured


def test_baselines_compute_prefix_attention():
    """concat + mask, lower-right causal, the log-sum-exp merge and the floor compute what they claim."""
    torch.manual_seed(0)
    for shape in (attention.Shape("gqa", 2, 4, 2, 37, 16), attention.Shape("mha", 1, 2, 2, 20, 8)):
        plen = 5
        sets = attention.make_sets(shape, 1, "cpu", torch.float32)
        attention.set_prefix(sets, shape, plen, "cpu", torch.float32)
        q, k, v, pk, pv = (t.detach() for t in sets[0].args())
        ref = prefixattn.prefix_attention_reference(q.double(), k.double(), v.double(), pk.double(), pv.double())
        methods = attention.build_concat_mask(shape, plen, "cpu") + attention.build_concat_lowerright(
            shape, plen, "cpu"
        )
        for m in methods:
            assert timing.rel_err(m.fwd(q, k, v, pk, pv), ref) < 1e-5, m.note
        out_seq, lse_seq = prefixattn.prefix_attention_reference(q, k, v, return_lse=True)
        merged = attention._prefix_and_merge(q, pk, pv, out_seq, lse_seq, 1 / math.sqrt(shape.head_dim))
        assert timing.rel_err(merged, ref) < 1e-5
        floor = attention.build_floor(shape, "cpu")[0].fwd(q, k, v, None, None)
        assert timing.rel_err(floor, prefixattn.prefix_attention_reference(q.double(), k.double(), v.double())) < 1e-5
        mask = attention.prefix_causal_mask(shape.batch, shape.seqlen, plen, "cpu")
        assert mask[:, :, :, :plen].all() and not mask[0, 0, 0, plen + 1]  # prefix always, sequence causal


def test_paged_cache_layout():
    torch.manual_seed(0)
    b, hkv, sk, d, page = 3, 2, 24, 4, 8
    k = torch.randn(b, hkv, sk, d)
    perm = torch.randperm(b * sk // page)
    pages = decode.build_paged(k, page, perm)
    table = perm.view(b, sk // page)
    rebuilt = pages[table].reshape(b, sk, hkv, d).transpose(1, 2)  # [B, pages, page, Hkv, D] -> [B, Hkv, Sk, D]
    assert torch.equal(rebuilt, k)


def test_counts_match_the_anchors():
    # docs/design.md, "Baselines and targets": concat_mask P=16 fwd 1.2421 ms at 112.43 TFLOP/s; cuDNN floor
    # 0.2821 ms at 487.42 fwd, 1.2338 ms at 390.08 fwd+bwd; decode B=32 S=2048 P=0 0.07616 ms at 3.5246 TB/s.
    flops = timing.attention_flops(4, 32, 2048, 2048, 16, 128)
    assert flops / 1.2421120405197144e-3 / 1e12 == pytest.approx(112.432, rel=1e-4)
    floor = timing.attention_flops(4, 32, 2048, 2048, 0, 128)
    assert floor / 0.2821120023727417e-3 / 1e12 == pytest.approx(487.417, rel=1e-4)
    assert timing.FWD_BWD_FLOP_FACTOR * floor / 1.2337599992752075e-3 / 1e12 == pytest.approx(390.085, rel=1e-4)
    concat = timing.decode_bytes_concat(32, 2048, 0, 8, 128)
    assert concat / 0.0761599987745285e-3 / 1e12 == pytest.approx(3.52463, rel=1e-4)
    shared = timing.decode_bytes_shared(128, 2048, 512, 8, 128)
    assert shared == (128 * 2048 + 512) * 8 * 128 * 2 * 2
    assert timing.kv_bytes(1, 8, 128) == 4096


def test_targets_verdicts():
    base = dict(kind="attention", shape="main", S=2048, B=4, Hq=32, Hkv=32, D=128, dtype="bfloat16", TFLOPs=1.0)
    records = [
        dict(base, method="floor", P=0, mode="fwd", ms=0.28),
        dict(base, method="prefixattn", P=512, mode="fwd", ms=0.28 * 1.5 * 1.2 * 0.99, correct=True),
        dict(base, method="floor", P=0, mode="fwdbwd", ms=1.23),
        dict(base, method="prefixattn", P=512, mode="fwdbwd", ms=1.23 * 1.5 * 1.3 * 1.01, correct=True),
    ]
    verdicts = {t["mode"]: t["verdict"] for t in report.attention_targets(records)}
    assert verdicts == {"fwd": "PASS", "fwdbwd": "MISS"}
    records[1]["correct"] = False
    assert {t["mode"]: t["verdict"] for t in report.attention_targets(records)}["fwd"] == "WRONG"

    row = dict(kind="decode", Sk=256, P=512, pct_of_copy=0.5)
    dec = [
        dict(row, B=128, method="concat_sdpa", ms=1.0, us=1000.0),
        dict(row, B=128, method="prefixattn_triton", ms=0.49, us=490.0, correct=True),
        dict(row, B=1, method="concat_sdpa", ms=1.0, us=1000.0),
        dict(row, B=1, method="prefixattn_triton", ms=1.01, us=1010.0, correct=True),
    ]
    got = {(t["B"], t["verdict"]) for t in report.decode_targets(dec)}
    assert got == {(128, "PASS"), (1, "MISS")}


def test_result_writer_keeps_valid_json(tmp_path):
    w = timing.ResultWriter(tmp_path / "r.json", dict(kind="env"))
    w.add(dict(kind="x", value=float("nan"), t=torch.float32))
    assert json.loads((tmp_path / "r.json").read_text()) == [
        {"kind": "env"},
        {"kind": "x", "value": "nan", "t": "torch.float32"},
    ]


def test_rotation_and_timer():
    assert timing.rotation_sets(10 * 2**30, "cpu", minimum=1) == 1  # far above L2: one set
    assert timing.rotation_sets(2**20, "cpu") == 150  # 3 x 50 MB fallback L2 / 1 MB
    assert timing.rotation_sets(2**20, "cpu", memory_cap=4 * 2**20) == 4
    calls = []
    r = timing.time_fns([lambda: calls.append(0), lambda: calls.append(1)], "cpu", warmup_ms=0.1, rep_ms=0.5)
    assert r["reps"] >= 5 and r["ms"] >= 0 and set(calls) == {0, 1}  # both input sets are used


class _NoBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise NotImplementedError("backward kernel not written yet")


def test_pick_skips_wrong_variants_and_times_forward_without_backward(tmp_path):
    """The GPU run is one shot: a variant that disagrees is passed over, a missing backward costs only fwd+bwd."""
    shape = attention.Shape("t", 1, 2, 2, 16, 8)
    sets = attention.make_sets(shape, 1, "cpu", torch.float32)
    attention.set_prefix(sets, shape, 3, "cpu", torch.float32)
    good = attention.build_concat_mask(shape, 3, "cpu")[0]
    ref = attention.outputs(good, sets[0], backward=True)
    wrong = attention.Method("m", lambda *a: good.fwd(*a) * 1.5, "wrong")
    no_bwd = attention.Method("m", lambda *a: _NoBackward.apply(good.fwd(*a)), "forward only")
    writer = timing.ResultWriter(tmp_path / "r.json")
    bench = attention.Bench(
        attention.parse_args(["--smoke"]),
        torch.device("cpu"),
        torch.float32,
        writer,
        timing.Deadline(None),
        timing.Progress("t"),
    )
    m, check, tried = bench.pick([wrong, no_bwd], sets[0], ref, backward=True, shape="t", P=3, method="m")
    assert m.note.startswith("forward only") and not m.backward and check["ok"]
    assert "disagrees" in tried[0] and "backward kernel not written" in tried[1]
    assert any(r["kind"] == "error" and r["mode"] == "fwdbwd" for r in writer.records)
    m, check, _ = bench.pick([wrong], sets[0], ref, backward=True)  # the last variant is kept, flagged wrong
    assert m is wrong and check["ok"] is False


def test_plots_render(tmp_path):
    pytest.importorskip("matplotlib")
    rc = attention.main(["--smoke", "--out", str(tmp_path), "--phases", "main"])
    assert rc == 0 and (tmp_path / "attention.png").stat().st_size > 0
    assert decode.main(["--smoke", "--out", str(tmp_path)]) == 0 and (tmp_path / "decode.png").stat().st_size > 0


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash, timeout")
def test_gpu_next_dry_run(tmp_path):
    """The prepared next GPU run works end to end on the CPU (tiny shapes), the sdpa rows included."""
    env = dict(os.environ, OUT=str(tmp_path / "out"), WORK=str(tmp_path / "work"), PYTHON=sys.executable)
    proc = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_next.sh"), "--dry"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert "prefixattn_sdpa" in summary and "TIMEOUT" not in summary
    train = {r["method"] for r in load(tmp_path / "out" / "e2e.json") if r["kind"] == "e2e_train_step"}
    assert train == {"floor", "prefixattn", "prefixattn_sdpa"}


def test_decode_forced_variants_launch_the_plan_they_name(monkeypatch):
    """variant_nosplit / variant_fused / variant_cascade pass an explicit plan to the decode kernels (no module
    state): the launch gets that plan, and the result is still the reference's."""
    from prefixattn.kernels import triton_decode

    seen = []
    real = triton_decode.forward

    def spy(*args, plan=None):
        seen.append(plan)
        return real(*args, plan=plan)

    monkeypatch.setattr(triton_decode, "forward", spy)
    q, k, v = torch.randn(2, 4, 1, 16), torch.randn(2, 2, 40, 16), torch.randn(2, 2, 40, 16)
    pk, pv = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    ref = prefixattn.prefix_attention_reference(q, k, v, pk, pv)
    for force, check in (
        (dict(splits=1), lambda p: p.num_splits == 1 and not p.needs_merge),
        (dict(path="cascade", block_n=16), lambda p: p.cascade and p.config.block_n == 16),
    ):
        out = decode.forced_decode(q, k, v, pk, pv, **force)()
        assert check(seen[-1]), seen[-1]
        assert timing.rel_err(out, ref) < 1e-5
    assert decode.plan_fields(q, k, pk, path="cascade")["path"] == "cascade"


def test_decode_nosplit_variant_is_information_not_target(tmp_path, monkeypatch):
    # one (Sk, P) point at B=1 and 2; the interpreter is slow
    monkeypatch.setattr(decode, "SMOKE", decode.Config(4, 2, 16, (1, 2), (16,), (4,), 8))
    assert (
        decode.main(["--smoke", "--out", str(tmp_path), "--backends", "triton", "--warmup-ms", "0", "--rep-ms", "1"])
        == 0
    )
    records = load(tmp_path / "decode.json")
    rows = [r for r in records if r["kind"] == "decode" and r["method"] == "variant_nosplit"]
    assert rows and all(r["correct"] for r in rows)
    assert all(r["splits"] == 1 for r in rows)
    targets = report.decode_targets(as_gpu_run(records))
    assert targets and not any(t["method"] == "variant_nosplit" for t in targets)
