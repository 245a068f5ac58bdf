"""One Prefect flow per stage: ingest, n-gram tables, draft (harvest -> build) and benchmark.

Each stage flow opens its own MLflow run (or a nested one under the pipeline's run) and
logs its parameters, metrics and artifacts there."""

from __future__ import annotations

from prefect import flow

from tasks.bench import run_bench
from tasks.corpus import build_ngram_tables, ingest_corpus
from tasks.draft import build_draft, harvest_outputs
from tasks.tracking import end_run, flat_bench_metrics, log_to_run, start_run

DEFAULT_MODEL = "smollm2-135m-instruct"


def _experiment(spec: str) -> str:
    from tasc.spec import load_spec

    return f"tasc-{load_spec(spec).name}"


@flow(name="tasc-ingest", log_prints=True)
def ingest_flow(spec: str, policy: str | None = None, parent_run_id: str | None = None) -> dict:
    corpus = ingest_corpus(spec, policy)
    run_id = start_run(_experiment(spec), "ingest", {"spec": spec, "corpus_version": corpus["version"]},
                       parent_run_id=parent_run_id)
    m = corpus["manifest"]
    log_to_run(run_id, metrics={f"rows.{k}": v for k, v in m["rows"].items()} | {"rejected": m["rejected"]},
               json_files={"manifest.json": m})
    end_run(run_id)
    return corpus


@flow(name="tasc-ngrams", log_prints=True)
def ngrams_flow(spec: str, model: str = DEFAULT_MODEL, max_n: int = 8, min_count: int = 2,
                corpus: dict | None = None, parent_run_id: str | None = None) -> dict:
    corpus = corpus or ingest_corpus(spec)
    from tasc.spec import load_spec

    tables = build_ngram_tables(corpus, load_spec(spec).name, model, max_n, min_count)
    run_id = start_run(_experiment(spec), "ngrams", {"spec": spec, "model": model, "max_n": max_n,
                       "min_count": min_count, "corpus_version": corpus["version"]}, parent_run_id=parent_run_id)
    log_to_run(run_id, metrics={"rows.text": tables["rows"]["text"], "rows.token": tables["rows"]["token"],
                                "corpus_tokens": tables["corpus_tokens"]},
               artifacts={"ngrams": tables["text"]})
    log_to_run(run_id, artifacts={"ngrams": tables["token"]})
    end_run(run_id)
    return tables


@flow(name="tasc-draft", log_prints=True)
def draft_flow(spec: str, model: str = DEFAULT_MODEL, source: str = "auto", harvest_limit: int | None = 400,
               dtype: str = "auto", corpus: dict | None = None, parent_run_id: str | None = None) -> dict:
    """harvest (on-policy outputs) -> build draft. source: references | on-policy | both | auto."""
    corpus = corpus or ingest_corpus(spec)
    harvest_file = None
    if source in ("on-policy", "both", "auto") and harvest_limit != 0:
        harvest_file = harvest_outputs(spec, corpus, model, harvest_limit, dtype)
    main = build_draft(spec, corpus, source, model, harvest_file)
    refs = build_draft(spec, corpus, "references", model, None)
    run_id = start_run(_experiment(spec), "draft", {"spec": spec, "model": model, "source": source,
                       "harvest_limit": harvest_limit, "corpus_version": corpus["version"]},
                       parent_run_id=parent_run_id)
    log_to_run(run_id, artifacts={"draft": main})
    end_run(run_id)
    return {"main": main, "references": refs}


@flow(name="tasc-bench", log_prints=True)
def bench_flow(spec: str, model: str = DEFAULT_MODEL, methods: str = "greedy,pld,tasc-spec", limit: int | None = 20,
               dtype: str = "auto", report: str | None = None, drafts: dict | None = None,
               harvest_limit: int | None = 400, corpus: dict | None = None,
               parent_run_id: str | None = None, extra_models: dict | None = None) -> dict:
    """Benchmark methods side by side; builds or reuses the draft the spec methods need.
    extra_models: method model folders, "tasc-ft" and "ft-only" (see tasc.runners)."""
    corpus = corpus or ingest_corpus(spec)
    names = [m.strip() for m in methods.split(",") if m.strip()]
    if drafts is None and any(n.startswith("tasc-spec") or n.endswith("+spec") for n in names):
        drafts = draft_flow(spec, model, "auto", harvest_limit, "auto", corpus, parent_run_id)
    summary = run_bench(spec, corpus, model, names, limit, dtype, drafts, report, extra_models=extra_models)
    run_id = start_run(_experiment(spec), "bench", {"spec": spec, "model": model, "methods": methods,
                       "limit": limit, "dtype": summary["environment"]["dtype"], "extra_models": extra_models,
                       "corpus_version": corpus["version"]}, parent_run_id=parent_run_id)
    log_to_run(run_id, metrics=flat_bench_metrics(summary), artifacts={"report": summary["paths"]["json"]})
    log_to_run(run_id, artifacts={"report": summary["paths"]["markdown"]})
    log_to_run(run_id, artifacts={"report": summary["paths"]["chart"]})
    end_run(run_id)
    summary["mlflow_run_id"] = run_id
    return summary
