"""The TASC-ft flow: vocabulary-expansion rounds (each one nested MLflow run), stopping at a
plateau, then the ft-only baseline and a JSON report.

Round 0 is the base model (validation tokens and, when generation is on, the task metric);
round i starts from round i-1's saved model. The chosen round is the last one whose task
metric stayed within ``max_metric_drop`` of the base (the last round when no metric is
measured; tasc.ft.rounds.choose_round)."""

from __future__ import annotations

from prefect import flow

from flows.resume import run_cached
from flows.stages import _corpus, _experiment, bench_flow
from storage import vocab_store
from tasc import progress_bar
from tasc.ft.rounds import choose_round
from tasc.ft.select import TOKENS_PER_ROUND
from tasc.models import DEFAULT_MODEL
from tasks.draft import build_draft
from tasks.registry import register_model
from tasks.tracking import tracked_run
from tasks.vocab import ft_only_baseline, vocab_baseline, vocab_round

ROUND_METRICS = ("token_reduction", "val_loss", "added_tokens", "added_params", "added_params_pct",
                 "tokens_per_completion", "tokens_per_completion_before", "round_trip_failures", "metric",
                 "finetune_steps", "train_loss")
REPORT_KEYS = ("round", "added_tokens", "token_reduction", "round_trip_exact", "val_loss", "metric",
               "tokens_per_completion", "tokens_per_completion_base", "added_params", "added_params_pct",
               "finetune_steps", "model_dir", "selection", "tokens")


def _log_round(experiment: str, summary: dict, parent_run_id: str) -> str:
    params = {"round": summary["round"], **summary["settings"]}
    metrics = {k: summary.get(k) for k in ROUND_METRICS} | {"round_trip_exact": float(summary["round_trip_exact"])}
    with tracked_run(experiment, f"vocab-round-{summary['round']}", params, parent_run_id=parent_run_id) as run:
        run.log(metrics=metrics, artifacts={"round": [summary["selection"], summary["round_json"]],
                                            "tokenizer": vocab_store.tokenizer_files(summary["model_dir"])})
    return run.run_id


def _plateau_entry(summary: dict) -> dict:
    return {"tokens": summary["tokens"], "metric": summary["metric"] if summary["metric"] is not None else 0.0}


@flow(name="tasc-vocab-rounds", log_prints=True)
def vocab_rounds_flow(spec: str, corpus: dict, model: str, rounds: int, settings: dict, eval_prompts: int = 8,
                      min_token_gain: float = 0.02, max_metric_drop: float = 0.01, dtype: str = "float32",
                      parent_run_id: str | None = None) -> dict:
    """Round 0 (the base) and rounds 1..``rounds`` until ``plateau``; returns base and rounds."""
    from tasc.ft.rounds import plateau

    experiment = _experiment(spec)
    base = vocab_baseline(spec, corpus, model, eval_prompts, dtype)
    done, current = [], model
    # A round takes minutes to hours (fine-tuning); the bar's ETA is for the rounds left, a
    # plateau ends it early.
    with progress_bar(rounds, desc="vocab rounds", unit="round") as bar:
        for i in range(1, rounds + 1):
            s = vocab_round(spec, corpus, model, current, i, settings, eval_prompts, dtype)
            s["mlflow_run_id"] = _log_round(experiment, s, parent_run_id) if parent_run_id else None
            done.append(s)
            current = s["model_dir"]
            bar.set_postfix(token_reduction=f"{s['token_reduction']:.3f}", refresh=False)
            bar.update()
            if plateau([_plateau_entry(x) for x in [base, *done]], min_token_gain, max_metric_drop):
                print(f"plateau after round {i}: stopping")
                break
    return {"base": base, "rounds": done}


def register_chosen(spec: str, corpus: dict, chosen: str, run_id: str, limit: int, dtype: str) -> dict:
    """Benchmark the chosen model (greedy vs TASC-spec with the references draft bound to its
    own tokenizer) and register it as the new challenger with that scorecard."""
    draft, _ = run_cached(build_draft, spec, corpus, "references", None, None)
    bench = bench_flow(spec, chosen, "greedy,tasc-spec", limit, dtype, drafts={"main": draft, "references": draft},
                       corpus=corpus, parent_run_id=run_id)
    version = register_model(spec, run_id, chosen, draft, bench, corpus, dtype=dtype)
    return {"version": version, "speedup_vs_greedy": bench["speedup_vs_greedy"], "report": bench["paths"]["json"]}


@flow(name="tasc-vocab", log_prints=True)
def vocab_flow(spec: str, model: str = DEFAULT_MODEL, rounds: int = 3, finetune: bool = True,
               max_steps: int | None = None, tokens_per_round: int = TOKENS_PER_ROUND, min_count: int = 5,
               eval_prompts: int = 8, ft_only: bool | None = None, report: str | None = None,
               min_token_gain: float = 0.02, max_metric_drop: float = 0.01, dtype: str = "float32",
               register_best: bool = True, register_limit: int = 8, corpus: dict | None = None,
               parent_run_id: str | None = None) -> dict:
    """TASC-ft rounds (and the ft-only baseline when fine-tuning, unless ``ft_only=False``).
    With fine-tuning and ``register_best``, the chosen round's model is benchmarked on
    ``register_limit`` test prompts and registered (challenger). Returns ``{"rounds",
    "chosen" (model folder), "report" (JSON path), "registered", ...}``."""
    corpus = corpus or _corpus(spec)
    settings = {"finetune": finetune, "max_steps": max_steps, "tokens_per_round": tokens_per_round,
                "min_count": min_count}
    experiment = _experiment(spec)
    params = {"spec": spec, "model": model, "rounds": rounds, **settings, "eval_prompts": eval_prompts,
              "corpus_version": corpus["version"]}
    with tracked_run(experiment, "vocab", params, parent_run_id=parent_run_id) as run:
        out = vocab_rounds_flow(spec, corpus, model, rounds, settings, eval_prompts, min_token_gain,
                                max_metric_drop, dtype, run.run_id)
        ft = ft_only_baseline(spec, corpus, model, settings, dtype) if finetune and ft_only is not False else None
        chosen = choose_round(out["base"], out["rounds"], max_metric_drop)
        registered = None
        if finetune and register_best and chosen:
            registered = register_chosen(spec, corpus, chosen["model_dir"], run.run_id, register_limit, dtype)
        doc = {"spec": spec, "model": model, "corpus_version": corpus["version"], "settings": settings,
               "base": out["base"], "rounds": [{k: r.get(k) for k in REPORT_KEYS} for r in out["rounds"]],
               "chosen_round": chosen["round"] if chosen else 0, "chosen": chosen["model_dir"] if chosen else model,
               "ft_only": ft, "registered": registered}
        from tasc.data.spec import load_spec

        path = vocab_store.write_json(doc, vocab_store.report_path(load_spec(spec).name, corpus["version"]))
        if report:
            vocab_store.write_json(doc, report)
        best = chosen or {}
        run.log(metrics={"rounds_run": len(out["rounds"]), "chosen_round": doc["chosen_round"],
                         "token_reduction": best.get("token_reduction"), "val_loss": best.get("val_loss"),
                         "ft_only.val_loss": (ft or {}).get("val_loss")},
                artifacts={"report": str(path)})
    return {"rounds": doc["rounds"], "chosen": doc["chosen"], "report": str(report or path), "base": out["base"],
            "ft_only": ft, "registered": registered, "mlflow_run_id": run.run_id}
