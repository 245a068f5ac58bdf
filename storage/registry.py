"""The MLflow Model Registry: log the tasc pyfunc, register versions, move aliases.

Promotion uses aliases only (``challenger``, ``champion``, ``previous``), never stages.
Alias moves (promotion, rollback) hold a lease that lives in the tracking store itself, so
they exclude each other across processes, state folders and machines that share the store
(see :func:`_alias_lease`). Under it, the champion is read, the decision made, and the
champion re-read right before the switch; if it moved anyway (an alias set by hand, which
no lease covers) the decision is remade against the new champion. Promoting the version
that already is champion changes nothing, so ``previous`` stays a real rollback target.

What the registry shows a person is written here too: the registered model's description
(what the aliases mean, how to load the champion and roll back), each version's description
(the promotion decision in one line, :func:`tasc.eval.promotion.describe`) and its scorecard
as a markdown table in its run's artifacts.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.protos.databricks_pb2 import (
    RESOURCE_ALREADY_EXISTS,
    RESOURCE_DOES_NOT_EXIST,
    TEMPORARILY_UNAVAILABLE,
    ErrorCode,
)

from storage.tracking import client
from tasc.eval.promotion import Decision, PromotionPolicy, Scorecard, decide, describe, scorecard_markdown

PYFUNC_FILE = Path(__file__).with_name("pyfunc_model.py")
REPO_ROOT = Path(__file__).resolve().parent.parent
SCORE_TAG = "tasc.scorecard"
LEASE_TTL_S = 120.0  # a lease older than this is taken to be left by a crashed holder
LEASE_WAIT_S = 300.0  # longer than the TTL, so a stale lease is broken before giving up
_LEASE_OWNER, _LEASE_EXPIRES = "tasc.lease.owner", "tasc.lease.expires"
# Lease creation lost to another holder (exists), or raced with its release (gone), or the
# store was briefly busy (SQLite "database is locked"): wait and try again.
_BUSY = {ErrorCode.Name(c) for c in (RESOURCE_ALREADY_EXISTS, RESOURCE_DOES_NOT_EXIST, TEMPORARILY_UNAVAILABLE)}


def registered_name(task: str) -> str:
    return f"tasc-{task}"


# The registered model's description (markdown in the MLflow UI): what someone who opens the
# model there needs to read a version, load the right one and undo a promotion.
MODEL_DESCRIPTION = """\
The tasc model of the task `{task}`: a small language model with its speculative-decoding
draft, packaged as one MLflow pyfunc. Each version is the model of one tasc pipeline run.

