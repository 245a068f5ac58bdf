"""Resuming: calls of cached steps, checks on what a cache hit returns, and the
``TASC_FAIL_AT`` test hook.

Cached steps (tasks/policies.py) persist their results under the state folder
(``TASC_HOME/prefect-results``), chosen when they are called so that it follows
``TASC_HOME``. A hit is used only while every file under the state folder that it names
still exists; otherwise the step runs again and its cache entry is refreshed."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from storage.settings import fail_at, prefect_results_dir, state_dir


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


def usable(result: Any) -> bool:
    """Every state-folder path a result names still exists."""
    return all(Path(p).exists() for p in _paths(result))


def run_cached(task, *args, **kwargs) -> tuple[Any, bool]:
    """Run a cached task in the current flow; returns (result, whether it came from the cache)."""
    step = _stored(task)
    state = step(*args, return_state=True, **kwargs)
    result = state.result()
    if state.name == "Cached" and not usable(result):
        return step.with_options(refresh_cache=True)(*args, **kwargs), False
    return result, state.name == "Cached"


def map_cached(task, calls: Sequence[tuple]) -> list[Any]:
    """Submit one cached task run per argument tuple to the flow's task runner (e.g. Dask),
    then collect the results in order."""
    step = _stored(task)
    futures = [step.submit(*args) for args in calls]
    out = []
    for args, future in zip(calls, futures, strict=True):
        result = future.result()
        if future.state.name == "Cached" and not usable(result):
            result = step.with_options(refresh_cache=True).submit(*args).result()
        out.append(result)
    return out


def stage_done(stage: str) -> None:
    """TEST HOOK: with ``TASC_FAIL_AT=<stage>`` the pipeline fails right after ``stage``
    finished (its results are persisted), so tests can check that a re-run resumes."""
    if fail_at() == stage:
        raise InjectedFailure(f"TASC_FAIL_AT={stage}: failing on purpose after stage {stage!r} (test hook)")
