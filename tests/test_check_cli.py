"""`prefixattn check`: every available backend against the float64 reference, refusals printed as skips."""

from prefixattn import check


def test_check_runs_every_cpu_backend_and_passes(capsys):
    rc = check.main(["--cases", "mha causal,gqa padded,decode"])
    text = capsys.readouterr().out
    assert rc == 0 and "all checks passed" in text
    assert check.available_backends(__import__("torch").device("cpu")) == ["torch", "triton", "sdpa"]
    rows = [line.split() for line in text.splitlines() if line.startswith(("mha", "gqa", "decode"))]
    sdpa = [r for r in rows if "sdpa" in r]
    assert any(r[-1] == "ok" for r in sdpa)
    assert any("skip:" in r and "key_padding_mask" in " ".join(r) for r in sdpa)  # refused, not failed
    assert not any(r[-1] == "FAIL" for r in rows)
