"""How steps are retried and cached.

Retries: steps that talk to something that can be briefly away (a model hub or the model
cache, the MLflow tracking server or its SQLite file) retry with exponential backoff, but
only for errors that look transient (network, timeouts, locked databases, I/O); a bad
spec or a missing file fails at once.

Caching: deterministic steps (ingest, n-gram tables and shards, draft build) persist their
result (a small dict of paths and numbers) under the state folder and are keyed on
:class:`StepInputs`: the task's source, the source of the core modules it runs, and its
inputs, where a corpus counts by its version, a local file or folder by the names, sizes
and modification times of its files, and anything else by value. Ingest adds the sources'
fingerprint and the bad-row policy, so changed data is re-read. Flows check that a cached
result's files still exist and are whole before using it (flows/resume.py).
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect.cache_policies import TASK_SOURCE, CachePolicy
from prefect.tasks import exponential_backoff
from prefect.utilities.hashing import hash_objects

# Libraries whose exceptions mean "the other side was away", not "the request was wrong".
_TRANSIENT_MODULES = ("requests", "urllib3", "httpx", "httpcore", "huggingface_hub", "sqlalchemy", "sqlite3",
                      "botocore", "boto3")
# MLflow errors carry a code; these mean "try again later" (a bad parameter does not).
_TRANSIENT_MLFLOW = ("INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "RESOURCE_EXHAUSTED",
                     "ABORTED", "DEADLINE_EXCEEDED")
_PERMANENT_OS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


def is_transient(exc: BaseException | None) -> bool:
    """True for errors worth retrying: connection, timeout, I/O (not a missing file) and
    errors of network, database and tracking clients, anywhere in the cause chain."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return True
        if isinstance(exc, OSError) and not isinstance(exc, _PERMANENT_OS):
            return True
        module = type(exc).__module__.split(".")[0]
        if module in _TRANSIENT_MODULES or (module == "mlflow" and getattr(exc, "error_code", "") in _TRANSIENT_MLFLOW):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def retry_transient(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry a failed run only when its error is transient."""
    data = state.data
    return is_transient(data if isinstance(data, BaseException) else None)


# Task options for steps that can fail transiently: 3 retries after 2, 4 and 8 s (+-50%).
TRANSIENT = {"retries": 3, "retry_delay_seconds": exponential_backoff(backoff_factor=2),
             "retry_jitter_factor": 0.5, "retry_condition_fn": retry_transient}


def file_identity(path: str | Path) -> list:
    """Names, sizes and modification times of a file, or of a folder's files (recursively),
    cheap enough for model folders; content changes rewrite files, which changes them."""
    p = Path(path)
    if p.is_file():
        st = p.stat()
        return [p.name, st.st_size, st.st_mtime_ns]
    return [[str(f.relative_to(p)), f.stat().st_size, f.stat().st_mtime_ns]
            for f in sorted(p.rglob("*")) if f.is_file()]


def identity(value: Any) -> Any:
    """What a cache key sees of one input (see the module docstring)."""
    if isinstance(value, dict) and "version" in value and "path" in value:
        return ["corpus", value["version"], value["path"]]
    if isinstance(value, dict):
        return {k: identity(v) for k, v in sorted(value.items())}
    if isinstance(value, (list, tuple)):
        return [identity(v) for v in value]
    if isinstance(value, str) and value and len(value) < 4096 and _is_local(value):
        return ["path", str(Path(value).resolve()), file_identity(value)]
    return value


def _is_local(value: str) -> bool:
    # Only what reads as a path: a bare word such as a spec name or "." is a value.
    if "/" not in value and not value.endswith((".yaml", ".yml", ".json", ".jsonl", ".parquet")):
        return False
    try:
        return Path(value).exists()
    except OSError:
        return False


def fingerprint(obj: Any) -> str:
    """A short stable hash of a JSON-able object (after ``identity``)."""
    blob = json.dumps(identity(obj), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=64)
def module_source_hash(name: str) -> str:
    return hashlib.sha256(inspect.getsource(importlib.import_module(name)).encode()).hexdigest()


@dataclass
class StepInputs(CachePolicy):
    """Cache key: task source + core ``modules`` sources + inputs by ``identity``."""

    modules: tuple[str, ...] = ()
    exclude: tuple[str, ...] = field(default_factory=tuple)

    def extra(self, inputs: dict[str, Any]) -> Any:
        """More key material, for subclasses (e.g. a data fingerprint)."""
        return None

    def compute_key(self, task_ctx, inputs, flow_parameters, **kwargs) -> str | None:
        source = TASK_SOURCE.compute_key(task_ctx, inputs, flow_parameters, **kwargs)
        parts = {k: identity(v) for k, v in sorted((inputs or {}).items()) if k not in self.exclude}
        code = [module_source_hash(m) for m in self.modules]
        try:
            extra = self.extra(inputs or {})
        except Exception:  # e.g. a spec that does not load: no caching, the task reports the error
            return None
        return hash_objects(source, code, parts, extra, raise_on_failure=True)


@dataclass
class IngestInputs(StepInputs):
    """Ingest: also the corpus version, i.e. the spec's hash, the bad-row policy and its
    sources' sha256."""

    def extra(self, inputs: dict[str, Any]) -> Any:
        from storage.corpus import corpus_version
        from tasc.data.ingest import fingerprint_sources
        from tasc.data.spec import load_spec

        spec = load_spec(inputs["spec"])
        return corpus_version(spec, fingerprint_sources(spec), inputs.get("policy"))


@dataclass
class DraftInputs(StepInputs):
    """Draft build: without an explicit harvest file, also the harvest the task would pick up."""

    def extra(self, inputs: dict[str, Any]) -> Any:
        if inputs.get("harvest_file") or not inputs.get("model") or inputs.get("source") == "references":
            return None
        from storage.drafts import harvest_path
        from tasc.data.spec import load_spec

        path = harvest_path(load_spec(inputs["spec"]).name, inputs["corpus"]["version"], inputs["model"])
        return identity(str(path)) if path.exists() else None


def cached(policy: CachePolicy) -> dict:
    """Options of the @task decorator for a cached deterministic step; flows set the result
    storage (under the state folder) when they call it, see flows/resume.py."""
    return {"cache_policy": policy, "persist_result": True}
