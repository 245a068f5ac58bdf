"""Environment settings and the project-local state folder.

Everything tasc writes by default lives under one state folder (``TASC_HOME``, default
``<repo>/.tasc``): the model cache, corpora, n-gram tables, drafts, the MLflow SQLite
database and artifact folder, and ``PREFECT_HOME`` for the ephemeral Prefect API.
``configure()`` is idempotent and never overrides a variable the user already set, so a
tracking server (``MLFLOW_TRACKING_URI``) or a Prefect server (``PREFECT_API_URL``)
take over where they are configured. The pipeline's execution settings (task runner,
Dask cluster, n-gram shards, the remote fine-tune deployment, the ``TASC_FAIL_AT`` test hook)
are read here too.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

TELEMETRY_OFF = {
    "DO_NOT_TRACK": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def state_dir() -> Path:
    p = Path(os.environ.get("TASC_HOME") or (REPO_ROOT / ".tasc")).resolve()
    p.mkdir(parents=True, exist_ok=True)
    return p


def model_cache_dir() -> Path:
    return state_dir() / "models"


def corpora_dir() -> Path:
    return state_dir() / "corpora"


def ngrams_dir() -> Path:
    return state_dir() / "ngrams"


def drafts_dir() -> Path:
    return state_dir() / "drafts"


def harvest_dir() -> Path:
    return state_dir() / "harvest"


def reports_dir() -> Path:
    return state_dir() / "reports"


def handoff_dir() -> Path:
    """Where a fine-tuning hand-off keeps its downloads and run folders, one per MLflow run id."""
    return state_dir() / "handoff"


def prefect_results_dir() -> Path:
    """Where Prefect persists the results of cached steps (and their cache records), so a
    re-run with the same inputs, in this process or another, resumes instead of recomputing."""
    return state_dir() / "prefect-results"


def task_runner_name() -> str:
    """``TASC_TASK_RUNNER``: ``thread`` (default, Prefect's thread pool) or ``dask``."""
    return os.environ.get("TASC_TASK_RUNNER", "thread").strip().lower() or "thread"


def dask_settings() -> dict:
    """The Dask cluster the ``dask`` runner uses: ``TASC_DASK_ADDRESS`` (a running scheduler,
    e.g. ``tcp://scheduler:8786``) or a LocalCluster of ``TASC_DASK_WORKERS`` workers (default
    2), processes unless ``TASC_DASK_PROCESSES=0``."""
    return {"address": os.environ.get("TASC_DASK_ADDRESS") or None,
            "workers": int(os.environ.get("TASC_DASK_WORKERS", "2")),
            "processes": os.environ.get("TASC_DASK_PROCESSES", "1") not in ("0", "false", "no")}


def ngram_shards() -> int | None:
    """``TASC_NGRAM_SHARDS``: corpus shards counted as separate n-gram tasks (unset: 1 with the
    thread runner, the worker count with Dask)."""
    value = os.environ.get("TASC_NGRAM_SHARDS")
    return int(value) if value else None


def finetune_deployment() -> str | None:
    """``TASC_FINETUNE_DEPLOYMENT``: the Prefect deployment (``flow/deployment``, e.g.
    ``tasc-finetune-remote/gpu``) that fine-tunes the chosen TASC-ft model when the pipeline's
    ``finetune_deployment`` is not set; unset: in the pipeline's own process."""
    return os.environ.get("TASC_FINETUNE_DEPLOYMENT") or None


def finetune_procs() -> int | None:
    """``TASC_FINETUNE_PROCS``: processes of a remote fine-tune (torchrun when > 1) when its
    ``procs`` parameter is not set; unset or 0: one per visible CUDA device."""
    value = os.environ.get("TASC_FINETUNE_PROCS")
    return int(value) if value else None


def finetune_timeout() -> float | None:
    """``TASC_FINETUNE_TIMEOUT``: seconds the pipeline waits for a remote fine-tune (unset:
    as long as it takes)."""
    value = os.environ.get("TASC_FINETUNE_TIMEOUT")
    return float(value) if value else None


def fail_at() -> str | None:
    """``TASC_FAIL_AT``: a TEST HOOK. The pipeline raises right after the named stage
    (ingest, ngrams, vocab, finetune, draft, bench) finished, to exercise resuming."""
    return os.environ.get("TASC_FAIL_AT") or None


def mlflow_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{state_dir() / 'mlflow.db'}"


def mlflow_artifact_root() -> str:
    return os.environ.get("TASC_MLFLOW_ARTIFACTS") or (state_dir() / "mlartifacts").as_uri()


def configure() -> Path:
    """Set telemetry off and the default homes; returns the state folder."""
    for k, v in TELEMETRY_OFF.items():
        os.environ.setdefault(k, v)
    home = state_dir()
    os.environ.setdefault("PREFECT_HOME", str(home / "prefect"))
    # A loaded 2-core machine can take longer than Prefect's default 20 s to start the
    # ephemeral API server.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("MLFLOW_TRACKING_URI", mlflow_tracking_uri())
    os.environ.setdefault("TASC_MODEL_CACHE", str(model_cache_dir()))
    return home
