"""Shared fixtures: an isolated state folder, a tiny real model, MLflow on a temp SQLite
file and a session-scoped Prefect test harness."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

_SESSION_HOME = None


def pytest_configure(config):
    # One state folder per test session, set before anything reads it.
    import tempfile

    global _SESSION_HOME
    _SESSION_HOME = Path(tempfile.mkdtemp(prefix="tasc-test-"))
    os.environ["TASC_HOME"] = str(_SESSION_HOME)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{_SESSION_HOME / 'mlflow.db'}"
    os.environ["TASC_MLFLOW_ARTIFACTS"] = (_SESSION_HOME / "mlartifacts").as_uri()
    os.environ.setdefault("DO_NOT_TRACK", "true")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # The C kernels are compiled afresh into the session folder: the build path is tested too.
    os.environ.setdefault("TASC_KERNEL_CACHE", str(_SESSION_HOME / "kernels"))
    # On a small shared machine, one intra-op thread per process avoids spin-waiting cores
    # (a step with two threads while the other core is busy is several times slower).
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("PREFECT_HOME", str(_SESSION_HOME / "prefect"))
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    # Prefect sets up its console log handler when it is first imported, on the sys.stderr of
    # that moment. Imported here, that is the session's own stream; imported first inside a
    # test that captures output, it would be that test's buffer, closed after it, and every
    # later log line would fail (whichever test happened to import Prefect first).
    import prefect.main  # noqa: F401


@pytest.fixture(scope="session")
def state_home() -> Path:
    return _SESSION_HOME


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from tests.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def tiny_lm(tiny_model_dir):
    """The tiny model loaded for generation (fp32, CPU; one torch thread, set above)."""
    from tasc.models import load_model

    return load_model(str(tiny_model_dir), dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def pipeline_result(prefect_harness, tiny_model_dir):
    """One end-to-end pipeline run on the tiny model and the shipped generic spec."""
    from flows.pipeline import PipelineParams, pipeline

    params = PipelineParams(spec="prompt-completion", model=str(tiny_model_dir), limit=3, harvest_limit=6,
                            methods="greedy,pld,tasc-spec,tasc-spec-ref", dtype="float32", max_n=4,
                            min_speedup=0.0)
    out = pipeline(params)
    out["params"] = params
    # The registry aliases as this run left them: other tests register, promote and roll back
    # versions of the same task, so a test reading the aliases later would depend on the order.
    from storage.registry import alias_version

    out["aliases"] = {a: alias_version("prompt-completion", a) for a in ("champion", "challenger")}
    return out
