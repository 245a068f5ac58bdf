"""Parquet layout of drafts and on-policy harvests.

A draft file holds one row per output text (column ``text``) and, in the Parquet schema
metadata, ``tasc.schema_version``, ``tasc.corpus_hash``, ``tasc.source`` and ``tasc.meta``
(JSON). It is text, so one file serves any tokenizer. Layout under the state folder::

    drafts/<task>/<corpus_version>/<source>[-<model_key>].parquet
    harvest/<task>/<corpus_version>/<model_key>.parquet   (id, prompt, output, new_tokens)
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from storage.files import model_key, write_parquet_atomic
from storage.integrity import parquet_problem
from storage.settings import drafts_dir, harvest_dir
from tasc.decode.draft import DraftCorpus, DraftError


def draft_path(task: str, corpus_version: str, source: str, model: str | None = None) -> Path:
    name = source if source == "references" or not model else f"{source}-{model_key(model)}"
    return drafts_dir() / task / corpus_version / f"{name}.parquet"


def harvest_path(task: str, corpus_version: str, model: str) -> Path:
    return harvest_dir() / task / corpus_version / f"{model_key(model)}.parquet"


def harvest_is_current(path: str | Path, model: str) -> bool:
    """The harvest at ``path`` was written after every file of the model folder ``model``
    (one rewritten since, e.g. a TASC-ft round run again with other settings, is harvested
    again); a model that is a name, not a folder, never changes."""
    folder, written = Path(model), Path(path).stat().st_mtime_ns
    files = [f for f in folder.rglob("*") if f.is_file()] if folder.is_dir() else []
    return all(f.stat().st_mtime_ns <= written for f in files)


def write_draft(draft: DraftCorpus, path: str | Path) -> Path:
    meta = {
        b"tasc.schema_version": draft.schema_version.encode(),
        b"tasc.corpus_hash": draft.corpus_hash.encode(),
        b"tasc.source": draft.source.encode(),
        b"tasc.meta": json.dumps(draft.meta, default=str).encode(),
    }
    table = pa.table({"text": pa.array(list(draft.texts), type=pa.string())}).replace_schema_metadata(meta)
    return write_parquet_atomic(table, Path(path))


def draft_problem(path: str | Path) -> str | None:
    """Why ``path`` is not a whole draft file (from its footer and schema only), or None."""
    return parquet_problem(path, keys=(b"tasc.schema_version",), columns=("text",))


def read_draft(path: str | Path) -> DraftCorpus:
    """Read a draft; a missing, truncated or foreign file fails with the file named."""
    path = Path(path)
    if not path.exists():
        raise DraftError(f"{path}: no such draft; build one with `tasc draft SPEC`")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise DraftError(f"{path}: not a readable Parquet draft (truncated or corrupted?): {e}") from e
    meta = table.schema.metadata or {}
    if b"tasc.schema_version" not in meta or "text" not in table.column_names:
        raise DraftError(f"{path}: not a tasc draft (no tasc.schema_version metadata or no 'text' column)")
    return DraftCorpus(
        texts=tuple(table.column("text").to_pylist()),
        source=meta.get(b"tasc.source", b"").decode(),
        corpus_hash=meta.get(b"tasc.corpus_hash", b"").decode(),
        schema_version=meta[b"tasc.schema_version"].decode(),
        meta=json.loads(meta.get(b"tasc.meta", b"{}") or b"{}"),
    )


def write_harvest(frame: pd.DataFrame, path: str | Path, meta: dict) -> Path:
    table = pa.Table.from_pandas(frame, preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), b"tasc.meta": json.dumps(meta).encode()})
    return write_parquet_atomic(table, Path(path))


def harvest_problem(path: str | Path) -> str | None:
    """Why ``path`` is not a whole harvest file (from its footer and schema only), or None."""
    return parquet_problem(path, keys=(b"tasc.meta",), columns=("prompt", "output"))


def read_harvest(path: str | Path) -> pd.DataFrame:
    try:
        return pq.read_table(path).to_pandas()
    except (pa.ArrowInvalid, OSError) as e:
        raise DraftError(f"{path}: not a readable harvest file: {e}") from e
