"""MLflow tracking: runs, params, metrics and artifacts on the configured tracking URI
(a local SQLite file and artifact folder by default, a tracking server where one is set).

:func:`tracked_run` is the one way a stage opens a run: it starts (or reopens) the run, yields
a :class:`TrackedRun` to log to, and ends it FINISHED, or FAILED when the body raises, so no
stage leaves a run RUNNING behind. Every call addresses the run by its id through the
``MlflowClient``, never through mlflow's active run: that one is thread-local, and Prefect
runs tasks in worker threads. The MLflow calls themselves are pluggable (:class:`RunSteps`),
so the orchestration layer can run each one as a retried task (tasks/tracking.py)."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from storage.settings import configure, mlflow_artifact_root, mlflow_tracking_uri

PARENT_TAG = "mlflow.parentRunId"
# MLflow names allow letters, digits, "_", "-", ".", " ", "/" and ":"; method names such as
# "tasc-ft+spec@max_len=24" need the rest replaced ("+" spelled out, so "a+b" and "a_b" differ).
_BAD_NAME_CHARS = re.compile(r"[^\w\-. /:]")

log = logging.getLogger(__name__)


def client() -> MlflowClient:
    configure()
    mlflow.set_tracking_uri(mlflow_tracking_uri())
    return MlflowClient()


def experiment_id(name: str) -> str:
    c = client()
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    root = mlflow_artifact_root().rstrip("/")
    try:
        return c.create_experiment(name, artifact_location=f"{root}/{name}")
    except mlflow.exceptions.MlflowException:  # created concurrently by another run
        return c.get_experiment_by_name(name).experiment_id


def metric_key(name: str) -> str:
    """``name`` as a valid MLflow metric name: ``tasc-ft+spec@max_len=24`` -> ``tasc-ft_plus_spec_max_len_24``."""
    return _BAD_NAME_CHARS.sub("_", name.replace("+", "_plus_"))


def start_run(experiment: str, run_name: str, params: Mapping | None = None, tags: Mapping | None = None,
              parent_run_id: str | None = None) -> str:
    """Create a RUNNING run (nested under ``parent_run_id`` when given); returns its id."""
    tags = dict(tags or {})
    if parent_run_id:
        tags[PARENT_TAG] = parent_run_id
    c = client()
    run_id = c.create_run(experiment_id(experiment), run_name=run_name, tags=tags).info.run_id
    for k, v in (params or {}).items():
        c.log_param(run_id, k, str(v)[:6000])
    return run_id


def reopen_run(run_id: str, parent_run_id: str | None = None) -> None:
    """Mark an existing run RUNNING again, nested under ``parent_run_id`` when given. Its
    params stay as first logged (MLflow refuses to change a param's value)."""
    c = client()
    c.update_run(run_id, status="RUNNING")
    if parent_run_id:
        c.set_tag(run_id, PARENT_TAG, parent_run_id)


def log_to_run(run_id: str, metrics: Mapping | None = None, params: Mapping | None = None,
               artifacts: Mapping | None = None, json_files: Mapping | None = None, prefix: str = "") -> None:
    """Log to run ``run_id``. metrics: name -> number (None, NaN and non-numbers are skipped,
    names made valid by :func:`metric_key`); params: name -> value; artifacts: artifact folder
    -> a local path or a list of them (a folder's files go under the artifact folder, "" is
    the root); json_files: file name -> object, written as JSON at the root."""
    c = client()
    for k, v in (metrics or {}).items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)):
            c.log_metric(run_id, metric_key(f"{prefix}{k}"), float(v))
    for k, v in (params or {}).items():
        c.log_param(run_id, k, str(v)[:6000])
    for folder, paths in (artifacts or {}).items():
        for path in [paths] if isinstance(paths, (str, Path)) else paths:
            p = Path(path)
            if p.is_dir():
                c.log_artifacts(run_id, str(p), artifact_path=folder or None)
            elif p.exists():
                c.log_artifact(run_id, str(p), artifact_path=folder or None)
    for name, obj in (json_files or {}).items():
        with tempfile.TemporaryDirectory() as d:
            f = Path(d) / name
            f.write_text(json.dumps(obj, indent=2, default=str))
            c.log_artifact(run_id, str(f))


