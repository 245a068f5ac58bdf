"""Files of TASC-ft vocabulary rounds under the state folder::

    vocab/<task>/<corpus_version>/round-<i>/model/           model + tokenizer of round i
    vocab/<task>/<corpus_version>/round-<i>/finetune/        its fine-tuning checkpoints (tasc.ft.rounds)
    vocab/<task>/<corpus_version>/round-<i>/selection.parquet  the round's selection table
    vocab/<task>/<corpus_version>/round-<i>/round.json         the round's numbers, written last
    vocab/<task>/<corpus_version>/round-<i>/origin.json        the key of the inputs it was made from
    vocab/<task>/<corpus_version>/ft-only/                   the fine-tune-only baseline (same files)
    vocab/<task>/<corpus_version>/report.json                the rounds report
    vocab/<task>/<corpus_version>/finetune/<key>/            the fine-tune stage, keyed by its inputs
    vocab/<task>/<corpus_version>/finetune-remote/<run_id>/model/  a remote fine-tune's result

A round folder records the key of its inputs in ``origin.json`` before any work, and
``round.json`` (which repeats the key) only once the round is complete: a folder whose
``round.json`` carries the same key is a finished round to reuse, one with only the same
``origin.json`` an interrupted round to resume (its checkpoints kept), anything else is
emptied first.

The selection table (token, n, count, base_tokens, estimated_gain, measured_gain, uses)
carries ``tasc.round`` and ``tasc.meta`` (JSON) in its Parquet schema metadata.
"""

from __future__ import annotations

import json
import shutil
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


def report_path(task: str, corpus_version: str) -> Path:
    return vocab_dir(task, corpus_version) / "report.json"


def finetune_dir(task: str, corpus_version: str, key: str) -> Path:
    return vocab_dir(task, corpus_version) / "finetune" / key


def remote_model_dir(task: str, corpus_version: str, run_id: str) -> Path:
    """Where the model a remote fine-tune logged to MLflow run ``run_id`` is downloaded."""
    return vocab_dir(task, corpus_version) / "finetune-remote" / run_id / "model"


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def tokenizer_files(model_dir: str | Path) -> list[Path]:
    """The tokenizer's files in a saved model folder (those that exist)."""
    return [p for n in TOKENIZER_FILES if (p := Path(model_dir) / n).exists()]


def finished_round(folder: str | Path, origin: str) -> dict | None:
    """The summary of the finished round in ``folder`` made from inputs ``origin``, else None."""
    folder = Path(folder)
    done = folder / "round.json"
    if done.exists() and (s := read_json(done)).get("origin") == origin and (folder / "model").is_dir():
        return s
    return None


def claim(folder: str | Path, origin: str) -> Path:
    """Make ``folder`` the work folder of a run from inputs ``origin``: kept as it is (with
    its checkpoints) when it was started from the same inputs, emptied otherwise."""
    folder = Path(folder)
    mark = folder / "origin.json"
    if not mark.exists() or read_json(mark).get("origin") != origin:
        shutil.rmtree(folder, ignore_errors=True)
    write_json({"origin": origin}, mark)
    return folder


def drop_checkpoints(folder: str | Path) -> None:
    """Forget the fine-tuning checkpoints in a round folder (the next run trains from scratch)."""
    shutil.rmtree(Path(folder) / "finetune", ignore_errors=True)


def save_round(folder: str | Path, summary: dict, selection: pd.DataFrame, meta: dict | None = None) -> dict:
    """Write the round's selection table, then ``round.json``, which marks the round finished;
    returns ``summary`` with the paths of both (``selection``, ``round_json``)."""
    folder = Path(folder)
    index = summary["round"]
    out = {**summary, "selection": str(write_selection(selection, folder / "selection.parquet", index, meta)),
           "round_json": str(folder / "round.json")}
    write_json(out, folder / "round.json")
    return out


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
