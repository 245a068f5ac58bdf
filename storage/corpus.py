"""The on-disk corpus layout: one folder per task and corpus version.

::

    <corpora_dir>/<task>/<version>/corpus.parquet     the rows (all splits)
                                  /rejected.parquet   bad rows, always written (maybe empty)
                                  /manifest.json      written last: its presence marks the
                                                      folder complete
    <corpora_dir>/<task>/LATEST                        the version written (or reused) last

The version is a hash of the spec hash, the bad-row policy and the sources' content hashes,
so re-ingesting unchanged inputs finds the existing folder: the caller checks
``find_corpus(task, corpus_version(spec, fingerprint_sources(spec), policy))`` before parsing,
then ``corpus_problem`` (a folder damaged since is rebuilt, not reused) and calls
``mark_latest`` when it reuses one. Folders are written to a temporary name and renamed into
place, so a crash never leaves a half-written version that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from storage.integrity import parquet_problem
from storage.settings import corpora_dir
from tasc.data.ingest import IngestResult
from tasc.data.spec import TaskSpec, bad_row_policy

# Bump when the corpus columns or their meaning change, so old folders are not reused.
LAYOUT_VERSION = 1
CORPUS_FILE, REJECTED_FILE, MANIFEST_FILE, LATEST_FILE = (
    "corpus.parquet",
    "rejected.parquet",
    "manifest.json",
    "LATEST",
)
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class CorpusNotFound(FileNotFoundError):
    """No stored corpus where one was expected; the message says which command makes one."""


def corpus_version(spec: TaskSpec, fingerprints: dict[str, str], policy: str | None = None) -> str:
    """A version id from the spec hash, the sources' fingerprints (path -> sha256) and the
    bad-row policy (``policy``, else the spec's): ``skip`` and ``fail`` make different corpora."""
    key = {"layout": LAYOUT_VERSION, "spec": spec.hash(), "sources": sorted(fingerprints.items())}
    policy = bad_row_policy(spec, policy)
    if policy != spec.on_bad_rows:
        # The spec hash holds on_bad_rows already; only an override adds a key, so the
        # versions of corpora ingested under the spec's own policy stay what they were.
        key["policy"] = policy
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def task_dir(task: str) -> Path:
    """The folder holding every stored version of a task's corpus."""
    if not _SAFE_NAME.match(task):
        raise ValueError(f"task name {task!r} cannot be a folder name: use letters, digits, '.', '_', '-'")
    return corpora_dir() / task


def _is_complete(path: Path) -> bool:
    return (path / MANIFEST_FILE).is_file() and (path / CORPUS_FILE).is_file()


def find_corpus(task: str, version: str) -> Path | None:
    """The folder of a complete stored version, or None."""
    path = task_dir(task) / version
    return path if _is_complete(path) else None


def corpus_problem(path: str | Path) -> str | None:
    """Why the stored corpus folder ``path`` cannot be reused: an unreadable manifest, or a
    corpus or rejected file that is not whole or not of the manifest's row count; None if whole."""
    path = Path(path)
    try:
        manifest = read_manifest(path)
    except (OSError, ValueError) as e:
        return f"{path / MANIFEST_FILE} is unreadable ({e})"
    return (parquet_problem(path / CORPUS_FILE, manifest.get("total"))
            or parquet_problem(path / REJECTED_FILE, manifest.get("rejected")))


def mark_latest(task: str, version: str) -> None:
    """Record ``version`` as the task's latest corpus (after writing or reusing it)."""
    pointer = task_dir(task) / LATEST_FILE
    tmp = pointer.with_name(f".{LATEST_FILE}.{os.getpid()}")
    tmp.write_text(version + "\n", encoding="utf-8")
    os.replace(tmp, pointer)


def _write_manifest(folder: Path, task: str, version: str, manifest: dict) -> None:
    full = {**manifest, "task": task, "version": version, "layout": LAYOUT_VERSION}
    full["written_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    text = json.dumps(full, indent=2, ensure_ascii=False, default=str)
    (folder / MANIFEST_FILE).write_text(text + "\n", encoding="utf-8")


def write_corpus(task: str, version: str, result: IngestResult, replace: bool = False) -> Path:
    """Store an ingest result as ``<task>/<version>/`` atomically; returns the folder.

    If a complete, whole folder for this version already exists (written concurrently), it is
    kept and the new copy discarded: same version means same inputs. ``replace`` (a forced
    rebuild) replaces it all the same.
    """
    parent = task_dir(task)
    parent.mkdir(parents=True, exist_ok=True)
    final = parent / version
    tmp = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=parent))
    try:
        result.corpus.to_parquet(tmp / CORPUS_FILE, index=False)
        result.rejected.to_parquet(tmp / REJECTED_FILE, index=False)
        _write_manifest(tmp, task, version, result.manifest)  # last: marks the folder complete
        if final.exists() and (replace or not _is_complete(final) or corpus_problem(final)):
            shutil.rmtree(final)  # left by an older crash, damaged since, or rebuilt on request
        if not final.exists():
            os.rename(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    mark_latest(task, version)
    return final


def _list_columns(path: Path) -> list[str]:
    schema = pq.read_schema(path)
    return [f.name for f in schema if str(f.type).startswith(("list", "large_list"))]


def read_corpus(path: str | Path, split: str | None = None) -> pd.DataFrame:
    """The rows of a stored corpus (a version folder or its ``corpus.parquet``), one split or all.

    List columns (``answers``, ``tests``) come back as Python lists, as ingestion made them.
    """
    path = Path(path)
    file = path / CORPUS_FILE if path.is_dir() else path
    if not file.is_file():
        raise CorpusNotFound(f"no corpus at {path}; run `tasc ingest SPEC` to make one")
    filters = [("split", "==", split)] if split else None
    df = pd.read_parquet(file, filters=filters)
    for col in _list_columns(file):
        # pyarrow hands list cells back as numpy arrays; callers index and compare them as lists.
        df[col] = [None if v is None else list(v) for v in df[col]]
    return df.reset_index(drop=True)


def read_rejected(path: str | Path) -> pd.DataFrame:
    """The rejected rows stored beside a corpus."""
    return pd.read_parquet(Path(path) / REJECTED_FILE)


def read_manifest(path: str | Path) -> dict:
    """The manifest of a stored corpus folder."""
    return json.loads((Path(path) / MANIFEST_FILE).read_text(encoding="utf-8"))


def latest_corpus(task: str) -> Path:
    """The task's most recently written (or reused) complete corpus folder."""
    parent = task_dir(task)
    pointer = parent / LATEST_FILE
    if pointer.is_file():
        found = find_corpus(task, pointer.read_text(encoding="utf-8").strip())
        if found:
            return found
    # No usable pointer: fall back to the newest complete folder by manifest time.
    done = [p for p in parent.glob("*") if p.is_dir() and not p.name.startswith(".") and _is_complete(p)]
    if not done:
        raise CorpusNotFound(f"no corpus for task {task!r} under {parent}; run `tasc ingest SPEC` first")
    return max(done, key=lambda p: (p / MANIFEST_FILE).stat().st_mtime_ns)
