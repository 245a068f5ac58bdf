"""Readers: turn the files (or Hugging Face dataset) a spec names into raw records.

Each :class:`RawRecord` remembers its file and line, so later problems read ``file:line
field: reason``. Files are read as bytes and decoded with ``source.encoding`` /
``source.errors`` here, not by ``open``: under ``strict`` a bad byte stops the read naming
file and byte offset; under a lenient mode each record whose bytes were replaced is counted.
Record-level problems (a line that is not JSON) come back as records with ``problem`` set;
file-level ones (no such file, a bad byte under ``strict``) raise :class:`ReaderError`, and
so do a CSV header naming a column twice and a JSONL object naming a key twice: keeping one
of the values would silently lose the other. (Decoding lives in :mod:`tasc.data.decoding`.)

SNIPS: the utterance is its segments joined (outer spaces stripped); slot values are
stripped (some spans such as ``"vimeo "`` include the separator); a slot named twice in one
utterance (61 of the 14,484 shipped ones) maps to the list of its values in utterance order.
"""

from __future__ import annotations

import csv
import glob
import io
import itertools
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasc.data.decoding import ReaderError, decode_file, unmark
from tasc.data.spec import Source

HUB_PREFIX = "hf://"
_HF_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


@dataclass(frozen=True)
class RawRecord:
    """One record as read, before it is shaped into a prompt and a completion."""

    source: str  # file path, or dataset id for reader "hf"
    line: int | None  # 1-based line (JSONL/CSV) or item index + 1 (JSON, Parquet, HF)
    location: str  # e.g. "mbpp.jsonl:37" or "train_PlayMusic_full.json: PlayMusic[12]"
    fields: dict[str, Any]
    problem: str | None = None  # why the record could not be parsed; fields is then empty
    raw: str | None = None  # the original text of a record that could not be parsed
    replacements: int = 0  # runs of undecodable bytes replaced in this record's text


def expand_paths(source: Source) -> list[str]:
    """The files a source reads: globs expanded (sorted), duplicates dropped, order kept.

    For reader ``hf`` an ``hf://owner/name`` entry is a hub dataset id and is kept as is.
    """
    out: list[str] = []
    for pattern in source.paths:
        if source.reader == "hf" and pattern.startswith(HUB_PREFIX):
            matches = [pattern]
        elif glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern))
            if not matches:
                raise ReaderError(f"no files match {pattern!r} (source.paths)")
        elif os.path.exists(pattern):
            matches = [pattern]
        else:
            msg = f"no such file: {pattern} (source.paths)"
            if source.reader == "hf":
                # Relative entries resolve against the spec's folder, so a bare hub id
                # becomes a missing path; the prefix keeps it an id.
                msg += "; write a Hugging Face hub dataset as hf://owner/name"
            raise ReaderError(msg)
        out += [m for m in matches if m not in out]
    return out


def read_records(source: Source) -> Iterator[RawRecord]:
    """Yield the records of every file (or dataset) the source names, in path order."""
    reader = _READERS.get(source.reader)
    if reader is None:
        raise ReaderError(f"unknown reader {source.reader!r}; known: {', '.join(sorted(_READERS))}")
    for target in expand_paths(source):
        yield from reader(target, source)


def _record(path: str, line: int | None, location: str, fields: Any, marked: bool) -> RawRecord:
    """A record from parsed data; anything but an object becomes a problem record."""
    if not isinstance(fields, dict):
        raw = json.dumps(unmark(fields)[0], ensure_ascii=False, default=str)
        return RawRecord(path, line, location, {}, f"expected an object, got {type(fields).__name__}", raw)
    count = 0
    if marked:
        fields, count = unmark(fields)
    return RawRecord(path, line, location, fields, replacements=count)


