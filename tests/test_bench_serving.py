"""The serving benchmark's pieces that need no vLLM: its cases, its verdicts, and a dry run that records why the
vLLM rows are missing when vLLM is not installed (this suite's environment never has it)."""

from __future__ import annotations

import json

import pytest

from prefixattn.bench import serving


def test_cases_cover_the_grid():
    s = serving.FULL
    plain = serving.engine_cases(s, "plain")
    ours = serving.engine_cases(s, "prefixattn")
    assert [c["case"] for c in plain].count("pasted_text") == len(s.prefix_lens) * len(s.distinct)
    prefixed = [c for c in ours if c["case"] == "prefixed_100pct"]
    assert {(c["P"], c["distinct"]) for c in prefixed} == {(p, k) for p in s.prefix_lens for k in s.distinct}
    for c in prefixed:  # every request prefixed, over exactly `distinct` adapters of that length
        assert len(c["names"]) == s.requests and len(set(c["names"])) == c["distinct"]
        assert all(n.startswith(f"p{c['P']}_") for n in c["names"])
    assert any(c["case"] == "prefixed_0pct" and c["prefixed"] == 0.0 for c in ours)


def test_pasted_prompts_carry_the_prefix_text():
    s = serving.SMOKE
    texts = [[1, 2, 3, 4], [5, 6, 7, 8]]
    prompts = serving.prompts_for(s, seed=3, pasted=texts)
    assert len(prompts) == s.requests
    for i, p in enumerate(prompts):
        assert p["prompt_token_ids"][:4] == texts[i % 2] and len(p["prompt_token_ids"]) == 4 + s.prompt_len
    again = serving.prompts_for(s, seed=3)
    assert [p["prompt_token_ids"] for p in again] == [p["prompt_token_ids"][4:] for p in prompts]


def row(engine, case, tok_s, P=16, distinct=1):
    return dict(kind="serving", engine=engine, case=case, P=P, distinct=distinct, requests=256, tok_s=tok_s)


@pytest.mark.parametrize("ours,verdict", [(960.0, "PASS"), (940.0, "FAIL")])
def test_throughput_target_is_judged_against_plain_vllm(ours, verdict):
    rows = [row("plain", "no_prefix", 1000.0, P=0), row("prefixattn", "prefixed_100pct", ours)]
    lines = serving.judge(rows, smoke=False)
    target = [x for x in lines if x.startswith("target") and "plain vLLM" in x]
    assert len(target) == 1 and target[0].endswith(verdict)


def test_hf_target_and_smoke_judges_nothing():
    rows = [
        row("plain", "no_prefix", 1000.0, P=0),
        row("prefixattn", "prefixed_100pct", 990.0),
        row("hf_generate", "prefixed_100pct", 100.0),
    ]
    assert any("HF generate()" in x and x.endswith("FAIL") for x in serving.judge(rows, smoke=False))  # 9.9x
    rows[2]["tok_s"] = 90.0
    assert any("HF generate()" in x and x.endswith("PASS") for x in serving.judge(rows, smoke=False))
    smoke = serving.judge(rows, smoke=True)
    assert not any(x.startswith("target") for x in smoke) and "nothing is judged" in smoke[-1]


def test_dry_run_without_vllm_says_why(tmp_path, capsys):
    pytest.importorskip("transformers")
    if serving.vllm_available() is None:
        pytest.skip("vLLM is installed here; this test is about its absence")
    assert serving.main(["--smoke", "--out", str(tmp_path), "--phases", "merge,vllm"]) == 0
    records = json.loads((tmp_path / "serving.json").read_text())
    skipped = [r for r in records if r.get("kind") == "skipped"]
    assert len(skipped) == 1 and skipped[0]["phase"] == "vllm" and "not importable" in skipped[0]["reason"]
    merges = [r for r in records if r.get("kind") == "merge"]
    assert merges and all(r["ms"] > 0 for r in merges)
    out = capsys.readouterr().out
    assert "dry run" in out and "skipped vllm" in out
