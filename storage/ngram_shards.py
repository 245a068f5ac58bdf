"""Per-shard n-gram counts on disk, what travels from the shard tasks to the merge task.

One Parquet file (zstd) per shard and level: columns ``n`` int16, ``count`` and
``doc_count`` int64, ``ids`` list<int32> (token ids, or at text level ids into the
shard's pre-token vocabulary); schema metadata ``tasc.shard`` holds JSON ``{"level",
"max_n", "documents", "tokens", "vocab" (text level: the pre-tokens in first-seen order)}``
plus the caller's keys. Files are written to a temporary name and renamed. Layout under the
state folder, every n-gram of each shard (no ``min_count``), one folder per sharding::

    ngrams/<task>/<corpus_version>/<model_key>-n<max_n>-shards-<shards>/{text,token}-<shard:04d>.parquet
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from storage.files import model_key, write_parquet_atomic
from storage.settings import ngrams_dir
from tasc.ngrams.counts import NgramCounts
from tasc.ngrams.shards import ShardCounts

META_KEY = b"tasc.shard"


def shard_paths(task: str, corpus_version: str, model: str, max_n: int, shards: int, shard: int) -> dict[str, Path]:
    """Where shard ``shard`` of ``shards`` keeps its ``text`` and ``token`` counts."""
    folder = ngrams_dir() / task / corpus_version / f"{model_key(model)}-n{max_n}-shards-{shards}"
    return {level: folder / f"{level}-{shard:04d}.parquet" for level in ("text", "token")}


def write_shard(counts: ShardCounts, path: str | Path, meta: dict | None = None) -> Path:
    path = Path(path)
    n = np.concatenate([np.full(lv.count.size, lv.n, np.int16) for lv in counts.levels])
    sizes = np.concatenate([np.full(lv.count.size, lv.n, np.int32) for lv in counts.levels])
    offsets = np.zeros(sizes.size + 1, np.int32)
    np.cumsum(sizes, out=offsets[1:])
    flat = np.concatenate([lv.grams.ravel() for lv in counts.levels]).astype(np.int32)
    table = pa.table({
        "n": n,
        "count": np.concatenate([lv.count for lv in counts.levels]),
        "doc_count": np.concatenate([lv.doc_count for lv in counts.levels]),
        "ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat)),
    })
    info = {**(meta or {}), "level": counts.level, "max_n": counts.max_n, "documents": counts.documents,
            "tokens": counts.tokens, "vocab": counts.vocab}
    table = table.replace_schema_metadata({META_KEY: json.dumps(info, ensure_ascii=False).encode()})
    return write_parquet_atomic(table, path)


def read_shard(path: str | Path) -> ShardCounts:
    table = pq.read_table(path)
    info = json.loads((table.schema.metadata or {})[META_KEY])
    n = table.column("n").to_numpy()
    count = table.column("count").to_numpy()
    doc_count = table.column("doc_count").to_numpy()
    flat = _flat_ids(table.column("ids"))
    levels, at = [], 0
    for k in range(1, info["max_n"] + 1):
        rows = np.flatnonzero(n == k)
        grams = flat[at : at + rows.size * k].reshape(rows.size, k)
        at += rows.size * k
        levels.append(NgramCounts(k, grams, count[rows], doc_count[rows]))
    return ShardCounts(info["level"], info["max_n"], levels, info["vocab"], info["documents"], info["tokens"])


def _flat_ids(column: pa.ChunkedArray) -> np.ndarray:
    """int32 (sum of list lengths,): the ids of every row, in row order."""
    chunks = [c.flatten().to_numpy(zero_copy_only=False) for c in column.chunks]
    return np.concatenate(chunks).astype(np.int32) if chunks else np.zeros(0, np.int32)