class _DuplicateKey(Exception):
    """A JSON object names one key twice; ``json`` would keep the last value without a word."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) < len(pairs):
        raise _DuplicateKey(next(k for i, (k, _) in enumerate(pairs) if k in dict(pairs[:i])))
    return obj


def read_jsonl(path: str, source: Source) -> Iterator[RawRecord]:
    """One JSON object per line; blank lines are skipped, bad lines are problem records."""
    text, marked = decode_file(path, source.encoding, source.errors)
    name = os.path.basename(path)
    # Split on "\n" only: str.splitlines also breaks on U+2028 and friends, which are legal
    # inside JSON strings and would shift every later line number.
    for i, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line, object_pairs_hook=_unique_keys)
        except json.JSONDecodeError as e:
            bad = f"not valid JSON: {e.msg} (column {e.colno})"
            yield RawRecord(path, i, f"{name}:{i}", {}, bad, unmark(line)[0])
        except _DuplicateKey as e:
            raise ReaderError(f"{path}:{i}: duplicate key {unmark(e.args[0])[0]!r} in one JSON object "
                              "(only one of its values could be kept)") from None
        else:
            yield _record(path, i, f"{name}:{i}", obj, marked)


def load_json(path: str, source: Source) -> tuple[Any, bool]:
    """Parse a whole JSON file; a syntax error names the file, line and column."""
    text, marked = decode_file(path, source.encoding, source.errors)
    try:
        return json.loads(text), marked
    except json.JSONDecodeError as e:
        raise ReaderError(f"{path}:{e.lineno}: not valid JSON: {e.msg} (column {e.colno})") from None


def _follow(obj: Any, dotted: str, path: str) -> Any:
    """Walk a dotted path (``data.items`` or ``data.0.rows``) into parsed JSON."""
    for key in dotted.split("."):
        if isinstance(obj, list) and key.isdigit() and int(key) < len(obj):
            obj = obj[int(key)]
        elif isinstance(obj, dict) and key in obj:
            obj = obj[key]
        else:
            raise ReaderError(f"{path}: source.json_path {dotted!r}: no key {key!r}")
    return obj


def read_json(path: str, source: Source) -> Iterator[RawRecord]:
    """A JSON file holding a list of records, or one at ``source.json_path``."""
    data, marked = load_json(path, source)
    if source.json_path:
        data = _follow(data, source.json_path, path)
    if not isinstance(data, list):
        hint = "" if source.json_path else "; set source.json_path to the list inside it"
        raise ReaderError(f"{path}: expected a list of records, got {type(data).__name__}{hint}")
    name, prefix = os.path.basename(path), source.json_path or ""
    for i, item in enumerate(data):
        yield _record(path, i + 1, f"{name}: {prefix}[{i}]", item, marked)


def read_csv(path: str, source: Source) -> Iterator[RawRecord]:
    """A CSV file with a header row; every value is text."""
    text, marked = decode_file(path, source.encoding, source.errors)
    name = os.path.basename(path)
    rows = csv.reader(io.StringIO(text, newline=""))
    header = next(rows, None) or []
    for col, field in enumerate(header):
        if field in header[:col]:
            # zip into a dict would keep only the last column of that name, without a word.
            raise ReaderError(f"{path}:1: duplicate column {unmark(field)[0]!r} in the header (columns "
                              f"{header.index(field) + 1} and {col + 1})")
    while True:
        start = rows.line_num + 1  # a quoted field may span lines: report where the row starts
        try:
            row = next(rows)
        except StopIteration:
            return
        except csv.Error as e:
            yield RawRecord(path, start, f"{name}:{start}", {}, f"not valid CSV: {e}")
            continue
        if not row:
            continue
        if len(row) != len(header):
            raw = json.dumps(unmark(row)[0], ensure_ascii=False)
            reason = f"{len(row)} values for {len(header)} columns"
            yield RawRecord(path, start, f"{name}:{start}", {}, reason, raw)
            continue
        yield _record(path, start, f"{name}:{start}", dict(zip(header, row, strict=True)), marked)


def read_parquet(path: str, source: Source) -> Iterator[RawRecord]:
    """A Parquet file, read in batches so a large file is never in memory twice."""
    import pyarrow.parquet as pq

    name = os.path.basename(path)
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise ReaderError(f"{path}: not a readable Parquet file: {e}") from None
    rows = (row for batch in pf.iter_batches(batch_size=4096) for row in batch.to_pylist())
    for i, row in enumerate(rows):
        yield RawRecord(path, i + 1, f"{name}: [{i}]", row)


def _hf_args(target: str) -> tuple[str, dict[str, Any]]:
    """``load_dataset`` arguments for a hub id, a local folder or local data files."""
    if target.startswith(HUB_PREFIX):
        return target[len(HUB_PREFIX) :].removeprefix("datasets/"), {}
    if os.path.isdir(target):
        return target, {}
    builder = _HF_BUILDERS.get(Path(target).suffix.lower())
    if builder is None:
        known = ", ".join(sorted(_HF_BUILDERS))
        raise ReaderError(f"{target}: reader 'hf' cannot tell the format; use a file ending in {known}")
    return builder, {"data_files": [target]}


def read_hf(target: str, source: Source) -> Iterator[RawRecord]:
    """A Hugging Face dataset via ``datasets.load_dataset``, streamed (no cache copy)."""
    try:
        import datasets
    except ImportError as e:
        raise ReaderError("reader 'hf' needs the 'datasets' package: pip install datasets") from e
    split = source.hf_split or "train"
    name, kwargs = _hf_args(target)
    try:
        ds = datasets.load_dataset(name, split=split, streaming=True, **kwargs)
        rows = iter(ds)
        first = next(rows, None)  # when streaming, loading errors surface on the first row
    except Exception as e:  # datasets raises many types (ConnectionError, ValueError, ...)
        hint = ""
        if target.startswith(HUB_PREFIX):
            hint = "; a hub dataset needs network access or a copy in the Hugging Face cache"
        raise ReaderError(f"could not load Hugging Face dataset {name!r} (split {split!r}): {e}{hint}") from e
    for i, row in enumerate(itertools.chain([] if first is None else [first], rows)):
        yield RawRecord(target, i + 1, f"{target}: {split}[{i}]", dict(row))


def _snips_fields(intent: str, item: Any) -> dict[str, Any] | str:
    """The fields of one SNIPS utterance, or the reason it cannot be read."""
    segments = item.get("data") if isinstance(item, dict) else None
    if not isinstance(segments, list) or not segments:
        return "data: expected a non-empty list of segments"
    parts: list[str] = []
    slots: dict[str, Any] = {}
    for seg in segments:
        if not isinstance(seg, dict) or not isinstance(seg.get("text"), str):
            return "data: every segment needs a 'text' string"
        parts.append(seg["text"])
        if "entity" in seg:
            name, value = str(seg["entity"]), seg["text"].strip()
            if name not in slots:
                slots[name] = value
            elif isinstance(slots[name], list):
                slots[name].append(value)
            else:
                slots[name] = [slots[name], value]
    canonical = json.dumps({"intent": intent, "slots": slots}, ensure_ascii=False)
    return {"utterance": "".join(parts).strip(), "intent": intent, "slots": slots, "json": canonical}


def read_snips(path: str, source: Source) -> Iterator[RawRecord]:
    """SNIPS NLU files: ``{Intent: [{"data": [{"text", "entity"?}, ...]}, ...]}``."""
    data, marked = load_json(path, source)
    if not isinstance(data, dict):
        raise ReaderError(f"{path}: expected a SNIPS object {{intent: [utterances]}}")
    name, n = os.path.basename(path), 0
    for intent, items in data.items():
        if not isinstance(items, list):
            raise ReaderError(f"{path}: intent {intent!r}: expected a list of utterances")
        for i, item in enumerate(items):
            n += 1
            item, count = unmark(item) if marked else (item, 0)
            fields = _snips_fields(intent, item)
            loc = f"{name}: {intent}[{i}]"
            if isinstance(fields, str):
                yield RawRecord(path, n, loc, {}, fields, json.dumps(item, ensure_ascii=False))
            else:
                yield RawRecord(path, n, loc, fields, replacements=count)


def _squad_questions(data: Any, path: str) -> Iterator[tuple[str, dict[str, Any], Any]]:
    """(location suffix, paragraph-level fields, question) for every SQuAD question."""
    articles = data.get("data") if isinstance(data, dict) else None
    if not isinstance(articles, list):
        raise ReaderError(f"{path}: expected a SQuAD object with a 'data' list")
    for a, article in enumerate(articles):
        for p, para in enumerate(article.get("paragraphs") or [] if isinstance(article, dict) else []):
            outer = {"title": article.get("title"), "context": para.get("context")}
            for q, qa in enumerate(para.get("qas") or []):
                yield f"data[{a}].paragraphs[{p}].qas[{q}]", outer, qa


def read_squad(path: str, source: Source) -> Iterator[RawRecord]:
    """SQuAD JSON: one record per question with its context and answer texts."""
    data, marked = load_json(path, source)
    name = os.path.basename(path)
    for n, (where, outer, qa) in enumerate(_squad_questions(data, path), start=1):
        if not isinstance(qa, dict):
            yield _record(path, n, f"{name}: {where}", qa, marked)
            continue
        answers = [a.get("text") for a in qa.get("answers") or [] if isinstance(a, dict)]
        fields = {**outer, "id": qa.get("id"), "question": qa.get("question"), "answers": answers}
        if answers:  # no answers: leave 'answer' out so the row is reported as missing it
            fields["answer"] = answers[0]
        yield _record(path, n, f"{name}: {where}", fields, marked)


_READERS = {
    "jsonl": read_jsonl,
    "json": read_json,
    "csv": read_csv,
    "parquet": read_parquet,
    "hf": read_hf,
    "snips": read_snips,
    "squad": read_squad,
}
