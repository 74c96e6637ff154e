"""The OpenAI-compatible server over loopback, started and stopped by the test: adapters given at start on
the command line (python -m reft_kernels.vllm.serve), chosen per request with vllm_xargs."""
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from test_offline import MAX_NEW, PROMPTS

START_TIMEOUT = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@pytest.fixture(scope="module")
def server(model_dir, adapters, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    # as `vllm serve` runs by default: the engine in its own process, which loads the plugin by its entry point
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1", "VLLM_LOGGING_LEVEL": "INFO"}
    env.pop("REFT_KERNELS_VLLM", None)
    cmd = [sys.executable, "-m", "reft_kernels.vllm.serve", model_dir,
           "--reft-adapter", f"lo={adapters['lo']}", "--reft-adapter", json.dumps({"di": adapters["di"]}),
           "--host", "127.0.0.1", "--port", str(port), "--enforce-eager", "--dtype", "float32",
           "--max-model-len", "256", "--gpu-memory-utilization", "0.5", "--block-size", "32", "--seed", "0",
           "--distributed-executor-backend", "uni"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited ({proc.returncode}):\n{log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"the server did not start in {START_TIMEOUT} s:\n{log.read_text()[-4000:]}")
            time.sleep(1)
        yield base, model_dir
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _complete(server, prompt, adapter):
    base, model = server
    body = {"model": model, "prompt": prompt, "max_tokens": MAX_NEW, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}
    if adapter is not None:
        body["vllm_xargs"] = {"reft_adapter": adapter}
    return _post(base + "/v1/completions", body)


def test_server_serves_adapters_per_request(server, adapters, reference):
    requests = [(p, a) for p in PROMPTS[1:] for a in ("lo", "di", None)]
    with ThreadPoolExecutor(len(requests)) as pool:  # concurrent: batched together by the engine
        results = list(pool.map(lambda r: _complete(server, *r), requests))
    for (p, a), (status, body) in zip(requests, results):
        assert status == 200, body
        assert body["choices"][0]["token_ids"] == reference.tokens(p, adapters[a] if a else None, MAX_NEW), (a, p)


def test_server_unknown_adapter_is_a_400_and_others_run_on(server, reference):
    with ThreadPoolExecutor(2) as pool:
        bad = pool.submit(_complete, server, PROMPTS[2], "nope")
        good = pool.submit(_complete, server, PROMPTS[3], None)
        (status, body), (good_status, good_body) = bad.result(), good.result()
    assert status == 400, body
    assert "unknown ReFT adapter 'nope'" in json.dumps(body) and "'lo'" in json.dumps(body)
    assert good_status == 200
    assert good_body["choices"][0]["token_ids"] == reference.tokens(PROMPTS[3], None, MAX_NEW)
