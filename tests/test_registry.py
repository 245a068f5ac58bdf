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
import uuid
from pathlib import Path

import pandas as pd
import pytest

from storage import registry
from tasc.eval.promotion import PromotionPolicy, Scorecard

TASK = "prompt-completion"


@pytest.mark.slow
def test_first_version_is_champion(pipeline_result):
    p = pipeline_result["promotion"]
    assert p["promoted"], p
    assert pipeline_result["aliases"] == {"champion": p["version"], "challenger": p["version"]}


@pytest.mark.slow
def test_pyfunc_from_registry_generates_with_the_draft(pipeline_result):
    import mlflow

    from tasc.decode.engine import DecodeConfig, generate
    from tasc.models import load_model

    # By version: @champion moves as other tests promote (the served test below uses the alias).
    version = pipeline_result["promotion"]["version"]
    model = mlflow.pyfunc.load_model(f"models:/{registry.registered_name(TASK)}/{version}")
    prompts = ["Rewrite this date as YYYY-MM-DD: 4 July 1976", "Rewrite this date as YYYY-MM-DD: 1/2/2003"]
    out = model.predict(pd.DataFrame({"prompt": prompts}), params={"max_new_tokens": 12, "method": "tasc-spec"})
    assert len(out) == 2 and all(isinstance(t, str) for t in out)
    # Lossless: the registry model's speculative output equals plain greedy of the same weights.
    lm = load_model(str(pipeline_result["params"].model), dtype="float32", device="cpu")
    ref = generate(lm.model, lm.tokenizer, prompts, method="greedy", config=DecodeConfig(max_new_tokens=12))
    assert list(out) == [r.text for r in ref]
    sig = model.metadata.get_params_schema()
    assert {p.name for p in sig.params} == {"max_new_tokens", "method", "temperature"}


def test_pip_requirements_have_no_local_builds():  # needs no registered model: not slow
    reqs = registry.pip_requirements()
    assert all("+" not in r for r in reqs)
    assert any(r.startswith("torch==") for r in reqs)


def _version_with(card: Scorecard, pipeline_result) -> str:
    """A new registered version of the same logged model with another scorecard."""
    champ = registry.alias_version(TASK, "champion")
    mv = registry.client().get_model_version(registry.registered_name(TASK), champ)
    return registry.register(mv.source, TASK, card)


@pytest.mark.slow
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


@pytest.mark.slow
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


def _new_version(task: str, card: Scorecard, tmp_path: Path) -> str:
    """A registered version with only a scorecard: promotion never loads the model."""
    src = tmp_path / "model"
    src.mkdir(exist_ok=True)
    return registry.register(str(src), task, card)


def _task() -> str:
    return f"promo-{uuid.uuid4().hex[:8]}"


def test_promoting_the_champion_again_keeps_the_rollback_target(tmp_path):
    task = _task()
    first = _new_version(task, Scorecard(100.0, 0.5), tmp_path)
    assert registry.promote(task, first).promote
    again = registry.promote(task, first)
    assert again.promote and "already is champion" in again.reason
    assert registry.alias_version(task, "previous") is None  # not the champion itself
    with pytest.raises(LookupError):
        registry.rollback(task)
    fast = _new_version(task, Scorecard(300.0, 0.5), tmp_path)
    assert registry.promote(task, fast).promote
    retried = registry.promote(task, fast)  # e.g. a retried promotion task
    assert retried.promote and f"previous stays {first}" in retried.reason
    assert registry.alias_version(task, "champion") == fast
    assert registry.alias_version(task, "previous") == first
    tags = registry.client().get_model_version(registry.registered_name(task), fast).tags
    assert "speedup" in tags["tasc.promotion.reason"]  # the decision it won on is kept
    assert registry.rollback(task) == first
    assert registry.alias_version(task, "champion") == first


def test_alias_lease_excludes_and_breaks_a_stale_one():
    task = _task()
    with registry._alias_lease(task):
        with pytest.raises(TimeoutError, match="held by another"):
            with registry._alias_lease(task, wait=0.3):
                pass
    c = registry.client()
    c.create_registered_model(registry.lease_name(task),
                              tags={"tasc.lease.owner": "crashed", "tasc.lease.expires": str(time.time() - 1)})
    with registry._alias_lease(task, wait=5):
        lease = c.get_registered_model(registry.lease_name(task))
        assert lease.tags["tasc.lease.owner"] != "crashed"
    with pytest.raises(Exception, match="RESOURCE_DOES_NOT_EXIST|not found|does not exist"):
        c.get_registered_model(registry.lease_name(task))  # released


