"""MLflow runs for flows: :func:`storage.tracking.tracked_run` with each MLflow call (start,
reopen, log, end) run as a Prefect task, so it shows in the flow run and is retried when the
tracking store is briefly away (a locked SQLite file, a restarting server)."""

from __future__ import annotations

from contextlib import AbstractContextManager

from prefect import task

from storage import tracking
from tasks.policies import TRANSIENT


@task(name="start-mlflow-run", **TRANSIENT)
def start_run(experiment: str, run_name: str, params: dict | None = None, tags: dict | None = None,
              parent_run_id: str | None = None) -> str:
    return tracking.start_run(experiment, run_name, params, tags, parent_run_id)


@task(name="reopen-mlflow-run", **TRANSIENT)
def reopen_run(run_id: str, parent_run_id: str | None = None) -> None:
    tracking.reopen_run(run_id, parent_run_id)


@task(name="log-mlflow", **TRANSIENT)
def log_to_run(run_id: str, metrics: dict | None = None, params: dict | None = None, artifacts: dict | None = None,
               json_files: dict | None = None, prefix: str = "") -> None:
    tracking.log_to_run(run_id, metrics, params, artifacts, json_files, prefix)


@task(name="end-mlflow-run", **TRANSIENT)
def end_run(run_id: str, status: str = "FINISHED") -> None:
    tracking.end_run(run_id, status)


AS_TASKS = tracking.RunSteps(start=start_run, reopen=reopen_run, log=log_to_run, end=end_run)


def tracked_run(experiment: str, run_name: str, params: dict | None = None, tags: dict | None = None,
                parent_run_id: str | None = None, *,
                resume_run_id: str | None = None) -> AbstractContextManager[tracking.TrackedRun]:
    """A run for the ``with`` body, ended FINISHED or FAILED (see storage.tracking.tracked_run)."""
    return tracking.tracked_run(experiment, run_name, params, tags, parent_run_id, resume_run_id=resume_run_id,
                                steps=AS_TASKS)


def run_log(run_id: str) -> tracking.TrackedRun:
    """Logging (as tasks) to a run that someone else opened and will end."""
    return tracking.TrackedRun(run_id, AS_TASKS)


@task(name="find-previous-run", **TRANSIENT)
def find_previous_run(experiment: str, run_key: str) -> str | None:
    return tracking.find_finished_run(experiment, "tasc.run_key", run_key)
