"""The fine-tuning hand-off between workers as Prefect tasks over storage/handoff.py: the
caller publishes the inputs to an MLflow run and fetches the result back; the remote worker
fetches the inputs and fine-tunes (in its own process, or torchrun over its devices)."""

from __future__ import annotations

from prefect import get_run_logger, task

from storage import corpus as store
from storage import handoff
from storage.vocab_store import remote_model_dir
from tasc.data.spec import load_spec
from tasc.train.launch import launch, run_job, torchrun_command
from tasks.policies import TRANSIENT


@task(name="find-handoff-run", **TRANSIENT)
def find_handoff_run(experiment: str, key: str) -> dict | None:
    return handoff.find_run(experiment, key)


@task(name="publish-finetune-inputs", **TRANSIENT)
def publish_inputs(run_id: str, spec: str, model_dir: str, corpus_path: str) -> dict:
    return handoff.publish_inputs(run_id, spec, model_dir, corpus_path)


@task(name="fetch-finetune-inputs", **TRANSIENT)
def fetch_inputs(spec: str, model_uri: str, corpus_uri: str, run_id: str) -> dict:
    return handoff.fetch_inputs(spec, model_uri, corpus_uri, run_id)


@task(name="finetune-job")
def finetune_job(spec: str, corpus_path: str, model_dir: str, out_dir: str, max_steps: int | None,
                 procs: int) -> dict:
    """Fine-tune on the corpus's train split into ``out_dir`` (resuming there): in this
    process, or ``procs`` > 1 data-parallel processes through torchrun."""
    if procs > 1:
        cmd = torchrun_command(procs, spec, model_dir, out_dir, corpus_path, max_steps)
        return launch(cmd, out_dir, echo=get_run_logger().info)
    train, val = (store.read_corpus(corpus_path, split=s) for s in ("train", "validation"))
    return run_job(load_spec(spec), train, val, model_dir, out_dir, max_steps)


@task(name="fetch-finetuned-model", **TRANSIENT)
def fetch_result(spec: str, corpus_version: str, run_id: str) -> dict:
    """The run's ``model`` artifact as a local folder under the state folder, and its metrics."""
    local = handoff.fetch_output(run_id, remote_model_dir(load_spec(spec).name, corpus_version, run_id))
    return {"model_dir": str(local), "metrics": handoff.run_metrics(run_id)}