def test_descriptions_explain_the_aliases_and_each_decision(tmp_path):
    """What the MLflow UI shows, read back through the client: the registered model says what
    the aliases mean, how to load the champion and roll back; each version's description is its
    promotion decision in one line."""
    task = _task()
    c = registry.client()
    name = registry.registered_name(task)

    def described(version: str) -> str:
        return c.get_model_version(name, version).description

    first = _new_version(task, Scorecard(100.0, 0.5, baseline_metric=0.5), tmp_path)
    assert described(first).startswith("registered as challenger, not judged by the promotion rule yet: 100.0")
    assert registry.promote(task, first).promote
    model = c.get_registered_model(name).description
    for text in ("`champion`", "`challenger`", "`previous`", f"models:/{name}@champion", f"tasc rollback {task}",
                 '"Promote model"', "copies a version into another registered model", "not tasc's promotion"):
        assert text in model, text
    assert described(first) == ("promoted: metric +0.000 vs plain greedy; first version: metric 0.5000 accepted: "
                                "no metric floor is set (metric_floor=0)")
    slow = _new_version(task, Scorecard(50.0, 0.5), tmp_path)
    assert not registry.promote(task, slow).promote
    assert described(slow) == f"kept as challenger: 0.50x chars/s vs v{first}, metric +0.000; speedup 0.500x " \
                              "(absolute chars/s of two runs: no same-run reference on both) is below 1.05x"
    fast = _new_version(task, Scorecard(154.0, 0.5), tmp_path)
    assert registry.promote(task, fast).promote
    assert described(fast).startswith(f"promoted: 1.54x chars/s vs v{first}, metric +0.000; speedup 1.540x (")
    assert registry.promote(task, fast).promote  # again: a no-op that keeps the description it won with
    assert described(fast).startswith("promoted: 1.54x")
    assert registry.rollback(task) == first
    assert described(fast).startswith(f"rolled back: v{first} is champion again (`tasc rollback`); before: promoted")
    assert c.get_registered_model(name).description == model  # registering again keeps it


def test_version_from_a_run_gets_its_scorecard_table_and_links(tmp_path):
    import mlflow

    from storage.tracking import experiment_id

    task = _task()
    c = registry.client()
    name = registry.registered_name(task)
    run_id = c.create_run(experiment_id(f"tasc-{task}")).info.run_id
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "MLmodel").write_text("flavors: {}\n")  # enough to register; never loaded here
    c.log_artifacts(run_id, str(tmp_path / "model"), "model")
    chart = f"runs:/{run_id}/report/report.png"
    version = registry.register(f"runs:/{run_id}/model", task, Scorecard(120.0, 0.75, corpus_version="abc"),
                                tags={"tasc.bench.run_id": run_id, "tasc.bench.chart": chart})
    tags = c.get_model_version(name, version).tags
    assert tags["tasc.bench.run_id"] == run_id and tags["tasc.bench.chart"] == chart
    assert tags["tasc.scorecard.artifact"] == f"runs:/{run_id}/scorecard/{name}-v{version}.md"
    table = mlflow.artifacts.load_text(tags["tasc.scorecard.artifact"])
    assert f"# Scorecard of {name} v{version}" in table
    assert "| task metric | 0.7500 |" in table and "| corpus version | abc |" in table


@pytest.mark.slow
def test_pipeline_version_links_its_benchmark_run_chart_and_scorecard(pipeline_result):
    import mlflow

    c = registry.client()
    mv = c.get_model_version(registry.registered_name(TASK), pipeline_result["promotion"]["version"])
    bench_run = pipeline_result["bench"]["mlflow_run_id"]
    assert mv.tags["tasc.bench.run_id"] == bench_run
    assert mv.tags["tasc.bench.chart"] == f"runs:/{bench_run}/report/report.png"
    assert "report/report.png" in {a.path for a in c.list_artifacts(bench_run, "report")}
    assert mv.tags["tasc.scorecard.artifact"].startswith(f"runs:/{pipeline_result['mlflow_run_id']}/scorecard/")
    assert "| task metric |" in mlflow.artifacts.load_text(mv.tags["tasc.scorecard.artifact"])


