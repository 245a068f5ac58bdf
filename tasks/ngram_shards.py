"""Sharded n-gram counting: one task per corpus shard, then a merge (run them on Dask).

Shard results travel as Parquet paths; the merged tables are written where
``build_ngram_tables`` writes them and are equal to its tables."""

from __future__ import annotations

from prefect import get_run_logger, task

from storage import corpus as store
from storage.ngram_shards import read_shard, shard_paths, write_shard
from storage.ngram_tables import table_paths, write_ngram_table
from tasc.models import load_tokenizer
from tasc.ngrams.shards import (
    count_text_shard,
    count_token_shard,
    merged_text_table,
    merged_token_table,
    shard_bounds,
)
from tasks.corpus import NGRAM_CODE
from tasks.policies import StepInputs, cached


@task(name="ngram-shard", **cached(StepInputs(modules=NGRAM_CODE)))
def count_ngram_shard(corpus: dict, task_name: str, model: str, max_n: int, shard: int, shards: int) -> dict:
    """Every n-gram of shard ``shard`` of ``shards`` (train completions), text and token level."""
    texts = store.read_corpus(corpus["path"], split="train")["completion"].tolist()
    start, stop = shard_bounds(len(texts), shards)[shard]
    part = texts[start:stop]
    ids = load_tokenizer(model)(part, add_special_tokens=False)["input_ids"]
    out = shard_paths(task_name, corpus["version"], model, max_n, shards, shard)
    meta = {"corpus_version": corpus["version"], "model": model, "shard": shard, "shards": shards}
    return {"text": str(write_shard(count_text_shard(part, max_n), out["text"], meta)),
            "token": str(write_shard(count_token_shard(ids, max_n), out["token"], meta))}


@task(name="ngram-merge", **cached(StepInputs(modules=NGRAM_CODE)))
def merge_ngram_shards(corpus: dict, task_name: str, model: str, max_n: int, min_count: int,
                       shard_files: list[dict]) -> dict:
    """Sum the shards' counts into the two tables (same files and content as unsharded)."""
    tok = load_tokenizer(model)
    text = [read_shard(f["text"]) for f in shard_files]
    token = [read_shard(f["token"]) for f in shard_files]
    out = table_paths(task_name, corpus["version"], model, max_n, min_count)
    meta = {"corpus_version": corpus["version"], "model": model}
    text_tab, tok_tab = merged_text_table(text, min_count, tok), merged_token_table(token, min_count, tok)
    get_run_logger().info("merged %d shards: %d text, %d token n-grams", len(shard_files), text_tab.num_rows,
                          tok_tab.num_rows)
    return {
        "text": str(write_ngram_table(text_tab, out["text"], meta)),
        "token": str(write_ngram_table(tok_tab, out["token"], meta)),
        "rows": {"text": text_tab.num_rows, "token": tok_tab.num_rows},
        "corpus_tokens": int(sum(s.tokens for s in token)),
    }


def shard_count(corpus: dict, shards: int) -> int:
    """How many non-empty shards the train split gives (fewer documents than shards: fewer)."""
    return len(shard_bounds(int(corpus["manifest"]["rows"].get("train", 0)) or 1, shards))
