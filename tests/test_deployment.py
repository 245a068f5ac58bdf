"""A real Prefect server on loopback: serve the pipeline deployment, and the remote fine-tune
deployment from a second process with a state folder of its own (a worker on another machine:
no shared volume, only MLflow), trigger a pipeline run with parameters as a user would
(`prefect deployment run`) that hands its fine-tuning to that deployment, and check the
Prefect runs, the MLflow hand-off run and the registry afterwards."""

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
FT_STEPS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, procs: list[subprocess.Popen], seconds: float) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            for proc in procs:
                if proc.poll() is not None:
                    out = proc.stdout.read().decode()[-3000:] if proc.stdout else ""
                    pytest.fail(f"{proc.args[:3]} exited early: {out}")
            time.sleep(1)
    pytest.fail(f"{url} did not answer in {seconds} s")


# procs is left to the worker: one process here, as on a one-GPU worker (torchrun over several
# processes is tested in test_distributed.py, without the cost of a second launch here).
SERVE_REMOTE = ("from prefect import serve; from flows.finetune_remote import finetune_remote; "
                "serve(finetune_remote.to_deployment(name='gpu'))")


@pytest.mark.slow
def test_triggered_deployment_hands_off_finetuning_and_registers_a_model(tmp_path, tiny_model_dir, state_home):
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = dict(os.environ)
    env.update(PREFECT_HOME=str(tmp_path / "prefect-server"), PREFECT_API_URL=api,
               PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", PYTHONPATH=str(ROOT),
               PREFECT_RUNNER_POLL_FREQUENCY="2")  # served runs start within 2 s, not 10
    remote_home = tmp_path / "gpu-worker-home"
    procs = []
    try:
        server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        procs.append(server)
        _wait_http(f"{api}/health", [server], 180)
        log = open(tmp_path / "serve.log", "w")
        serve = subprocess.Popen(
            [sys.executable, "-c", "from flows.pipeline import pipeline; pipeline.serve(name='test-on-demand')"],
            env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        procs.append(serve)
        remote = subprocess.Popen([sys.executable, "-c", SERVE_REMOTE], env={**env, "TASC_HOME": str(remote_home)},
                                  cwd=ROOT, stdout=open(tmp_path / "serve-remote.log", "w"), stderr=subprocess.STDOUT)
        procs.append(remote)
        _wait_http(f"{api}/deployments/name/tasc-finetune-remote/gpu", [serve, remote], 180)
        params = {"spec": "prompt-completion", "model": str(tiny_model_dir), "limit": 2, "harvest_limit": 4,
                  "methods": "greedy,tasc-spec", "dtype": "float32", "max_n": 3, "force": True, "min_speedup": 0.0,
                  "vocab_rounds": 1, "round_steps": 0, "eval_prompts": 2, "finetune_max_steps": FT_STEPS,
                  "finetune_deployment": "tasc-finetune-remote/gpu"}
        deadline = time.time() + 120
        while True:  # the served deployment appears once the serving process has registered it
            res = subprocess.run([str(BIN / "prefect"), "deployment", "run", "tasc-pipeline/test-on-demand",
                                  "-p", f"params={json.dumps(params)}", "--watch", "--watch-timeout", "600"],
                                 env=env, cwd=ROOT, capture_output=True, text=True, timeout=700)
            if res.returncode == 0 or time.time() > deadline or "not found" not in (res.stdout + res.stderr).lower():
                break
            time.sleep(3)
        logs = "".join((tmp_path / f).read_text()[-3000:] for f in ("serve.log", "serve-remote.log"))
        assert res.returncode == 0, (res.stdout + res.stderr)[-1500:] + logs
        assert "Completed" in res.stdout
        remote_runs, pipeline_runs = _flow_runs(api, "tasc-finetune-remote"), _flow_runs(api, "tasc-pipeline")
    finally:
        for p in procs:
            p.terminate()
        deadline = time.time() + 10  # a graceful shutdown is not under test
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    # The remote flow ran as a subflow run of the pipeline's, and completed.
    ((remote_run, parent_id),), ((pipeline_flow_run, _),) = remote_runs, pipeline_runs
    assert remote_run.state.is_completed() and parent_id == pipeline_flow_run.id

    from storage.registry import registered_name
    from storage.tracking import client

    c = client()
    versions = c.search_model_versions(f"name = '{registered_name('prompt-completion')}'")
    mv = next(v for v in versions if c.get_run(v.run_id).data.params.get("finetune_deployment") == params[
        "finetune_deployment"])
    pipeline_run = c.get_run(mv.run_id)
    assert pipeline_run.data.params["limit"] == "2" and pipeline_run.data.params["methods"] == "greedy,tasc-spec"
    # The hand-off run: nested under the pipeline's MLflow run, its inputs and output as artifacts.
    (handoff,) = c.search_runs([pipeline_run.info.experiment_id],
                               filter_string="tags.`tasc.deployment` = 'tasc-finetune-remote/gpu' and "
                                             f"tags.`mlflow.parentRunId` = '{mv.run_id}'")
    run_id = handoff.info.run_id
    assert handoff.info.status == "FINISHED" and remote_run.parameters["run_id"] == run_id
    assert {a.path for a in c.list_artifacts(run_id)} == {"corpus", "input-model", "model"}
    assert handoff.data.metrics["steps"] == FT_STEPS and handoff.data.metrics["world_size"] == 1
    # The remote worker trained in its own state folder; the pipeline's only downloaded the result.
    trained = remote_home / "handoff" / run_id / "finetune" / "final"
    assert (remote_home / "handoff" / run_id / "input-model" / "config.json").exists()
    assert not (state_home / "handoff" / run_id).exists()
    # The registered version's model is the downloaded `model` artifact: the remote's final folder.
    source = Path(mv.tags["tasc.source_model"])
    assert source.parts[-3:] == ("finetune-remote", run_id, "model") and source.is_relative_to(state_home)
    assert _files(source) == _files(trained)


def _files(folder: Path) -> dict[str, bytes]:
    return {f.relative_to(folder).as_posix(): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


def _flow_runs(api: str, flow_name: str) -> list[tuple]:
    """Runs of a flow on the server at ``api``: (flow run, the flow run id of its parent task run)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])))
        return [(r, client.read_task_run(r.parent_task_run_id).flow_run_id if r.parent_task_run_id else None)
                for r in runs]


def test_prefect_yaml_deploys_the_pipeline_and_the_gpu_finetune():
    import yaml
    from prefect.flows import load_flow_from_entrypoint

    deployments = {d["name"]: d for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]}
    flows = {name: load_flow_from_entrypoint(str(ROOT / d["entrypoint"])) for name, d in deployments.items()}
    assert {name: f.name for name, f in flows.items()} == {"snips-nightly": "tasc-pipeline",
                                                           "snips-on-demand": "tasc-pipeline",
                                                           "gpu": "tasc-finetune-remote"}
    gpu = deployments["gpu"]
    assert gpu["work_pool"]["name"] == "tasc-gpu" and deployments["snips-on-demand"]["work_pool"]["name"] == "tasc-cpu"
    # What the pipeline passes (flows/finetune_remote.py) is what the flow takes.
    assert {"spec", "model_uri", "corpus_uri", "run_id", "max_steps", "procs"} == set(
        flows["gpu"].parameters.properties)
    assert gpu["work_pool"]["job_variables"]["env"]["TASC_FINETUNE_PROCS"] == "0"
