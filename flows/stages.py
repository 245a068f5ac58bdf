"""One Prefect flow per stage: ingest, n-gram tables, fine-tune, draft (harvest -> build) and
benchmark.

Each stage flow opens its own MLflow run (or a nested one under the pipeline's run) and
logs its parameters, metrics and artifacts there. Deterministic steps are cached
(flows/resume.py), so a re-run after a failure resumes where it stopped."""

from __future__ import annotations

from prefect import flow

from flows.resume import map_cached, run_cached
from tasks.bench import run_bench
from tasks.corpus import build_ngram_tables, ingest_corpus
from tasks.draft import build_draft, harvest_outputs
from tasks.finetune import finetune_model
from tasks.ngram_shards import count_ngram_shard, merge_ngram_shards, shard_count
from tasks.tracking import end_run, flat_bench_metrics, log_to_run, start_run

DEFAULT_MODEL = "smollm2-135m-instruct"


def _experiment(spec: str) -> str:
    from tasc.data.spec import load_spec

    return f"tasc-{load_spec(spec).name}"


def _corpus(spec: str, policy: str | None = None) -> dict:
    corpus, hit = run_cached(ingest_corpus, spec, policy)
    # A cache hit did not even look at the files: the corpus was reused all the same.
    return {**corpus, "reused": True} if hit else corpus


@flow(name="tasc-ingest", log_prints=True)
def ingest_flow(spec: str, policy: str | None = None, parent_run_id: str | None = None) -> dict:
    corpus = _corpus(spec, policy)
    run_id = start_run(_experiment(spec), "ingest", {"spec": spec, "corpus_version": corpus["version"]},
                       parent_run_id=parent_run_id)
    m = corpus["manifest"]
    log_to_run(run_id, metrics={f"rows.{k}": v for k, v in m["rows"].items()} | {"rejected": m["rejected"]},
               json_files={"manifest.json": m})
    end_run(run_id)
    return corpus


def _count(corpus: dict, name: str, model: str, max_n: int, min_count: int, shards: int) -> tuple[dict, bool]:
    """The two tables, counted whole or as ``shards`` shard tasks (on the flow's task runner) and a merge."""
    if shards <= 1:
        return run_cached(build_ngram_tables, corpus, name, model, max_n, min_count)
    k = shard_count(corpus, shards)
    parts = map_cached(count_ngram_shard, [(corpus, name, model, max_n, i, k) for i in range(k)])
    return run_cached(merge_ngram_shards, corpus, name, model, max_n, min_count, parts)


@flow(name="tasc-ngrams", log_prints=True)
def ngrams_flow(spec: str, model: str = DEFAULT_MODEL, max_n: int = 8, min_count: int = 2,
                corpus: dict | None = None, parent_run_id: str | None = None, shards: int = 1) -> dict:
    """Text- and token-level n-gram tables; ``shards`` > 1 counts corpus shards as separate
    tasks (in parallel on a Dask task runner) and merges them into the same tables."""
    from tasc.data.spec import load_spec

    corpus = corpus or _corpus(spec)
    tables, hit = _count(corpus, load_spec(spec).name, model, max_n, min_count, shards)
    run_id = start_run(_experiment(spec), "ngrams", {"spec": spec, "model": model, "max_n": max_n,
                       "min_count": min_count, "shards": shards, "corpus_version": corpus["version"]},
                       parent_run_id=parent_run_id)
    log_to_run(run_id, metrics={"rows.text": tables["rows"]["text"], "rows.token": tables["rows"]["token"],
                                "corpus_tokens": tables["corpus_tokens"]},
               artifacts={"ngrams": tables["text"]})
    log_to_run(run_id, artifacts={"ngrams": tables["token"]})
    end_run(run_id)
    return {**tables, "cached": hit}


@flow(name="tasc-finetune", log_prints=True)
def finetune_flow(spec: str, model: str, max_steps: int | None = None, corpus: dict | None = None,
                  parent_run_id: str | None = None) -> dict:
    """Fine-tune a model folder (the chosen TASC-ft round's) on the train split; an
    interrupted run resumes from its newest checkpoint."""
    corpus = corpus or _corpus(spec)
    out = finetune_model(spec, corpus, model, max_steps)
    run_id = start_run(_experiment(spec), "finetune", {"spec": spec, "model": model, "max_steps": max_steps,
                       "corpus_version": corpus["version"]}, parent_run_id=parent_run_id)
    log_to_run(run_id, metrics={k: out[k] for k in ("steps", "resumed_from", "train_loss", "val_loss")})
    end_run(run_id)
    return out


@flow(name="tasc-draft", log_prints=True)
def draft_flow(spec: str, model: str = DEFAULT_MODEL, source: str = "auto", harvest_limit: int | None = 400,
               dtype: str = "auto", corpus: dict | None = None, parent_run_id: str | None = None) -> dict:
    """harvest (on-policy outputs) -> build draft. source: references | on-policy | both | auto."""
    corpus = corpus or _corpus(spec)
    harvest_file = None
    if source in ("on-policy", "both", "auto") and harvest_limit != 0:
        harvest_file = harvest_outputs(spec, corpus, model, harvest_limit, dtype)
    main, _ = run_cached(build_draft, spec, corpus, source, model, harvest_file)
    refs, _ = run_cached(build_draft, spec, corpus, "references", model, None)
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
    extra_models: method model folders, "tasc-ft" and "ft-only" (see tasc.eval.methods)."""
    corpus = corpus or _corpus(spec)
    names = [m.strip() for m in methods.split(",") if m.strip()]
    if drafts is None and any(n.startswith("tasc-spec") or n.endswith("+spec") for n in names):
        drafts = draft_flow(spec, model, "auto", harvest_limit, "auto", corpus, parent_run_id)
    if "tasc-ft+spec" in names and (extra_models or {}).get("tasc-ft") and "tasc-ft" not in (drafts or {}):
        # TASC-spec on the TASC-ft model drafts best from that model's own outputs.
        ft = draft_flow(spec, extra_models["tasc-ft"], "auto", harvest_limit, "auto", corpus, parent_run_id)
        drafts = {**(drafts or {}), "tasc-ft": ft["main"]}
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
