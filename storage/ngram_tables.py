"""N-gram tables on disk: one Parquet file (zstd) per table, self-describing.

Contract:

* the schema metadata holds ``tasc.schema_version`` = ``"1"`` and ``tasc.meta``, a JSON
  object with at least ``level`` ("text" | "token"), ``max_n``, ``min_count`` and
  ``corpus_version`` (null when unknown), plus every key of the caller's ``meta``;
* ``level``, ``max_n`` and ``min_count`` default to what ``tasc.ngrams.counts`` stamped on the
  table (metadata key ``tasc.ngrams``); the caller's ``meta`` wins on conflicts;
* ``read_ngram_table`` returns exactly that JSON object, and raises ``NgramTableError``
  naming the file for anything that is not such a table (not Parquet, no tasc metadata,
  an unknown schema version, missing columns).

Layout under the state folder, one folder per corpus version, tokenizer and settings (so a
cached result never names a table that a run with other settings has since rewritten)::

    ngrams/<task>/<corpus_version>/<model_key>-n<max_n>-c<min_count>/{text,token}.parquet
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from storage.files import model_key, write_parquet_atomic
from storage.integrity import parquet_problem
from storage.settings import ngrams_dir
from tasc.ngrams.counts import META_KEY, TEXT_SCHEMA

SCHEMA_VERSION = "1"
VERSION_KEY = b"tasc.schema_version"
TABLE_META_KEY = b"tasc.meta"
REQUIRED_META = ("level", "max_n", "min_count")
LEVELS = ("text", "token")


class NgramTableError(ValueError):
    """A file that is not a readable n-gram table; the message names the file."""


def table_paths(task: str, corpus_version: str, model: str, max_n: int, min_count: int) -> dict[str, Path]:
    """Where the ``text`` and ``token`` tables of these settings live (see the layout above)."""
    folder = ngrams_dir() / task / corpus_version / f"{model_key(model)}-n{max_n}-c{min_count}"
    return {level: folder / f"{level}.parquet" for level in LEVELS}


def write_ngram_table(table: pa.Table, path: str | Path, meta: dict[str, Any] | None = None) -> Path:
    """Write ``table`` (TEXT_SCHEMA or TOKEN_SCHEMA columns) to ``path`` as Parquet (zstd).

    ``meta`` must be JSON-serialisable; it is merged over the table's own ``tasc.ngrams``
    stamp. Returns the path written. Raises ValueError when level/max_n/min_count are
    neither stamped nor given, or a required column is missing.
    """
    path = Path(path)
    missing = [f.name for f in TEXT_SCHEMA if f.name not in table.column_names]
    if missing:
        raise ValueError(f"not an n-gram table, missing columns {missing}")
    own = (table.schema.metadata or {}).get(META_KEY)
    merged = {"corpus_version": None, **(json.loads(own) if own else {}), **(meta or {})}
    absent = [k for k in REQUIRED_META if k not in merged]
    if absent:
        raise ValueError(f"n-gram table metadata needs {absent} (pass them in meta)")
    schema_meta = dict(table.schema.metadata or {})
    schema_meta[VERSION_KEY] = SCHEMA_VERSION.encode()
    schema_meta[TABLE_META_KEY] = json.dumps(merged, sort_keys=True).encode()
    # Atomic, so a killed run never leaves half a table behind under the final name.
    return write_parquet_atomic(table.replace_schema_metadata(schema_meta), path)


def table_problem(path: str | Path, rows: int | None = None) -> str | None:
    """Why ``path`` is not a whole n-gram table (of ``rows`` rows, when given), from its footer
    and schema only; None when it is."""
    return parquet_problem(path, rows, keys=(VERSION_KEY, TABLE_META_KEY), columns=[f.name for f in TEXT_SCHEMA])


def read_ngram_table(path: str | Path) -> tuple[pa.Table, dict[str, Any]]:
    """Read a table written by ``write_ngram_table``. Returns ``(table, meta)``."""
    path = Path(path)
    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowException) as e:
        raise NgramTableError(f"{path}: not a Parquet n-gram table ({e})") from e
    md = schema.metadata or {}
    version = md.get(VERSION_KEY, b"").decode()
    if version != SCHEMA_VERSION or TABLE_META_KEY not in md:
        found = f"schema version {version!r}" if version else "no tasc metadata"
        raise NgramTableError(f"{path}: not an n-gram table of schema version {SCHEMA_VERSION} ({found})")
    missing = [f.name for f in TEXT_SCHEMA if f.name not in schema.names]
    if missing:
        raise NgramTableError(f"{path}: n-gram table lacks columns {missing}")
    try:
        meta = json.loads(md[TABLE_META_KEY])
    except json.JSONDecodeError as e:
        raise NgramTableError(f"{path}: unreadable tasc.meta ({e})") from e
    return pq.read_table(path), meta
