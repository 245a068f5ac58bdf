"""Files of TASC-ft vocabulary rounds under the state folder::

    vocab/<task>/<corpus_version>/round-<i>/model/           model + tokenizer of round i
    vocab/<task>/<corpus_version>/round-<i>/selection.parquet  the round's selection table
    vocab/<task>/<corpus_version>/round-<i>/round.json         the round's numbers
    vocab/<task>/<corpus_version>/ft-only/model/             the fine-tune-only baseline
    vocab/<task>/<corpus_version>/report.json                the rounds report

The selection table (token, n, count, base_tokens, estimated_gain, measured_gain, uses)
carries ``tasc.round`` and ``tasc.meta`` (JSON) in its Parquet schema metadata.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from storage.files import write_parquet_atomic, write_text_atomic
from storage.settings import state_dir


def vocab_dir(task: str, corpus_version: str) -> Path:
    return state_dir() / "vocab" / task / corpus_version


def round_dir(task: str, corpus_version: str, index: int) -> Path:
    return vocab_dir(task, corpus_version) / f"round-{index}"


def ft_only_dir(task: str, corpus_version: str) -> Path:
    return vocab_dir(task, corpus_version) / "ft-only"


def write_selection(table: pd.DataFrame, path: str | Path, index: int, meta: dict | None = None) -> Path:
    t = pa.Table.from_pandas(table, preserve_index=False)
    t = t.replace_schema_metadata({**(t.schema.metadata or {}), b"tasc.round": str(index).encode(),
                                   b"tasc.meta": json.dumps(meta or {}, default=str).encode()})
    return write_parquet_atomic(t, path)


def read_selection(path: str | Path) -> pd.DataFrame:
    return pq.read_table(path).to_pandas()


def write_json(obj: dict, path: str | Path) -> Path:
    return write_text_atomic(Path(path), json.dumps(obj, indent=2, default=str))


def read_json(path: str | Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))
