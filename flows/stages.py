"""One Prefect flow per stage: ingest, n-gram tables, fine-tune, draft (harvest -> build) and
benchmark.

Each stage flow does its work in its own MLflow run (nested under the pipeline's run when
there is one), which logs its parameters, metrics and artifacts and ends FAILED when the
stage fails. Deterministic steps are cached
(flows/resume.py), so a re-run after a failure resumes where it stopped."""

from __future__ import annotations

from prefect import flow

from flows.resume import map_cached, run_cached
from storage.reports import flat_bench_metrics
from tasc.eval.methods import needs_draft, needs_ft_draft, parse_methods
from tasc.models import DEFAULT_MODEL
from tasks.bench import run_bench
from tasks.corpus import build_ngram_tables, ingest_corpus
from tasks.draft import build_draft, harvest_outputs
from tasks.finetune import finetune_model
from tasks.ngram_shards import count_ngram_shard, merge_ngram_shards, shard_count
from tasks.tracking import tracked_run


def _experiment(spec: str) -> str:
    from tasc.data.spec import load_spec

    return f"tasc-{load_spec(spec).name}"


def _corpus(spec: str, policy: str | None = None, force: bool = False) -> dict:
    corpus, hit = run_cached(ingest_corpus, spec, policy, rebuild=force, force=force)
    # A cache hit did not even look at the files: the corpus was reused all the same.
    return {**corpus, "reused": True} if hit else corpus


@flow(name="tasc-ingest", log_prints=True)
def ingest_flow(spec: str, policy: str | None = None, parent_run_id: str | None = None,
                force: bool = False) -> dict:
    """The spec's corpus under ``policy`` (default: the spec's on_bad_rows), reused when
    unchanged and whole; ``force`` ingests again regardless."""
    from tasc.data.spec import bad_row_policy, load_spec

    bad_row_policy(load_spec(spec), policy)  # a bad policy fails before any cache is consulted
    with tracked_run(_experiment(spec), "ingest", {"spec": spec}, parent_run_id=parent_run_id) as run:
        corpus = _corpus(spec, policy, force)
        m = corpus["manifest"]
        run.log(params={"corpus_version": corpus["version"]}, json_files={"manifest.json": m},
                metrics={f"rows.{k}": v for k, v in m["rows"].items()} | {"rejected": m["rejected"]})
    return corpus


def _count(corpus: dict, name: str, model: str, max_n: int, min_count: int, shards: int,
           force: bool = False) -> tuple[dict, bool]:
    """The two tables, counted whole or as ``shards`` shard tasks (on the flow's task runner) and a merge."""
    if shards <= 1:
        return run_cached(build_ngram_tables, corpus, name, model, max_n, min_count, force=force)
    k = shard_count(corpus, shards)
    parts = map_cached(count_ngram_shard, [(corpus, name, model, max_n, i, k) for i in range(k)], force=force)
    return run_cached(merge_ngram_shards, corpus, name, model, max_n, min_count, parts, force=force)


@flow(name="tasc-ngrams", log_prints=True)
def ngrams_flow(spec: str, model: str = DEFAULT_MODEL, max_n: int = 8, min_count: int = 2,
                corpus: dict | None = None, parent_run_id: str | None = None, shards: int = 1,
                force: bool = False) -> dict:
    """Text- and token-level n-gram tables; ``shards`` > 1 counts corpus shards as separate
    tasks (in parallel on a Dask task runner) and merges them into the same tables; ``force``
    counts again regardless of the cache."""
    from tasc.data.spec import load_spec

    corpus = corpus or _corpus(spec)
    params = {"spec": spec, "model": model, "max_n": max_n, "min_count": min_count, "shards": shards,
              "corpus_version": corpus["version"]}
    with tracked_run(_experiment(spec), "ngrams", params, parent_run_id=parent_run_id) as run:
        tables, hit = _count(corpus, load_spec(spec).name, model, max_n, min_count, shards, force)
        run.log(metrics={"rows.text": tables["rows"]["text"], "rows.token": tables["rows"]["token"],
                         "corpus_tokens": tables["corpus_tokens"]},
                artifacts={"ngrams": [tables["text"], tables["token"]]})
    return {**tables, "cached": hit}