# Runs in a fresh interpreter with its own TASC_HOME; the decision is slowed down so that
# both racers decide while the other is still deciding, as slow reads would make them.
RACER = """
import json, sys, time
from storage import registry
real = registry.decide
def slow(*args, **kwargs):
    decision = real(*args, **kwargs)
    time.sleep(1.0)
    return decision
registry.decide = slow
registry.alias_version(sys.argv[1], "champion")  # connected before the start signal
print("ready", flush=True)
sys.stdin.readline()
d = registry.promote(sys.argv[1], sys.argv[2])
print(json.dumps({"promote": d.promote, "reason": d.reason}), flush=True)
"""


def _line(proc: subprocess.Popen, start: str) -> str:
    for line in proc.stdout:
        if line.startswith(start):
            return line
    raise AssertionError(f"racer exited without {start!r}")


@pytest.mark.slow  # two racing interpreters
def test_promotions_from_two_state_folders_on_one_store_do_not_both_win(tmp_path):
    task = _task()
    first = _new_version(task, Scorecard(100.0, 0.5), tmp_path)
    registry.promote(task, first)
    a, b = (_new_version(task, Scorecard(300.0, 0.5), tmp_path) for _ in range(2))
    procs = {}
    for v in (a, b):
        env = {**os.environ, "TASC_HOME": str(tmp_path / f"home-{v}")}  # MLFLOW_TRACKING_URI is shared
        with open(tmp_path / f"racer-{v}.err", "w") as err:
            procs[v] = subprocess.Popen([sys.executable, "-c", RACER, task, v], env=env, text=True,
                                        cwd=Path(__file__).resolve().parents[1], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=err)
    try:
        for p in procs.values():
            _line(p, "ready")
        for p in procs.values():
            p.stdin.write("go\n")
            p.stdin.flush()
        results = {v: json.loads(_line(p, "{")) for v, p in procs.items()}
    finally:
        for p in procs.values():
            p.stdin.close()  # a racer still waiting for the start signal goes on and ends
            try:
                p.wait(timeout=120)
            except subprocess.TimeoutExpired:
                p.kill()
    champ = registry.alias_version(task, "champion")
    assert champ in (a, b)
    loser = b if champ == a else a
    assert results[champ]["promote"] and not results[loser]["promote"], results
    assert registry.alias_version(task, "previous") == first
    tags = registry.client().get_model_version(registry.registered_name(task), loser).tags
    assert tags["tasc.promotion.promote"] == "False" and tags["tasc.promotion.against"] == champ


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
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


@pytest.mark.slow  # logs and loads a pyfunc with a GGUF file: about 15 s
def test_a_model_from_a_gguf_file_is_logged_with_it_and_decodes_on_its_blocks(tiny_model_dir, tmp_path):
    # The model folder only names the GGUF file's path; a service elsewhere must still decode
    # on the blocks that were benchmarked, so the file travels in the pyfunc.
    import mlflow

    from storage.drafts import write_draft
    from storage.tracking import experiment_id
    from tasc.accel import variants
    from tasc.decode.draft import build_draft_corpus
    from tasc.models import ModelError, load_model
    from tests.test_quantized_model import _write_gguf

    if not variants.available():
        pytest.skip("no C compiler here")
    gguf = tmp_path / "tiny.gguf"
    _write_gguf(load_model(str(tiny_model_dir), dtype="float32", device="cpu").model, gguf)
    draft = write_draft(build_draft_corpus(references=["the answer is 1 2"] * 3), tmp_path / "draft.parquet")
    config = {"system_prompt": None, "chat_template": True, "stop": [], "max_new_tokens": 4, "dtype": "auto"}
    run_id = registry.client().create_run(experiment_id(f"tasc-{_task()}")).info.run_id
    uri = registry.log_pyfunc(run_id, str(tiny_model_dir), str(draft), config, ["q"], gguf=str(gguf))
    registry.client().set_terminated(run_id)
    gguf.rename(tmp_path / "moved.gguf")  # the logged copy is what the service reads
    served = mlflow.pyfunc.load_model(uri)
    assert served.unwrap_python_model().lm.weights == "gguf Q8_0, head Q8_0"
    assert len(served.predict(["question 1"], params={"max_new_tokens": 3})) == 1
    with pytest.raises(ModelError, match="gone.gguf: no such GGUF file"):
        load_model(str(tiny_model_dir), kernels="auto", gguf=tmp_path / "gone.gguf")
