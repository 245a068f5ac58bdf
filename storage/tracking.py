"""MLflow tracking: runs, params, metrics and artifacts on the configured tracking URI
(a local SQLite file and artifact folder by default, a tracking server where one is set)."""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator, Mapping
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from storage.settings import configure, mlflow_artifact_root, mlflow_tracking_uri


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


@contextlib.contextmanager
def run(experiment: str, run_name: str, params: Mapping | None = None, tags: Mapping | None = None,
        nested: bool = False) -> Iterator[mlflow.ActiveRun]:
    """An MLflow run; nested under the active run when ``nested``."""
    client()
    exp = experiment_id(experiment)
    with mlflow.start_run(experiment_id=exp, run_name=run_name, nested=nested, tags=dict(tags or {})) as r:
        if params:
            mlflow.log_params({k: str(v)[:6000] for k, v in params.items()})
        yield r


def log_metrics(metrics: Mapping[str, float | None], prefix: str = "", step: int | None = None) -> None:
    clean = {f"{prefix}{k}": float(v) for k, v in metrics.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}
    if clean:
        mlflow.log_metrics(clean, step=step)


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    p = Path(path)
    if p.is_dir():
        mlflow.log_artifacts(str(p), artifact_path=artifact_path)
    elif p.exists():
        mlflow.log_artifact(str(p), artifact_path=artifact_path)


def log_json(obj: Mapping, name: str) -> None:
    mlflow.log_text(json.dumps(obj, indent=2, default=str), name)


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
