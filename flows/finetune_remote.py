"""Fine-tuning on another worker (a GPU work pool), handed off through MLflow artifacts.

``tasc-finetune-remote`` is the flow a GPU worker runs (deployment ``tasc-finetune-remote/gpu``
in prefect.yaml). It downloads the model folder and the corpus named by artifact URIs,
fine-tunes (in its own process on one device; through torchrun, one process per device, on
several), logs the final folder as the artifact ``model`` of the caller's MLflow run with
steps and losses as metrics, and returns ``runs:/<run_id>/model``. Its folder on the worker is
keyed by the run id, so a re-run for the same run resumes from the checkpoints there.

:func:`finetune_on_deployment` is the pipeline's side of the fine-tune stage when
``finetune_deployment`` is set: it creates (or finds again) the nested MLflow run, publishes
the inputs, runs the deployment as a subflow run of the pipeline, and downloads the result
into the state folder, where the later stages use it as they use an in-process result.
"""

from __future__ import annotations

from prefect import flow
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound

from storage.settings import finetune_procs, finetune_timeout
from tasc.data.spec import load_spec
from tasc.train.launch import resolve_procs
from tasks.handoff import fetch_inputs, fetch_result, find_handoff_run, finetune_job, publish_inputs
from tasks.policies import fingerprint
from tasks.tracking import run_log, tracked_run

RESULT_METRICS = ("steps", "resumed_from", "train_loss", "val_loss", "tokens_per_s", "world_size")


class RemoteFinetuneError(RuntimeError):
    """The remote fine-tune did not complete (or its deployment does not exist)."""


@flow(name="tasc-finetune-remote", log_prints=True)
def finetune_remote(spec: str, model_uri: str, corpus_uri: str, run_id: str, max_steps: int | None = None,
                    procs: int | None = None) -> str:
    """Fine-tune the model at ``model_uri`` on the corpus at ``corpus_uri`` (artifact URIs)
    and log the result to MLflow run ``run_id``. ``spec``: a shipped name or a spec file's
    artifact URI. ``procs``: processes, torchrun when > 1 (0/None: ``TASC_FINETUNE_PROCS``,
    else one per visible CUDA device)."""
    inputs = fetch_inputs(spec, model_uri, corpus_uri, run_id)
    n = resolve_procs(procs or finetune_procs())
    print(f"fine-tuning {model_uri} for MLflow run {run_id} in {n} process(es)")
    out = finetune_job(inputs["spec"], inputs["corpus"], inputs["model"], inputs["out_dir"], max_steps, n)
    # The caller holds the run open and ends it once it has fetched the model.
    run_log(run_id).log(metrics={k: out[k] for k in RESULT_METRICS}, artifacts={"model": out["model_dir"]})
    return f"runs:/{run_id}/model"


def _failure(deployment: str, flow_run, timeout: float | None) -> str:
    state = flow_run.state
    if state is None or not state.is_final():
        return (f"flow run {flow_run.name!r} ({flow_run.id}) of deployment {deployment!r} did not finish within "
                f"{timeout} s (state {state.name if state else 'none'})")
    return (f"flow run {flow_run.name!r} ({flow_run.id}) of deployment {deployment!r} ended {state.name}: "
            f"{state.message or 'no message'}")


def _run_remote(deployment: str, run_id: str, spec: str, model: str, corpus: dict, max_steps: int):
    """Publish the inputs to MLflow run ``run_id`` and run the deployment on them; returns its
    completed flow run, raises RemoteFinetuneError when there is none."""
    timeout = finetune_timeout()
    params = publish_inputs(run_id, spec, model, corpus["path"])
    try:
        flow_run = run_deployment(deployment, parameters={**params, "run_id": run_id, "max_steps": max_steps},
                                  timeout=timeout, poll_interval=min(5.0, timeout or 5.0))
    except ObjectNotFound as e:
        raise RemoteFinetuneError(f"no Prefect deployment {deployment!r}: deploy it (prefect.yaml has "
                                  "tasc-finetune-remote/gpu) or unset finetune_deployment") from e
    if not (flow_run.state and flow_run.state.is_completed()):
        raise RemoteFinetuneError(_failure(deployment, flow_run, timeout) + f"; MLflow run {run_id}")
    return flow_run


def finetune_on_deployment(deployment: str, spec: str, model: str, max_steps: int, corpus: dict,
                           parent_run_id: str) -> dict:
    """The fine-tune stage on the workers of ``deployment`` (``flow/deployment``). Call it in
    a flow: the remote run becomes its subflow run. Returns what :func:`flows.stages.finetune_flow`
    does (model_dir, steps, resumed_from, train_loss, val_loss) plus mlflow_run_id,
    flow_run_id (None when a finished hand-off of the same inputs was reused) and deployment."""
    experiment = f"tasc-{load_spec(spec).name}"
    # The inputs by content (the model folder by its files), so a re-run finds its run again.
    key = fingerprint([model, corpus["version"], max_steps, deployment])
    found = find_handoff_run(experiment, key)
    flow_run = None
    # Finished: its model was downloaded once already, so the artifact is complete, and the run
    # stays as it was (a failed download here must not mark it FAILED and hand it out again).
    if found and found["status"] == "FINISHED" and found["has_model"]:
        run_id = found["run_id"]
        print(f"fine-tuned model of MLflow run {run_id} reused (same inputs)")
        got = fetch_result(spec, corpus["version"], run_id)
    else:
        params = {"spec": spec, "model": model, "max_steps": max_steps, "corpus_version": corpus["version"],
                  "deployment": deployment}
        tags = {"tasc.handoff_key": key, "tasc.deployment": deployment}
        # Found unfinished: handed out again, the remote worker resumes if it kept the run's folder.
        with tracked_run(experiment, "finetune", params, tags, parent_run_id,
                         resume_run_id=found["run_id"] if found else None) as run:
            run_id = run.run_id
            flow_run = _run_remote(deployment, run_id, spec, model, corpus, max_steps)
            got = fetch_result(spec, corpus["version"], run_id)
    m = got["metrics"]
    return {"model_dir": got["model_dir"], "steps": int(m.get("steps", 0)), "resumed_from": int(m.get("resumed_from", 0)),
            "train_loss": m.get("train_loss"), "val_loss": m.get("val_loss"), "mlflow_run_id": run_id,
            "flow_run_id": str(flow_run.id) if flow_run else None, "deployment": deployment}