**Aliases** (moved by tasc's promotion rule; stages are not used):

- `champion`: the version in use. Consumers load `models:/{name}@champion`, e.g.
  `mlflow.pyfunc.load_model("models:/{name}@champion")` or
  `mlflow models serve -m "models:/{name}@champion"`.
- `challenger`: the newest registered version. It becomes champion only if its chars/s reach
  the champion's times `min_speedup` and its task metric drops by at most `max_metric_drop`.
- `previous`: the champion before the last promotion, the rollback target.

**Why a version was or was not promoted**: its description (one line: the verdict, its speedup
and metric change against the champion of that moment, the rule's reason), its tags
`tasc.promotion.*`, and `tasc.bench.run_id` / `tasc.bench.chart` for the benchmark run and
its chart. The scorecard it was judged on is a table among its run's artifacts
(`scorecard/`).

**Roll back**: `tasc rollback {task}` makes `previous` the champion again. `tasc promote {task}
<version>` runs the promotion rule for a version by hand.

MLflow's own "Promote model" button copies a version into another registered model; it
moves none of these aliases and is not tasc's promotion.
"""


def pip_requirements() -> list[str]:
    """Explicit requirements: inferred ones would pin a local torch build (e.g. +cpu) that no registry serves."""
    from importlib.metadata import version

    pins = []
    for dist in ("torch", "transformers", "tokenizers", "safetensors", "numpy", "pandas", "pyarrow", "mlflow"):
        pins.append(f"{dist}=={version(dist).split('+')[0]}")
    return pins


def pyfunc_signature(config: dict, example_prompts: list[str]):
    """The pyfunc's signature: its output and params (with their defaults), no input schema."""
    signature = infer_signature(
        model_input=pd.DataFrame({"prompt": example_prompts[:2]}),
        model_output=["..."] * len(example_prompts[:2]),
        params={"max_new_tokens": int(config.get("max_new_tokens", 128)), "method": "tasc-spec", "temperature": 0.0},
    )
    # No input schema: MLflow refuses a plain list of prompts against named columns and drops
    # the optional chat columns (system, messages) outside an unnamed one; predict checks every
    # row itself (storage/pyfunc_model.py). The params keep their schema.
    signature.inputs = None
    return signature


def log_pyfunc(run_id: str, model_dir: str, draft_file: str, config: dict, example_prompts: list[str],
               gguf: str | None = None) -> str:
    """Log model + tokenizer + draft as one pyfunc (models-from-code) in ``run_id``; returns its URI.
    ``gguf``: the GGUF file the model came from, logged with it, so that a service anywhere
    decodes on the blocks that were benchmarked (the model folder only names the file's path)."""
    client()
    signature = pyfunc_signature(config, example_prompts)
    with tempfile.TemporaryDirectory() as d:
        cfg = Path(d) / "config.json"
        cfg.write_text(json.dumps(config, indent=2))
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(PYFUNC_FILE),
                artifacts={"model": str(model_dir), "draft": str(draft_file), "config": str(cfg),
                           **({"gguf": str(gguf)} if gguf else {})},
                code_paths=[str(REPO_ROOT / "tasc"), str(REPO_ROOT / "storage")],
                signature=signature,
                input_example=pd.DataFrame({"prompt": example_prompts[:1]}),
                pip_requirements=pip_requirements(),
            )
    return info.model_uri


def register(model_uri: str, task: str, scorecard: Scorecard, tags: dict | None = None) -> str:
    """Register a new version under ``tasc-<task>`` with the ``challenger`` alias; returns the version.

    The registered model gets its description (aliases, loading, rollback) when it has none;
    the version a description saying it awaits the promotion rule (the rule replaces it), and,
    when it comes from a run, its scorecard as a markdown table in that run's artifacts."""
    c = client()
    name = registered_name(task)
    description = MODEL_DESCRIPTION.format(task=task, name=name)
    try:
        c.create_registered_model(name, description=description)
    except MlflowException:  # it exists; one registered before descriptions has none yet
        if not c.get_registered_model(name).description:
            c.update_registered_model(name, description=description)
    mv = mlflow.register_model(model_uri, name)
    version = str(mv.version)
    c.set_model_version_tag(name, version, SCORE_TAG, json.dumps(scorecard.__dict__))
    for k, v in (tags or {}).items():
        c.set_model_version_tag(name, version, k, str(v))
    if mv.run_id:
        path = f"scorecard/{name}-v{version}.md"
        c.log_text(mv.run_id, scorecard_markdown(scorecard, name, version), path)
        c.set_model_version_tag(name, version, "tasc.scorecard.artifact", f"runs:/{mv.run_id}/{path}")
    c.update_model_version(name, version, description=f"registered as challenger, not judged by the promotion rule "
                                                      f"yet: {scorecard.chars_per_s:.1f} chars/s, task metric "
                                                      f"{scorecard.metric:.4f}")
    c.set_registered_model_alias(name, "challenger", version)
    return version


def alias_version(task: str, alias: str) -> str | None:
    try:
        return str(client().get_model_version_by_alias(registered_name(task), alias).version)
    except MlflowException:
        return None


def scorecard_of(task: str, version: str) -> Scorecard:
    mv = client().get_model_version(registered_name(task), version)
    return Scorecard(**json.loads(mv.tags[SCORE_TAG]))


def lease_name(task: str) -> str:
    return f"{registered_name(task)}.alias-lease"


@contextlib.contextmanager
def _alias_lease(task: str, ttl: float = LEASE_TTL_S, wait: float = LEASE_WAIT_S) -> Iterator[None]:
    """Hold the alias lease of ``task`` for the body: one holder at a time per tracking store.

    The lease is a registered model named ``tasc-<task>.alias-lease``, created to take it and
    deleted to give it back. Creating a registered model is atomic in MLflow's SQL stores
    (the name is a unique key; a tracking server passes the create on to its store), so of
    two creators exactly one succeeds, whatever machine or state folder they run from; the
    other waits. It carries its holder and expiry as tags: a lease left by a crashed holder is
    deleted once expired. Limits: a holder that keeps it past ``ttl`` can lose it (the body
    here is a few alias reads and writes); two waiters that see the same stale lease at the
    same instant can both delete it, one deleting the other's fresh lease; a file-based
    store (``./mlruns``) does not create atomically.
    """
    c = client()
    name = lease_name(task)
    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex}"
    deadline, delay = time.monotonic() + wait, 0.05
    while True:
        try:
            c.create_registered_model(name, tags={_LEASE_OWNER: owner, _LEASE_EXPIRES: f"{time.time() + ttl:.3f}"},
                                      description="tasc: held while the aliases of this task move")
            break
        except MlflowException as e:
            if e.error_code not in _BUSY:
                raise
        _break_if_stale(name)
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name} is held by another promotion or rollback; waited {wait:.0f} s")
        time.sleep(delay * (0.5 + random.random()))  # jitter: contenders do not retry in step
        delay = min(delay * 2, 1.0)
    try:
        yield
    finally:
        with contextlib.suppress(MlflowException):  # gone: broken as stale by another waiter
            if client().get_registered_model(name).tags.get(_LEASE_OWNER) == owner:
                client().delete_registered_model(name)


