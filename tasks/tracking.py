"""MLflow logging as tasks, addressed by run id (safe from any worker thread)."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

from prefect import task

from storage.tracking import client, experiment_id
from tasks.policies import TRANSIENT


@task(name="start-mlflow-run", **TRANSIENT)
def start_run(experiment: str, run_name: str, params: dict, tags: dict | None = None,
              parent_run_id: str | None = None) -> str:
    tags = dict(tags or {})
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    c = client()
    r = c.create_run(experiment_id(experiment), run_name=run_name, tags=tags)
    for k, v in params.items():
        c.log_param(r.info.run_id, k, str(v)[:6000])
    return r.info.run_id


@task(name="log-mlflow", **TRANSIENT)
def log_to_run(run_id: str, metrics: dict | None = None, artifacts: dict | None = None,
               json_files: dict | None = None, prefix: str = "") -> None:
    """metrics: flat name -> number; artifacts: artifact folder -> local path; json_files: name -> object."""
    c = client()
    for k, v in (metrics or {}).items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)):
            c.log_metric(run_id, f"{prefix}{k}".replace("+", "_plus_"), float(v))
    for folder, path in (artifacts or {}).items():
        p = Path(path)
        if p.is_dir():
            c.log_artifacts(run_id, str(p), artifact_path=folder)
        elif p.exists():
            c.log_artifact(run_id, str(p), artifact_path=folder)
    for name, obj in (json_files or {}).items():
        with tempfile.TemporaryDirectory() as d:
            f = Path(d) / name
            f.write_text(json.dumps(obj, indent=2, default=str))
            c.log_artifact(run_id, str(f))


@task(name="end-mlflow-run", **TRANSIENT)
def end_run(run_id: str, status: str = "FINISHED") -> None:
    client().set_terminated(run_id, status=status)


def flat_bench_metrics(summary: dict) -> dict:
    """Flatten a benchmark summary into MLflow metric names, e.g. ``tasc-spec.chars_per_s``
    (method options such as ``tasc-spec@max_len=24`` become ``tasc-spec_max_len_24``)."""
    def metric_name(method: str) -> str:
        return method.replace("@", "_").replace("=", "_")

    out = {}
    for raw, entry in summary["methods"].items():
        name = metric_name(raw)
        for key in ("chars_per_s", "tokens_per_s", "latency_ms_p50", "latency_ms_p95", "forward_passes",
                    "acceptance_rate", "mean_accepted_length", "metric", "identical_to_greedy",
                    "tokens_per_completion", "propose_share"):
            out[f"{name}.{key}"] = entry.get(key)
    for name, r in summary["speedup_vs_greedy"].items():
        out[f"speedup.{metric_name(name)}"] = r
    for k, v in summary.get("verify_cost", {}).items():
        out[f"verify_cost.{k}"] = v
    return out


@task(name="find-previous-run", **TRANSIENT)
def find_previous_run(experiment: str, run_key: str) -> str | None:
    from storage.tracking import find_finished_run

    return find_finished_run(experiment, "tasc.run_key", run_key)
