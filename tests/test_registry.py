"""The registered pyfunc, promotion with aliases, rollback and REST serving, for real."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

from storage import registry
from tasc.eval.promotion import PromotionPolicy, Scorecard

TASK = "prompt-completion"


def test_first_version_is_champion(pipeline_result):
    p = pipeline_result["promotion"]
    assert p["promoted"], p
    assert registry.alias_version(TASK, "champion") == p["version"]
    assert registry.alias_version(TASK, "challenger") == p["version"]


def test_pyfunc_from_registry_generates_with_the_draft(pipeline_result):
    import mlflow

    from tasc.decode.engine import DecodeConfig, generate
    from tasc.models import load_model

    model = mlflow.pyfunc.load_model(f"models:/{registry.registered_name(TASK)}@champion")
    prompts = ["Rewrite this date as YYYY-MM-DD: 4 July 1976", "Rewrite this date as YYYY-MM-DD: 1/2/2003"]
    out = model.predict(pd.DataFrame({"prompt": prompts}), params={"max_new_tokens": 12, "method": "tasc-spec"})
    assert len(out) == 2 and all(isinstance(t, str) for t in out)
    # Lossless: the registry model's speculative output equals plain greedy of the same weights.
    lm = load_model(str(pipeline_result["params"].model), dtype="float32", device="cpu")
    ref = generate(lm.model, lm.tokenizer, prompts, method="greedy", config=DecodeConfig(max_new_tokens=12))
    assert list(out) == [r.text for r in ref]
    sig = model.metadata.get_params_schema()
    assert {p.name for p in sig.params} == {"max_new_tokens", "method", "temperature"}


def test_pip_requirements_have_no_local_builds(pipeline_result):
    reqs = registry.pip_requirements()
    assert all("+" not in r for r in reqs)
    assert any(r.startswith("torch==") for r in reqs)


def _version_with(card: Scorecard, pipeline_result) -> str:
    """A new registered version of the same logged model with another scorecard."""
    champ = registry.alias_version(TASK, "champion")
    mv = registry.client().get_model_version(registry.registered_name(TASK), champ)
    return registry.register(mv.source, TASK, card)


def test_promotion_rollback_and_tags(pipeline_result):
    first = registry.alias_version(TASK, "champion")
    base = registry.scorecard_of(TASK, first)
    slow = _version_with(Scorecard(base.chars_per_s * 0.9, base.metric), pipeline_result)
    d = registry.promote(TASK, slow, PromotionPolicy(min_speedup=1.05))
    assert not d.promote and registry.alias_version(TASK, "champion") == first
    tags = registry.client().get_model_version(registry.registered_name(TASK), slow).tags
    assert tags["tasc.promotion.promote"] == "False" and "speedup" in tags["tasc.promotion.reason"]
    fast = _version_with(Scorecard(base.chars_per_s * 2, base.metric), pipeline_result)
    assert registry.promote(TASK, fast, PromotionPolicy(min_speedup=1.05)).promote
    assert registry.alias_version(TASK, "champion") == fast
    assert registry.alias_version(TASK, "previous") == first
    assert registry.rollback(TASK) == first
    assert registry.alias_version(TASK, "champion") == first


def test_concurrent_promotions_do_not_corrupt_the_aliases(pipeline_result):
    first = registry.alias_version(TASK, "champion")
    base = registry.scorecard_of(TASK, first)
    a = _version_with(Scorecard(base.chars_per_s * 3, base.metric), pipeline_result)
    b = _version_with(Scorecard(base.chars_per_s * 3, base.metric), pipeline_result)
    results = {}
    threads = [threading.Thread(target=lambda v=v: results.__setitem__(v, registry.promote(TASK, v))) for v in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    champ = registry.alias_version(TASK, "champion")
    assert champ in (a, b)
    loser = b if champ == a else a
    # The second decision was made against the new champion and recorded why it lost.
    assert not results[loser].promote
    tags = registry.client().get_model_version(registry.registered_name(TASK), loser).tags
    assert tags["tasc.promotion.promote"] == "False" and tags["tasc.promotion.reason"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mlflow_models_serve_answers_rest(pipeline_result):
    port = _free_port()
    env = dict(os.environ)
    # The scoring server's uvicorn lives next to this interpreter, as in an activated venv.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    cmd = [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m",
           f"models:/{registry.registered_name(TASK)}@champion", "--env-manager", "local", "-h", "127.0.0.1",
           "-p", str(port), "-w", "1"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 150
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                if proc.poll() is not None:
                    pytest.fail(f"mlflow models serve exited: {proc.stdout.read().decode()[-2000:]}")
                time.sleep(1)
        else:
            pytest.fail("mlflow models serve did not come up in 150 s")
        body = json.dumps({"dataframe_records": [{"prompt": "Rewrite this date as YYYY-MM-DD: 4 July 1976"}],
                           "params": {"max_new_tokens": 8, "method": "tasc-spec"}}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            answer = json.loads(resp.read())
        assert len(answer["predictions"]) == 1 and isinstance(answer["predictions"][0], str)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