def _break_if_stale(name: str) -> None:
    """Delete the lease ``name`` if its expiry has passed (its holder is taken to be dead)."""
    with contextlib.suppress(MlflowException, ValueError):  # released meanwhile, or a bad expiry tag
        if float(client().get_registered_model(name).tags.get(_LEASE_EXPIRES, "inf")) < time.time():
            client().delete_registered_model(name)


def promote(task: str, version: str, policy: PromotionPolicy = PromotionPolicy()) -> Decision:
    """Decide on ``version`` against the current champion and move the aliases if it wins.

    Promoting the version that already is champion is a no-op (a retried promotion, or a
    repeated command): the aliases stay, ``previous`` included, and the decision says so.
    """
    c = client()
    name = registered_name(task)
    challenger = scorecard_of(task, version)
    with _alias_lease(task):
        seen = alias_version(task, "champion")
        if seen == version:
            return _already_champion(task, version)
        for _ in range(3):
            champion = scorecard_of(task, seen) if seen else None
            decision = decide(challenger, champion, policy)
            if not decision.promote:
                break
            # Compare-and-set: switch only if the champion is still the one just judged against.
            now = alias_version(task, "champion")
            if now == seen:
                if seen:
                    c.set_registered_model_alias(name, "previous", seen)
                c.set_registered_model_alias(name, "champion", version)
                break
            seen = now
            if seen == version:
                return _already_champion(task, version)
        else:
            decision = Decision(False, f"champion kept moving (last seen {seen}) while deciding; not overwritten",
                                decision.speedup, decision.metric_delta)
    for k, v in decision.to_tags().items():
        c.set_model_version_tag(name, version, k, v)
    c.set_model_version_tag(name, version, "tasc.promotion.against", str(seen))
    c.update_model_version(name, version, description=describe(decision, seen))
    return decision


def _already_champion(task: str, version: str) -> Decision:
    """The no-op decision for a version that already is champion; its first decision's tags
    stay (they hold the numbers it won on) unless it has none yet."""
    c = client()
    name = registered_name(task)
    prev = alias_version(task, "previous")
    decision = Decision(True, f"version {version} already is champion; nothing changed (previous stays {prev})",
                        None, None)
    if "tasc.promotion.promote" not in c.get_model_version(name, version).tags:
        for k, v in decision.to_tags().items():
            c.set_model_version_tag(name, version, k, v)
        c.update_model_version(name, version, description=describe(decision, None))
    return decision


def rollback(task: str) -> str:
    """Make the ``previous`` version champion again (and the champion ``previous``); returns it."""
    c = client()
    name = registered_name(task)
    with _alias_lease(task):
        prev = alias_version(task, "previous")
        cur = alias_version(task, "champion")
        if prev is None or prev == cur:
            raise LookupError(f"{name} has no 'previous' version other than the champion to roll back to")
        c.set_registered_model_alias(name, "champion", prev)
        if cur:
            c.set_registered_model_alias(name, "previous", cur)
            c.set_model_version_tag(name, cur, "tasc.rolled_back", "true")
            was = c.get_model_version(name, cur).description or ""
            was = was.partition("; before: ")[2] if was.startswith("rolled back") else was  # once, not nested
            c.update_model_version(name, cur, description=f"rolled back: v{prev} is champion again "
                                                          f"(`tasc rollback`); before: {was}")
    return prev
