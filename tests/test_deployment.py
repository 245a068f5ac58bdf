"""A real Prefect server on loopback: serve the pipeline deployment, trigger a run with
parameters as a user would (`prefect deployment run`), and check the registry afterwards."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, seconds: float) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            if proc.poll() is not None:
                pytest.fail(f"process exited early: {proc.stdout.read().decode()[-3000:]}")
            time.sleep(1)
    pytest.fail(f"{url} did not answer in {seconds} s")


def test_triggered_deployment_registers_a_model(tmp_path, tiny_model_dir):
    port = _free_port()
    env = dict(os.environ)
    env.update(PREFECT_HOME=str(tmp_path / "prefect-server"), PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
               PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", PYTHONPATH=str(ROOT))
    procs = []
    try:
        server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        procs.append(server)
        _wait_http(f"http://127.0.0.1:{port}/api/health", server, 180)
        log = open(tmp_path / "serve.log", "w")
        serve = subprocess.Popen(
            [sys.executable, "-c", "from flows.pipeline import pipeline; pipeline.serve(name='test-on-demand')"],
            env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        procs.append(serve)
        params = {"spec": "prompt-completion", "model": str(tiny_model_dir), "limit": 2, "harvest_limit": 4,
                  "methods": "greedy,tasc-spec", "dtype": "float32", "max_n": 3, "force": True, "min_speedup": 0.0}
        deadline = time.time() + 120
        while True:  # the served deployment appears once the serving process has registered it
            res = subprocess.run([str(BIN / "prefect"), "deployment", "run", "tasc-pipeline/test-on-demand",
                                  "-p", f"params={json.dumps(params)}", "--watch", "--watch-timeout", "600"],
                                 env=env, cwd=ROOT, capture_output=True, text=True, timeout=700)
            if res.returncode == 0 or time.time() > deadline or "not found" not in (res.stdout + res.stderr).lower():
                break
            time.sleep(3)
        assert res.returncode == 0, (res.stdout + res.stderr)[-1500:] + (tmp_path / "serve.log").read_text()[-3000:]
        assert "Completed" in res.stdout
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
    from storage.registry import registered_name
    from storage.tracking import client

    c = client()
    versions = c.search_model_versions(f"name = '{registered_name('prompt-completion')}'")
    runs = [c.get_run(v.run_id) for v in versions]
    assert any(r.data.params.get("limit") == "2" and r.data.params.get("methods") == "greedy,tasc-spec" for r in runs)
