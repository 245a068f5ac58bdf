"""Ingestion: read a spec's sources into a validated prompt/completion corpus.

Pure: returns DataFrames and a manifest and writes nothing (``storage.corpus`` stores them).
Every record is shaped (``prompt_completion``, ``messages`` or ``template``) and checked by
tasc.data.rows; each problem becomes a bad row naming its file, line and field. Policy ``fail``
raises :class:`IngestError` listing the first problems; ``skip`` keeps the good rows and returns
the bad ones in ``rejected``. Nothing disappears silently: exact duplicates are removed but
counted, and records whose bytes were replaced while decoding are counted. No rows at all
(an empty source, or every record rejected) raises :class:`IngestError` under either policy:
an empty corpus is never a success.

Splits come from a stable hash of the split seed and the row id, so they depend neither on
row order nor on Python's hash seed, and a row keeps its split when others are added.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any

import pandas as pd

from tasc import progress_bar
from tasc.data.readers import HUB_PREFIX, RawRecord, expand_paths, read_records
from tasc.data.rows import FORMATTER, BadRow, build_row
from tasc.data.spec import SpecError, SplitRule, TaskSpec, bad_row_policy

SPLITS = ("train", "validation", "test")
BASE_COLUMNS = ["id", "prompt", "completion", "split", "source", "line"]
CHAT_COLUMNS = ["system", "messages"]  # only for shape "messages"
REJECTED_COLUMNS = ["source", "line", "location", "field", "reason", "raw"]
SHOWN_PROBLEMS = 5


class IngestError(ValueError):
    """Bad rows under policy ``fail``; ``rejected`` holds every one of them."""

    def __init__(self, message: str, rejected: pd.DataFrame):
        super().__init__(message)
        self.rejected = rejected


@dataclass
class IngestResult:
    """The corpus, the rejected rows (possibly empty) and the manifest describing both."""

    corpus: pd.DataFrame
    rejected: pd.DataFrame
    manifest: dict[str, Any]


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _sha256_dir(path: str) -> str:
    """A folder (a local Hugging Face dataset): names and contents of every file in it."""
    h = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            h.update(os.path.relpath(full, path).encode() + b"\0" + _sha256_file(full).encode())
    return h.hexdigest()


def fingerprint_sources(spec: TaskSpec) -> dict[str, str]:
    """Path -> sha256 of its bytes for every source; cheap enough to run before parsing.

    A hub dataset (``hf://owner/name``) cannot be hashed without downloading it, so its
    fingerprint is its id and split: it is re-read only when the spec changes.
    """
    out: dict[str, str] = {}
    for path in expand_paths(spec.source):
        if path.startswith(HUB_PREFIX):
            out[path] = f"hub:{path}@{spec.source.hf_split or 'train'}"
        elif os.path.isdir(path):
            out[path] = _sha256_dir(path)
        else:
            out[path] = _sha256_file(path)
    return out


def _check_spec(spec: TaskSpec) -> None:
    """Spec mistakes that would otherwise show up as every row being bad."""
    where = str(spec.path or spec.name)
    if spec.shape == "template":
        for key in ("prompt_template", "completion_template"):
            try:
                names = [n for _, n, _, _ in FORMATTER.parse(getattr(spec, key) or "") if n is not None]
            except ValueError as e:
                raise SpecError(
                    f"{where}: '{key}' is not a valid template: {e} (write {{{{ for a brace)"
                ) from e
            if "" in names or any(n[0].isdigit() for n in names if n):
                raise SpecError(f"{where}: '{key}' uses a positional field; name a record field: {{name}}")
    taken = set(BASE_COLUMNS) | (set(CHAT_COLUMNS) if spec.shape == "messages" else set())
    clash = sorted(set(spec.extras) & taken)
    if clash:
        raise SpecError(f"{where}: 'extras' columns {clash} clash with corpus columns {sorted(taken)}")
    rule = spec.split
    if min(rule.validation, rule.test) < 0 or rule.validation + rule.test >= 1:
        raise SpecError(f"{where}: 'split' fractions must be >= 0 and leave rows for train")


def assign_split(row_id: str, rule: SplitRule) -> str:
    """``train`` / ``validation`` / ``test`` from sha256(seed + id) mapped to [0, 1)."""
    digest = hashlib.sha256(f"{rule.seed}:{row_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    if u < rule.test:
        return "test"
    return "validation" if u < rule.test + rule.validation else "train"


def _rejection(rec: RawRecord, bad: BadRow) -> dict[str, Any]:
    raw = rec.raw if rec.problem is not None else json.dumps(rec.fields, ensure_ascii=False, default=str)
    where = {"source": rec.source, "line": rec.line, "location": rec.location}
    return {**where, "field": bad.field, "reason": bad.reason, "raw": raw}


def _collect(spec: TaskSpec) -> tuple[list[dict], list[dict], dict[str, int]]:
    """Good rows (deduplicated), rejections and counts, in reading order."""
    rows: list[dict] = []
    rejected: list[dict] = []
    seen_text: set[tuple] = set()
    seen_id: dict[str, str] = {}
    counts = {"records_read": 0, "duplicates_removed": 0, "decode_replacements": 0}
    # Rows and their rate (no total is known before reading); shown only past a second (large files).
    with progress_bar(desc=f"ingest {spec.name}", unit=" rows", delay=1.0) as bar:
        for rec in read_records(spec.source):
            bar.update()
            counts["records_read"] += 1
            counts["decode_replacements"] += rec.replacements > 0
            try:
                row = build_row(rec, spec)
                key = (row["prompt"], row["completion"], row.get("system"), row.get("messages"))
                if key in seen_text:
                    counts["duplicates_removed"] += 1
                    continue
                if row["id"] in seen_id:
                    first = seen_id[row["id"]]
                    raise BadRow(spec.source.id_field or "id",
                                 f"duplicate id {row['id']!r} (first at {first})")
            except BadRow as bad:
                rejected.append(_rejection(rec, bad))
                continue
            seen_text.add(key)
            seen_id[row["id"]] = rec.location
            rows.append(row)
    return rows, rejected, counts


def _frames(rows: list[dict], rejected: list[dict], spec: TaskSpec) -> tuple[pd.DataFrame, pd.DataFrame]:
    chat = CHAT_COLUMNS if spec.shape == "messages" else []
    corpus = pd.DataFrame(rows, columns=BASE_COLUMNS + chat + list(spec.extras))
    corpus["line"] = corpus["line"].astype("Int64")
    bad = pd.DataFrame(rejected, columns=REJECTED_COLUMNS)
    bad["line"] = bad["line"].astype("Int64")
    return corpus, bad


def _failure_message(spec: TaskSpec, rejected: list[dict]) -> str:
    lines = [f"{spec.name}: {len(rejected)} bad row(s); the first {min(SHOWN_PROBLEMS, len(rejected))}:"]
    lines += [f"  {r['location']} {r['field']}: {r['reason']}" for r in rejected[:SHOWN_PROBLEMS]]
    lines.append(
        "Fix the data, or set `on_bad_rows: skip` in the spec to keep the good rows and set the bad aside."
    )
    return "\n".join(lines)


def _empty_message(spec: TaskSpec, rejected: list[dict]) -> str:
    files = ", ".join(expand_paths(spec.source))
    if not rejected:
        return f"{files}: no records to ingest (the source is empty); add rows, or point source.paths at the data"
    first = rejected[0]
    return (f"{files}: all {len(rejected)} records were rejected under policy skip (the first: {first['location']} "
            f"{first['field']}: {first['reason']}); fix the data or the spec's field names")


def _manifest(spec: TaskSpec, policy: str, corpus: pd.DataFrame, n_rejected: int, counts: dict) -> dict:
    fingerprints = fingerprint_sources(spec)
    sizes = {p: (os.path.getsize(p) if os.path.isfile(p) else None) for p in fingerprints}
    return {
        "spec": spec.name,
        "spec_hash": spec.hash(),
        "policy": policy,
        "rows": {s: int((corpus["split"] == s).sum()) for s in SPLITS},
        "total": len(corpus),
        "rejected": n_rejected,
        **counts,
        "sources": {p: {"sha256": h, "bytes": sizes[p]} for p, h in fingerprints.items()},
    }


def ingest(spec: TaskSpec, policy: str | None = None) -> IngestResult:
    """Read, shape, validate, deduplicate and split a spec's data; writes nothing.

    ``policy`` overrides ``spec.on_bad_rows``: ``fail`` raises :class:`IngestError` on any
    bad row, ``skip`` returns them in ``IngestResult.rejected``.
    """
    policy = bad_row_policy(spec, policy)
    _check_spec(spec)
    rows, rejected, counts = _collect(spec)
    for row in rows:
        row["split"] = assign_split(row["id"], spec.split)
    corpus, bad = _frames(rows, rejected, spec)
    if rejected and policy == "fail":
        raise IngestError(_failure_message(spec, rejected), bad)
    if not rows:  # an empty corpus fails: it is never stored, nor marked LATEST
        raise IngestError(_empty_message(spec, rejected), bad)
    return IngestResult(corpus, bad, _manifest(spec, policy, corpus, len(bad), counts))
