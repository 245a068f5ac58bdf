"""Retries, caching and resuming for real: a pipeline process killed in the middle of
fine-tuning, then re-run, continues from the cached steps and the last checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TASC = str(Path(sys.executable).parent / "tasc")
FT_STEPS = 120  # ~50 ms a step on the tiny model, checkpoints every 20: the kill lands mid-way


def test_transient_errors_are_retried_and_others_are_not(prefect_harness):
    from prefect import flow, task

    from tasks.policies import TRANSIENT

    calls = {"flaky": 0, "bad": 0}

    @task(**{**TRANSIENT, "retry_delay_seconds": 0, "retry_jitter_factor": None})
    def flaky():
        calls["flaky"] += 1
        if calls["flaky"] < 3:
            raise ConnectionError("tracking server away")
        return "ok"

    @task(**{**TRANSIENT, "retry_delay_seconds": 0, "retry_jitter_factor": None})
    def bad():
        calls["bad"] += 1
        raise ValueError("a wrong spec is not worth retrying")

    @flow
    def both():
        return flaky(), bad(return_state=True)

    ok, bad_state = both()
    assert ok == "ok" and calls["flaky"] == 3
    assert bad_state.is_failed() and calls["bad"] == 1


def test_is_transient_follows_the_cause_chain():
    from tasks.policies import is_transient

    try:
        try:
            raise TimeoutError("read timed out")
        except TimeoutError as e:
            raise RuntimeError("cannot load the model") from e
    except RuntimeError as wrapped:
        assert is_transient(wrapped)
    assert not is_transient(FileNotFoundError("no such spec"))
    assert not is_transient(ValueError("bad value"))
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, TEMPORARILY_UNAVAILABLE

    assert is_transient(MlflowException("server busy", error_code=TEMPORARILY_UNAVAILABLE))
    assert not is_transient(MlflowException("bad metric name", error_code=INVALID_PARAMETER_VALUE))


def _checkpoints(home: Path) -> list[Path]:
    return sorted(home.glob("vocab/*/*/finetune/*/checkpoints/step-*/state.json"))


def _kill_at_first_checkpoint(args: list[str], env: dict, log: Path, timeout: float = 420) -> int:
    """Run the pipeline in its own process group and SIGKILL it as soon as a fine-tuning
    checkpoint is complete; returns that checkpoint's step."""
    home = Path(env["TASC_HOME"])
    with open(log, "w") as fh:
        proc = subprocess.Popen(args, env=env, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.time() + timeout
            while not _checkpoints(home):
                if proc.poll() is not None or time.time() > deadline:
                    pytest.fail(f"no checkpoint before exit/timeout: {log.read_text()[-3000:]}")
                time.sleep(0.05)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return int(_checkpoints(home)[-1].parent.name.split("-")[1])


@pytest.mark.slow
def test_killed_pipeline_resumes_from_cache_and_checkpoint(prefect_harness, tiny_model_dir, tmp_path, monkeypatch):
    from prefect.settings import PREFECT_API_URL

    from flows.pipeline import PipelineParams, pipeline
    from storage.registry import registered_name
    from storage.tracking import client
    from tests.prefect_runs import task_states

    home = tmp_path / "home"
    env_vars = {"TASC_HOME": str(home), "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
                "TASC_MLFLOW_ARTIFACTS": (home / "mlartifacts").as_uri()}
    env = {**os.environ, **env_vars, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": str(ROOT)}
    env.pop("TASC_FAIL_AT", None)
    args = [TASC, "pipeline", "prompt-completion", "--model", str(tiny_model_dir), "--limit", "2",
            "--harvest-limit", "4", "--dtype", "float32", "--vocab-rounds", "1", "--round-steps", "0",
            "--finetune-steps", str(FT_STEPS)]
    step = _kill_at_first_checkpoint(args, env, tmp_path / "first.log")
    assert 0 < step < FT_STEPS
    ft_dir = _checkpoints(home)[-1].parents[2]
    assert not (ft_dir / "final").exists()  # killed in the middle of fine-tuning
    corpus_files = sorted(home.glob("corpora/prompt-completion/*/*.parquet"))
    table_files = sorted(home.glob("ngrams/prompt-completion/*/*/*.parquet"))
    round_json = next(home.glob("vocab/prompt-completion/*/round-1/round.json"))
    written = {p: p.stat().st_mtime_ns for p in [*corpus_files, *table_files, round_json]}
    assert corpus_files and len(table_files) == 2

    for k, v in env_vars.items():  # the re-run, in this process, on the same state folder
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("TASC_FAIL_AT", raising=False)
    params = PipelineParams(spec="prompt-completion", model=str(tiny_model_dir), limit=2, harvest_limit=4,
                            dtype="float32", vocab_rounds=1, round_steps=0, finetune_max_steps=FT_STEPS)
    state = pipeline(params, return_state=True)
    out = state.result()

    states = task_states(state.state_details.flow_run_id)
    assert states["ingest"] == ["Cached"] and states["ngram-tables"] == ["Cached"]
    assert {p: p.stat().st_mtime_ns for p in written} == written  # nothing before fine-tuning rewritten
    ft = out["tasc_ft"]["finetune"]
    assert ft["resumed_from"] == step and ft["steps"] == FT_STEPS
    assert out["model"] == ft["model_dir"] and Path(ft["model_dir"]).parent == ft_dir
    assert out["tasc_ft"]["vocab"]["rounds"][0]["round"] == 1
    assert {"greedy", "tasc-ft", "tasc-ft+spec"} == set(out["bench"]["methods"])
    # The registered model is the fine-tuned TASC-ft folder, scored with TASC-ft + TASC-spec.
    mv = client().get_model_version(registered_name("prompt-completion"), out["promotion"]["version"])
    assert mv.tags["tasc.source_model"] == out["model"] and mv.tags["tasc.method"] == "tasc-ft+spec"
