"""The end-to-end TASC pipeline as one Prefect flow.

ingest -> n-gram tables -> TASC-ft vocabulary rounds (subflow) -> fine-tune -> harvest ->
build draft -> benchmark -> register + promote, logged as one parent MLflow run with a
nested run per stage. With ``vocab_rounds=0`` the TASC-ft stages are skipped and TASC-spec
runs on the base model; otherwise the chosen round's model (fine-tuned further when
``finetune_max_steps`` > 0) is harvested, drafted, benchmarked against the base model's
greedy decoding and registered. With ``finetune_deployment`` the fine-tune stage runs on
another worker (flows/finetune_remote.py). Between tasks travel Parquet paths and model names
or folders, never pickled models. Deterministic steps are cached and fine-tuning resumes from
checkpoints, so a re-run after a failure picks up where it stopped (flows/resume.py)."""

# No `from __future__ import annotations` here: Prefect reads the real type of `params`.

import hashlib
import json

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flows.finetune_remote import finetune_on_deployment
from flows.params import PipelineParams
from flows.resume import stage_done
from flows.runners import default_shards, task_runner
from flows.stages import bench_flow, draft_flow, finetune_flow, ingest_flow, ngrams_flow
from flows.vocab import vocab_flow
from storage.settings import finetune_deployment
from tasc.eval.methods import registered_method
from tasks.models import fetch_model
from tasks.registry import promote_model, register_model
from tasks.tracking import find_previous_run, tracked_run

# Parameters that change how a run executes, not what it produces: not part of the run key.
# ``finetune_deployment`` is not one of them: the remote worker picks its own fine-tuning preset
# and device count (full fine-tuning on a GPU, one process per GPU, so a larger global batch),
# so it returns another model than the in-process stage. It enters the key as resolved
# (parameter, else TASC_FINETUNE_DEPLOYMENT), and only when a fine-tune stage runs.
EXECUTION_ONLY = {"force", "task_runner", "ngram_shards"}


def remote_finetune(params: PipelineParams) -> str | None:
    """The deployment that runs the fine-tune stage, or None: in the pipeline's process (also
    when there is no fine-tune stage)."""
    if not (params.tasc_ft.vocab_rounds and params.tasc_ft.finetune_max_steps):
        return None
    return params.scale_out.finetune_deployment or finetune_deployment()


def tasc_ft(params: PipelineParams, corpus: dict, run_id: str) -> dict:
    """Vocabulary rounds (subflow) then the fine-tune stage; {} when skipped or no round kept
    the task metric. ``model`` is the folder the later stages use."""
    ft = params.tasc_ft
    if ft.vocab_rounds == 0:
        return {}
    steps = None if ft.round_steps < 0 else ft.round_steps  # -1: the device's default
    vocab = vocab_flow(params.spec, params.model, ft.vocab_rounds, finetune=steps != 0, max_steps=steps or None,
                       tokens_per_round=ft.tokens_per_round, min_count=ft.vocab_min_count,
                       eval_prompts=ft.eval_prompts, ft_only=False, min_token_gain=ft.min_token_gain,
                       max_metric_drop=params.promotion.max_metric_drop, register_best=False, corpus=corpus,
                       parent_run_id=run_id)
    stage_done("vocab")
    if vocab["chosen"] == params.model:
        print("no vocabulary round kept the task metric: TASC-spec on the base model")
        return {}
    out = {"vocab": {k: vocab[k] for k in ("rounds", "chosen", "report", "mlflow_run_id")}, "model": vocab["chosen"]}
    deployment = remote_finetune(params)
    if deployment:  # on another worker (a GPU pool); inputs and result travel as MLflow artifacts
        out["finetune"] = finetune_on_deployment(deployment, params.spec, vocab["chosen"], ft.finetune_max_steps,
                                                 corpus, run_id)
    elif ft.finetune_max_steps:
        out["finetune"] = finetune_flow(params.spec, vocab["chosen"], ft.finetune_max_steps, corpus, run_id)
    if ft.finetune_max_steps:
        out["model"] = out["finetune"]["model_dir"]
        stage_done("finetune")
    return out


