"""Resuming: calls of cached steps, checks on what a cache hit returns, and the
``TASC_FAIL_AT`` test hook.

Cached steps (tasks/policies.py) persist their results under the state folder
(``TASC_HOME/prefect-results``), chosen when they are called so that it follows
``TASC_HOME``. A hit is used only while every file under the state folder that it names
still exists and is whole (a Parquet footer that reads, the metadata its writer stamps, the
row count the result or a corpus manifest keeps: a few kilobytes read per file); otherwise
the step runs again, says so in one log line, and its cache entry is refreshed. ``force``
runs a step regardless of its cache."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from storage.corpus import MANIFEST_FILE, corpus_problem
from storage.drafts import draft_problem
from storage.integrity import parquet_problem
from storage.ngram_tables import LEVELS, table_problem
from storage.settings import drafts_dir, fail_at, ngrams_dir, prefect_results_dir, state_dir


class InjectedFailure(RuntimeError):
    """Raised by the TASC_FAIL_AT test hook."""


def _stored(task):
    return task.with_options(result_storage=prefect_results_dir())


def _paths(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [p for v in value.values() for p in _paths(v)]
    if isinstance(value, (list, tuple)):
        return [p for v in value for p in _paths(v)]
    return [value] if isinstance(value, str) and value.startswith(str(state_dir())) else []


def _kept_rows(result: Any) -> dict[str, int]:
    # A result that keeps row counts beside its files ({"text": path, "rows": {"text": n}}).
    rows = result.get("rows") if isinstance(result, dict) else None
    if not isinstance(rows, dict):
        return {}
    return {result[k]: n for k, n in rows.items() if isinstance(result.get(k), str) and isinstance(n, int)}


def _file_problem(path: Path, rows: int | None) -> str | None:
    if not path.exists():
        return f"{path} is missing"
    if path.is_dir():
        return corpus_problem(path) if (path / MANIFEST_FILE).is_file() else None
    if path.suffix != ".parquet":
        return None
    if path.is_relative_to(drafts_dir()):
        return draft_problem(path)
    if path.is_relative_to(ngrams_dir()) and path.stem in LEVELS:
        return table_problem(path, rows)
    return parquet_problem(path, rows)


def damage(result: Any) -> str | None:
    """Why a cached result cannot be used (a state-folder file it names is missing or not
    whole), or None when it can."""
    rows = _kept_rows(result)
    for p in _paths(result):
        if problem := _file_problem(Path(p), rows.get(p)):
            return problem
    return None


def usable(result: Any) -> bool:
    """Every state-folder file a result names still exists and is whole."""
    return damage(result) is None


def _rebuild(task, result: Any) -> bool:
    """Whether a cache hit must run again, logging why in one line when it is damaged."""
    problem = damage(result)
    if problem:
        _logger().warning("cached result of %s is damaged, rebuilding it: %s", task.name, problem)
    return problem is not None


def _logger():
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)


def run_cached(task, *args, force: bool = False, **kwargs) -> tuple[Any, bool]:
    """Run a cached task in the current flow; returns (result, whether it came from the cache).
    ``force`` runs it regardless of the cache (and refreshes the entry)."""
    step = _stored(task)
    if force:
        return step.with_options(refresh_cache=True)(*args, **kwargs), False
    state = step(*args, return_state=True, **kwargs)
    result = state.result()
    if state.name == "Cached" and _rebuild(task, result):
        return step.with_options(refresh_cache=True)(*args, **kwargs), False
    return result, state.name == "Cached"


def map_cached(task, calls: Sequence[tuple], force: bool = False) -> list[Any]:
    """Submit one cached task run per argument tuple to the flow's task runner (e.g. Dask),
    then collect the results in order; ``force`` runs them regardless of the cache."""
    step = _stored(task)
    if force:
        step = step.with_options(refresh_cache=True)
    futures = [step.submit(*args) for args in calls]
    out = []
    for args, future in zip(calls, futures, strict=True):
        result = future.result()
        if future.state.name == "Cached" and _rebuild(task, result):
            result = step.with_options(refresh_cache=True).submit(*args).result()
        out.append(result)
    return out


def stage_done(stage: str) -> None:
    """TEST HOOK: with ``TASC_FAIL_AT=<stage>`` the pipeline fails right after ``stage``
    finished (its results are persisted), so tests can check that a re-run resumes."""
    if fail_at() == stage:
        raise InjectedFailure(f"TASC_FAIL_AT={stage}: failing on purpose after stage {stage!r} (test hook)")