@flow(name="tasc-finetune", log_prints=True)
def finetune_flow(spec: str, model: str, max_steps: int | None = None, corpus: dict | None = None,
                  parent_run_id: str | None = None) -> dict:
    """Fine-tune a model folder (the chosen TASC-ft round's) on the train split; an
    interrupted run resumes from its newest checkpoint."""
    corpus = corpus or _corpus(spec)
    params = {"spec": spec, "model": model, "max_steps": max_steps, "corpus_version": corpus["version"]}
    with tracked_run(_experiment(spec), "finetune", params, parent_run_id=parent_run_id) as run:
        out = finetune_model(spec, corpus, model, max_steps)
        run.log_metrics({k: out[k] for k in ("steps", "resumed_from", "train_loss", "val_loss")})
    return out


@flow(name="tasc-draft", log_prints=True)
def draft_flow(spec: str, model: str = DEFAULT_MODEL, source: str = "auto", harvest_limit: int | None = 400,
               dtype: str = "auto", corpus: dict | None = None, parent_run_id: str | None = None,
               force: bool = False) -> dict:
    """harvest (on-policy outputs) -> build draft. source: references | on-policy | both | auto.
    ``force`` harvests and builds again regardless of what is stored."""
    corpus = corpus or _corpus(spec)
    params = {"spec": spec, "model": model, "source": source, "harvest_limit": harvest_limit,
              "corpus_version": corpus["version"]}
    with tracked_run(_experiment(spec), "draft", params, parent_run_id=parent_run_id) as run:
        harvest_file = None
        if source in ("on-policy", "both", "auto") and harvest_limit != 0:
            harvest_file = harvest_outputs(spec, corpus, model, harvest_limit, dtype, force=force)
        main, _ = run_cached(build_draft, spec, corpus, source, model, harvest_file, force=force)
        refs, _ = run_cached(build_draft, spec, corpus, "references", model, None, force=force)
        run.log_artifacts(main, "draft")
    return {"main": main, "references": refs}


@flow(name="tasc-bench", log_prints=True)
def bench_flow(spec: str, model: str = DEFAULT_MODEL, methods: str = "greedy,pld,tasc-spec", limit: int | None = 20,
               dtype: str = "auto", report: str | None = None, drafts: dict | None = None,
               harvest_limit: int | None = 400, corpus: dict | None = None,
               parent_run_id: str | None = None, extra_models: dict | None = None,
               threads: int | None = None) -> dict:
    """Benchmark methods side by side; builds or reuses the draft the speculative methods need.
    extra_models: method model folders, "tasc-ft" and "ft-only" (see tasc.eval.methods)."""
    corpus = corpus or _corpus(spec)
    names = parse_methods(methods)
    if drafts is None and any(needs_draft(n) for n in names):
        drafts = draft_flow(spec, model, "auto", harvest_limit, "auto", corpus, parent_run_id)
    ft_model = (extra_models or {}).get("tasc-ft")
    if ft_model and any(needs_ft_draft(n) for n in names) and "tasc-ft" not in (drafts or {}):
        # TASC-spec on the TASC-ft model drafts best from that model's own outputs.
        ft = draft_flow(spec, ft_model, "auto", harvest_limit, "auto", corpus, parent_run_id)
        drafts = {**(drafts or {}), "tasc-ft": ft["main"]}
    params = {"spec": spec, "model": model, "methods": methods, "limit": limit, "extra_models": extra_models,
              "threads": threads,
              "corpus_version": corpus["version"]}
    with tracked_run(_experiment(spec), "bench", params, parent_run_id=parent_run_id) as run:
        summary = run_bench(spec, corpus, model, names, limit, dtype, drafts, report, threads=threads,
                            extra_models=extra_models)
        paths = summary["paths"]
        # The dtype that ran ("auto" resolved), known only once the model is loaded.
        run.log(params={"dtype": summary["environment"]["dtype"]}, metrics=flat_bench_metrics(summary),
                artifacts={"report": [paths["json"], paths["markdown"], paths["chart"]]})
    summary["mlflow_run_id"] = run.run_id
    return summary