@flow(name="tasc-pipeline", log_prints=True)
def pipeline(params: PipelineParams = PipelineParams()) -> dict:
    """Make a small language model faster on one task: prepare the task's data, build the
    speculative-decoding draft (and, with TASC-ft, a model with a task vocabulary), benchmark
    it against plain decoding, and register it in MLflow, where it becomes the task's
    champion if it beats the current one."""
    from tasc.data.spec import load_spec

    spec = load_spec(params.spec)
    experiment = f"tasc-{spec.name}"
    flat = params.flat()  # the settings by their flat names, None where not set
    corpus = ingest_flow(params.spec, flat["policy"])
    stage_done("ingest")
    # Scheduled retraining is a no-op when the data and the configuration are unchanged.
    config = {k: v for k, v in flat.items() if k not in EXECUTION_ONLY | {"finetune_deployment"}}
    deployment = remote_finetune(params)
    if deployment:  # absent otherwise, so keys of runs without one stay as they were
        config["finetune_deployment"] = deployment
    run_key = hashlib.sha256(json.dumps([corpus["version"], config], sort_keys=True).encode()).hexdigest()[:16]
    previous = None if params.force else find_previous_run(experiment, run_key)
    if previous:
        print(f"data and config unchanged since MLflow run {previous}: nothing to do (force=True reruns)")
        return {"skipped": True, "previous_run_id": previous, "corpus": corpus}
    with tracked_run(experiment, "pipeline", {**flat, "finetune_deployment": deployment},
                     tags={"tasc.run_key": run_key}) as run:
        run_id = run.run_id
        fetch_model(params.model)
        ngrams = ngrams_flow.with_options(task_runner=task_runner(flat["task_runner"]))
        tables = ngrams(params.spec, params.model, params.max_n, corpus=corpus, parent_run_id=run_id,
                        shards=default_shards(flat["task_runner"], flat["ngram_shards"]))
        stage_done("ngrams")
        ft = tasc_ft(params, corpus, run_id)
        model = ft.get("model", params.model)
        drafts = draft_flow(params.spec, model, "auto", params.harvest_limit, "auto", corpus, run_id)
        stage_done("draft")
        # With TASC-ft the new model's methods run against the base model's greedy decoding.
        methods, extra = (params.tasc_ft.ft_methods, {"tasc-ft": model}) if ft else (params.methods, None)
        if ft:  # the draft above is already the TASC-ft model's own: bench binds it to its tokenizer
            drafts = {**drafts, "tasc-ft": drafts["main"]}
        summary = bench_flow(params.spec, params.model, methods, params.limit, params.dtype, drafts=drafts,
                             corpus=corpus, parent_run_id=run_id, extra_models=extra)
        stage_done("bench")
        promotion = None
        rule = params.promotion
        if rule.register_model:
            version = register_model(params.spec, run_id, model, drafts["main"], summary, corpus,
                                     method=registered_method(bool(ft)), dtype=params.dtype)
            promotion = promote_model(params.spec, version, rule.min_speedup, rule.max_metric_drop,
                                      rule.metric_floor)
        run.log(metrics={f"speedup.{k}": v for k, v in summary["speedup_vs_greedy"].items()},
                artifacts={"report": summary["paths"]["json"]})
    table = open(summary["paths"]["markdown"]).read()
    create_markdown_artifact(
        key=f"tasc-{spec.name}-bench".replace("_", "-").lower(),
        markdown=f"# tasc pipeline: {spec.name}\n\n{table}\n\nMLflow run: `{run_id}`\n\nPromotion: {promotion}\n",
        description="benchmark table",
    )
    return {"corpus": corpus, "ngrams": tables, "tasc_ft": ft, "model": model, "drafts": drafts, "bench": summary,
            "mlflow_run_id": run_id, "promotion": promotion}
