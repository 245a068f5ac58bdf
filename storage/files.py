"""Atomic file writes: a temporary file in the target folder, then a rename, so a killed
process leaves the old file or the new one, never half of one. And the file-name key of a
model, shared by the layouts that keep one file or folder per model."""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def _temp_beside(path: Path) -> tuple[int, str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    return tempfile.mkstemp(prefix=path.name + ".", dir=path.parent)


def write_parquet_atomic(table: pa.Table, path: str | Path) -> Path:
    """Write ``table`` (zstd) to ``path`` atomically; returns the path."""
    path = Path(path)
    fd, tmp = _temp_beside(path)
    os.close(fd)
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    path = Path(path)
    fd, tmp = _temp_beside(path)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)
    return path


def model_key(model: str) -> str:
    """A file-name-safe key for a model name, folder or URI: a readable slug and a short hash
    (two folders of the same name stay apart)."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(str(model).rstrip("/")).name or str(model))[:48]
    return f"{slug}-{hashlib.sha256(str(model).encode()).hexdigest()[:8]}"
