"""Ingestion and n-gram tables."""

from __future__ import annotations

from prefect import get_run_logger, task

from storage import corpus as store
from storage.ngram_tables import table_paths, write_ngram_table
from tasc.data.ingest import fingerprint_sources, ingest
from tasc.data.spec import load_spec
from tasc.models import load_tokenizer
from tasc.ngrams.counts import count_text_ngrams, count_token_ngrams
from tasks.policies import IngestInputs, StepInputs, cached

NGRAM_CODE = ("tasc.ngrams.counts", "tasc.ngrams.shards", "storage.ngram_tables", "storage.ngram_shards")


@task(name="ingest", **cached(IngestInputs(modules=("tasc.data.ingest", "tasc.data.readers", "tasc.data.spec", "storage.corpus"),
                                         exclude=("rebuild",))))
def ingest_corpus(spec: str, policy: str | None = None, rebuild: bool = False) -> dict:
    """Versioned corpus for the spec and bad-row policy; a no-op when the spec and source files
    are unchanged and the stored corpus is whole (a damaged one is rebuilt); ``rebuild`` ingests
    again regardless."""
    spec = load_spec(spec)
    version = store.corpus_version(spec, fingerprint_sources(spec), policy)
    path = None if rebuild else store.find_corpus(spec.name, version)
    if path is not None and (problem := store.corpus_problem(path)):
        get_run_logger().warning("stored corpus damaged, rebuilding it: %s", problem)
        path = None
    if path is not None:
        get_run_logger().info("corpus %s unchanged (version %s): nothing to do", spec.name, version)
        store.mark_latest(spec.name, version)
        return {"path": str(path), "version": version, "manifest": store.read_manifest(path), "reused": True}
    result = ingest(spec, policy)
    path = store.write_corpus(spec.name, version, result, replace=rebuild)
    get_run_logger().info("corpus %s: %s rows, %s rejected -> %s", spec.name, result.manifest["rows"],
                          result.manifest["rejected"], path)
    return {"path": str(path), "version": version, "manifest": result.manifest, "reused": False}


@task(name="ngram-tables", **cached(StepInputs(modules=NGRAM_CODE)))
def build_ngram_tables(corpus: dict, task_name: str, model: str, max_n: int = 8, min_count: int = 2) -> dict:
    """Text-level and token-level n-gram tables of the train completions, as Parquet."""
    texts = store.read_corpus(corpus["path"], split="train")["completion"].tolist()
    tok = load_tokenizer(model)
    out = table_paths(task_name, corpus["version"], model, max_n, min_count)
    meta = {"corpus_version": corpus["version"], "model": model}
    text_tab = count_text_ngrams(texts, max_n=max_n, min_count=min_count, tokenizer=tok)
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    tok_tab = count_token_ngrams(ids, max_n=max_n, min_count=min_count, tokenizer=tok)
    return {
        "text": str(write_ngram_table(text_tab, out["text"], meta)),
        "token": str(write_ngram_table(tok_tab, out["token"], meta)),
        "rows": {"text": text_tab.num_rows, "token": tok_tab.num_rows},
        "corpus_tokens": int(sum(len(i) for i in ids)),
    }
