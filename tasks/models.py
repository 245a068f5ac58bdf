"""Make a model available locally before the steps that load it."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from tasc.models import resolve_model
from tasks.policies import TRANSIENT

HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]


@task(name="fetch-model", **TRANSIENT)
def fetch_model(model: str) -> str:
    """Make ``model`` loadable from disk: the one-time GGUF conversion of a short name, or the
    download of a hub id into the Hugging Face cache, retried with backoff (the network is
    what fails transiently); later steps then load without it. Returns what they load."""
    path = resolve_model(model)
    if path == model and not Path(model).exists():  # a hub id
        from huggingface_hub import snapshot_download

        snapshot_download(model, allow_patterns=HUB_FILES)
    get_run_logger().info("model %s -> %s", model, path)
    return path
