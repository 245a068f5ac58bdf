"""Cheap checks that a stored Parquet artifact is whole, before a cache hit reuses it.

A cache hit used to check only that a file existed, so a truncated corpus, n-gram table or
draft was reused (and logged to MLflow again) as if it were fine. Reading the footer costs
a few kilobytes whatever the file's size and fails for a truncated or overwritten file
(the footer sits at the end); the schema metadata and the row count the footer declares are
then compared with what the writer stamped or recorded beside the file, where it did.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def parquet_problem(path: str | Path, rows: int | None = None, keys: Iterable[bytes] = (),
                    columns: Iterable[str] = ()) -> str | None:
    """Why ``path`` is not a whole Parquet file with the schema metadata ``keys``, the
    ``columns`` and (when given) ``rows`` rows; None when it is."""
    path = Path(path)
    if not path.is_file():
        return f"{path} is missing"
    try:
        meta = pq.read_metadata(path)
        schema = meta.schema.to_arrow_schema()
    except (OSError, pa.ArrowException) as e:
        return f"{path} is not a readable Parquet file (truncated or corrupted: {e})"
    stamped = schema.metadata or {}
    absent = [k.decode() for k in keys if k not in stamped] + [c for c in columns if c not in schema.names]
    if absent:
        return f"{path} lacks {', '.join(absent)} (not the file tasc wrote)"
    if rows is not None and meta.num_rows != rows:
        return f"{path} holds {meta.num_rows} rows where {rows} were written"
    return None