def end_run(run_id: str, status: str = "FINISHED") -> None:
    client().set_terminated(run_id, status=status)


@dataclass(frozen=True)
class RunSteps:
    """The MLflow calls a tracked run makes, with the signatures of the functions above."""

    start: Callable[..., str] = start_run
    reopen: Callable[..., None] = reopen_run
    log: Callable[..., None] = log_to_run
    end: Callable[..., None] = end_run


@dataclass(frozen=True)
class TrackedRun:
    """What :func:`tracked_run` yields: logging to one run, by id. Also usable for a run that
    another process opened (the remote fine-tune logs to its caller's run)."""

    run_id: str
    steps: RunSteps = RunSteps()

    def log(self, metrics: Mapping | None = None, params: Mapping | None = None,
            artifacts: Mapping[str, str | Path | Sequence[str | Path]] | None = None,
            json_files: Mapping | None = None, prefix: str = "") -> None:
        """Several things in one call (see :func:`log_to_run`)."""
        self.steps.log(self.run_id, metrics=metrics, params=params, artifacts=artifacts, json_files=json_files,
                       prefix=prefix)

    def log_metrics(self, metrics: Mapping, prefix: str = "") -> None:
        self.log(metrics=metrics, prefix=prefix)

    def log_params(self, params: Mapping) -> None:
        self.log(params=params)

    def log_artifacts(self, paths: str | Path | Sequence[str | Path], folder: str = "") -> None:
        self.log(artifacts={folder: paths})

    def log_json(self, name: str, obj) -> None:
        self.log(json_files={name: obj})


@contextlib.contextmanager
def tracked_run(experiment: str, run_name: str, params: Mapping | None = None, tags: Mapping | None = None,
                parent_run_id: str | None = None, *, resume_run_id: str | None = None,
                steps: RunSteps = RunSteps()) -> Iterator[TrackedRun]:
    """A run of ``experiment`` for the ``with`` body: FINISHED when it completes, FAILED when
    it raises (the exception propagates). ``resume_run_id``: continue that existing run
    (reopened RUNNING under ``parent_run_id``; ``params`` and ``tags`` are not logged again)
    instead of creating one."""
    if resume_run_id:
        steps.reopen(resume_run_id, parent_run_id)
        run_id = resume_run_id
    else:
        run_id = steps.start(experiment, run_name, params, tags, parent_run_id)
    try:
        yield TrackedRun(run_id, steps)
    except BaseException:
        try:
            steps.end(run_id, "FAILED")
        except Exception:  # the body's error is the one to report
            log.warning("could not mark MLflow run %s FAILED", run_id, exc_info=True)
        raise
    steps.end(run_id, "FINISHED")


def run_url(run_id: str) -> str:
    """Where a person finds the run: the server UI, or the local store to open with `mlflow ui`."""
    uri = mlflow_tracking_uri()
    if uri.startswith("http"):
        exp = client().get_run(run_id).info.experiment_id
        return f"{uri.rstrip('/')}/#/experiments/{exp}/runs/{run_id}"
    return f"run {run_id} in {uri} (browse with: mlflow ui --backend-store-uri {uri})"


def find_finished_run(experiment: str, tag: str, value: str) -> str | None:
    """The id of a finished run in ``experiment`` tagged ``tag=value``, if any."""
    c = client()
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = c.search_runs([exp.experiment_id], filter_string=f"tags.`{tag}` = '{value}' and attributes.status = 'FINISHED'",
                         max_results=1)
    return runs[0].info.run_id if runs else None
