"""Sharded n-gram counting: the merged tables equal the unsharded ones, in the core and
through the n-gram flow on a real Dask task runner."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from storage.ngram_shards import read_shard, write_shard
from tasc.ngrams.counts import count_text_ngrams, count_token_ngrams
from tasc.ngrams.shards import (
    count_text_shard,
    count_token_shard,
    merged_text_table,
    merged_token_table,
    shard_bounds,
)
from tests.test_vocab import mbpp_code, snips_completions


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return snips_completions(150) + mbpp_code(40)


def test_shard_bounds_cover_every_document_once():
    assert shard_bounds(10, 3) == [(0, 3), (3, 7), (7, 10)]
    assert shard_bounds(2, 5) == [(0, 1), (1, 2)]  # never an empty shard
    assert shard_bounds(0, 4) == [(0, 0)]


@pytest.mark.parametrize("shards", [2, 5])
@pytest.mark.parametrize("min_count", [2, 4])
def test_merged_tables_equal_the_unsharded_ones(texts, tiny_tokenizer, tmp_path, shards, min_count):
    ids = tiny_tokenizer(texts, add_special_tokens=False)["input_ids"]
    bounds = shard_bounds(len(texts), shards)
    # Through the Parquet layout, as the shard tasks hand them to the merge.
    text = [read_shard(write_shard(count_text_shard(texts[a:b], 6), tmp_path / f"t{a}.parquet")) for a, b in bounds]
    token = [read_shard(write_shard(count_token_shard(ids[a:b], 6), tmp_path / f"k{a}.parquet")) for a, b in bounds]
    whole_text = count_text_ngrams(texts, max_n=6, min_count=min_count, tokenizer=tiny_tokenizer)
    whole_token = count_token_ngrams(ids, max_n=6, min_count=min_count, tokenizer=tiny_tokenizer)
    merged_text = merged_text_table(text, min_count, tiny_tokenizer)
    merged_token = merged_token_table(token, min_count, tiny_tokenizer)
    assert whole_text.num_rows > 100 and whole_token.num_rows > 100
    assert merged_text.equals(whole_text, check_metadata=True)
    assert merged_token.equals(whole_token, check_metadata=True)
    # An n-gram below min_count in every shard can still reach it overall: shards must not prune.
    assert sum(s.documents for s in text) == len(texts)


def test_sharded_flow_on_dask_equals_unsharded(prefect_harness, tiny_model_dir, monkeypatch):
    pytest.importorskip("prefect_dask")
    from flows.runners import task_runner
    from flows.stages import ingest_flow, ngrams_flow
    from tests.prefect_runs import task_states

    monkeypatch.setenv("TASC_DASK_WORKERS", "1")
    monkeypatch.setenv("TASC_DASK_PROCESSES", "0")  # one in-process worker keeps the test light
    corpus = ingest_flow("prompt-completion")
    plain = ngrams_flow("prompt-completion", str(tiny_model_dir), max_n=5, min_count=2, corpus=corpus)
    expected = {k: pq.read_table(plain[k]) for k in ("text", "token")}
    runner = task_runner("dask")
    assert type(runner).__name__ == "DaskTaskRunner"
    state = ngrams_flow.with_options(task_runner=runner)("prompt-completion", str(tiny_model_dir), max_n=5,
                                                         min_count=2, corpus=corpus, shards=3, return_state=True)
    sharded = state.result()
    assert sharded["rows"] == plain["rows"] and sharded["corpus_tokens"] == plain["corpus_tokens"]
    for k in ("text", "token"):
        assert pq.read_table(sharded[k]).equals(expected[k], check_metadata=True)
    states = task_states(state.state_details.flow_run_id)
    assert len(states["ngram-shard"]) == 3 and len(states["ngram-merge"]) == 1
    shard_files = sorted(Path(sharded["text"]).parent.parent.glob("*-shards-3/text-*.parquet"))
    assert len(shard_files) == 3
