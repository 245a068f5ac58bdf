"""The MLflow Model Registry: log the tasc pyfunc, register versions, move aliases.

Promotion uses aliases only (``challenger``, ``champion``, ``previous``), never stages.
Moving ``champion`` is one alias update made under a lock with a check-and-set re-read:
if another run moved the champion since this run read it, this run does not overwrite it
and records why on its version.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature

from storage.settings import state_dir
from storage.tracking import client
from tasc.eval.promotion import Decision, PromotionPolicy, Scorecard, decide

PYFUNC_FILE = Path(__file__).with_name("pyfunc_model.py")
REPO_ROOT = Path(__file__).resolve().parent.parent
SCORE_TAG = "tasc.scorecard"


def registered_name(task: str) -> str:
    return f"tasc-{task}"


def pip_requirements() -> list[str]:
    """Explicit requirements: inferred ones would pin a local torch build (e.g. +cpu) that no registry serves."""
    from importlib.metadata import version

    pins = []
    for dist in ("torch", "transformers", "tokenizers", "safetensors", "numpy", "pandas", "pyarrow", "mlflow"):
        pins.append(f"{dist}=={version(dist).split('+')[0]}")
    return pins


def log_pyfunc(run_id: str, model_dir: str, draft_file: str, config: dict, example_prompts: list[str]) -> str:
    """Log model + tokenizer + draft as one pyfunc (models-from-code) in ``run_id``; returns its URI."""
    client()
    signature = infer_signature(
        model_input=pd.DataFrame({"prompt": example_prompts[:2]}),
        model_output=["..."] * len(example_prompts[:2]),
        params={"max_new_tokens": int(config.get("max_new_tokens", 128)), "method": "tasc-spec", "temperature": 0.0},
    )
    with tempfile.TemporaryDirectory() as d:
        cfg = Path(d) / "config.json"
        cfg.write_text(json.dumps(config, indent=2))
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(PYFUNC_FILE),
                artifacts={"model": str(model_dir), "draft": str(draft_file), "config": str(cfg)},
                code_paths=[str(REPO_ROOT / "tasc"), str(REPO_ROOT / "storage")],
                signature=signature,
                input_example=pd.DataFrame({"prompt": example_prompts[:1]}),
                pip_requirements=pip_requirements(),
            )
    return info.model_uri


def register(model_uri: str, task: str, scorecard: Scorecard, tags: dict | None = None) -> str:
    """Register a new version under ``tasc-<task>`` with the ``challenger`` alias; returns the version."""
    c = client()
    name = registered_name(task)
    with contextlib.suppress(MlflowException):
        c.create_registered_model(name)
    mv = mlflow.register_model(model_uri, name)
    c.set_model_version_tag(name, mv.version, SCORE_TAG, json.dumps(scorecard.__dict__))
    for k, v in (tags or {}).items():
        c.set_model_version_tag(name, mv.version, k, str(v))
    c.set_registered_model_alias(name, "challenger", mv.version)
    return str(mv.version)


def alias_version(task: str, alias: str) -> str | None:
    try:
        return str(client().get_model_version_by_alias(registered_name(task), alias).version)
    except MlflowException:
        return None


def scorecard_of(task: str, version: str) -> Scorecard:
    mv = client().get_model_version(registered_name(task), version)
    return Scorecard(**json.loads(mv.tags[SCORE_TAG]))


@contextlib.contextmanager
def _alias_lock(task: str) -> Iterator[None]:
    """Serialise alias moves between processes sharing this state folder (the check-and-set
    re-read below also protects writers on other machines)."""
    lock = state_dir() / "locks" / f"registry-{task}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def promote(task: str, version: str, policy: PromotionPolicy = PromotionPolicy()) -> Decision:
    """Decide on ``version`` against the current champion and move the aliases if it wins."""
    c = client()
    name = registered_name(task)
    challenger = scorecard_of(task, version)
    with _alias_lock(task):
        seen = alias_version(task, "champion")
        champion = scorecard_of(task, seen) if seen and seen != version else None
        decision = decide(challenger, champion, policy)
        if decision.promote:
            # Check-and-set: the champion must still be the one the decision was made against.
            now = alias_version(task, "champion")
            if now != seen:
                decision = Decision(False, f"champion moved from {seen} to {now} during the decision; not overwritten",
                                    decision.speedup, decision.metric_delta)
            else:
                if seen:
                    c.set_registered_model_alias(name, "previous", seen)
                c.set_registered_model_alias(name, "champion", version)
    for k, v in decision.to_tags().items():
        c.set_model_version_tag(name, version, k, v)
    c.set_model_version_tag(name, version, "tasc.promotion.against", str(seen))
    return decision


def rollback(task: str) -> str:
    """Make the ``previous`` version champion again; returns it."""
    c = client()
    name = registered_name(task)
    with _alias_lock(task):
        prev = alias_version(task, "previous")
        if prev is None:
            raise LookupError(f"{name} has no 'previous' version to roll back to")
        cur = alias_version(task, "champion")
        c.set_registered_model_alias(name, "champion", prev)
        if cur:
            c.set_registered_model_alias(name, "previous", cur)
            c.set_model_version_tag(name, cur, "tasc.rolled_back", "true")
    return prev
