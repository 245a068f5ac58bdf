"""Task runners: Prefect's thread pool, or Dask for the sharded steps.

``dask`` uses the scheduler at ``TASC_DASK_ADDRESS`` (e.g. a Dask service next to the
compose stack) or starts a LocalCluster for the flow run (``TASC_DASK_WORKERS`` workers,
one thread each; processes unless ``TASC_DASK_PROCESSES=0``). Needs the ``dask`` extra:
``pip install -e '.[dask]'``."""

from __future__ import annotations

from prefect.task_runners import ThreadPoolTaskRunner

from storage.settings import dask_settings, ngram_shards, task_runner_name

RUNNERS = ("thread", "dask")


def task_runner(name: str | None = None):
    """The runner called ``name`` (default: ``TASC_TASK_RUNNER``, else ``thread``)."""
    name = (name or task_runner_name()).lower()
    if name == "thread":
        return ThreadPoolTaskRunner()
    if name != "dask":
        raise ValueError(f"unknown task runner {name!r}: use one of {', '.join(RUNNERS)}")
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError as e:
        raise ImportError("the dask task runner needs prefect-dask: pip install -e '.[dask]'") from e
    cfg = dask_settings()
    if cfg["address"]:
        return DaskTaskRunner(address=cfg["address"])
    return DaskTaskRunner(cluster_kwargs={"n_workers": cfg["workers"], "threads_per_worker": 1,
                                          "processes": cfg["processes"], "dashboard_address": None})


def default_shards(runner: str | None, shards: int | None) -> int:
    """Shards for the n-gram count: as asked (or ``TASC_NGRAM_SHARDS``), else 1 with threads
    and one per Dask worker."""
    if shards or ngram_shards():
        return shards or ngram_shards()
    return dask_settings()["workers"] if (runner or task_runner_name()) == "dask" else 1
