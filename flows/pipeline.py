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
from pydantic import BaseModel, Field

from flows.finetune_remote import finetune_on_deployment
from flows.resume import stage_done
from flows.runners import default_shards, task_runner
from flows.stages import bench_flow, draft_flow, finetune_flow, ingest_flow, ngrams_flow
from flows.vocab import vocab_flow
from storage.settings import finetune_deployment
from tasc.eval.methods import registered_method
from tasc.ft.select import TOKENS_PER_ROUND
from tasc.models import DEFAULT_MODEL
from tasks.models import fetch_model
from tasks.registry import promote_model, register_model
from tasks.tracking import find_previous_run, tracked_run

# Parameters that change how a run executes, not what it produces: not part of the run key.
# ``finetune_deployment`` is not one of them: the remote worker picks its own fine-tuning preset
# and device count (full fine-tuning on a GPU, one process per GPU, so a larger global batch),
# so it returns another model than the in-process stage. It enters the key as resolved
# (parameter, else TASC_FINETUNE_DEPLOYMENT), and only when a fine-tune stage runs.
EXECUTION_ONLY = {"force", "task_runner", "ngram_shards"}


class PipelineParams(BaseModel):
    """Parameters of a pipeline run (the Prefect UI renders them as a form)."""

    spec: str = Field("snips", description="task spec: a shipped name (snips, mbpp, squad, nq-open) or a YAML path")
    model: str = Field(DEFAULT_MODEL, description="short name, local folder, Hugging Face id")
    methods: str = Field("greedy,pld,tasc-spec,tasc-spec-ref", description="benchmark methods, comma-separated")
    limit: int = Field(8, ge=1, description="test prompts to benchmark")
    harvest_limit: int = Field(32, ge=0, description="train prompts to harvest on-policy outputs from (0: references only)")
    dtype: str = Field("auto", description="auto | float32 | bfloat16")
    max_n: int = Field(8, ge=1, le=16, description="longest n-gram counted")
    policy: str | None = Field(None, description="bad-row policy override: fail | skip")
    vocab_rounds: int = Field(0, ge=0, description="TASC-ft vocabulary-expansion rounds (0: skip TASC-ft)")
    round_steps: int | None = Field(None, ge=0, description="fine-tuning steps in each round (None: the device "
                                    "default, 0: expansion only)")
    finetune_max_steps: int = Field(0, ge=0, description="fine-tuning steps of the chosen round's model after the "
                                    "rounds (0: none); resumes from its last checkpoint")
    tokens_per_round: int = Field(TOKENS_PER_ROUND, ge=1, description="new tokens per round at most")
    vocab_min_count: int = Field(5, ge=1, description="occurrences a new token needs")
    eval_prompts: int = Field(8, ge=0, description="validation prompts generated per round for the task metric")
    min_token_gain: float = Field(0.02, description="rounds stop when one saves less than this fraction of tokens")
    ft_methods: str = Field("greedy,tasc-ft,tasc-ft+spec", description="benchmark methods with TASC-ft")
    register_model: bool = Field(True, description="register the model in MLflow and run the promotion rule")
    min_speedup: float = Field(1.05, description="promotion: chars/s over the champion at least this")
    max_metric_drop: float = Field(0.01, description="promotion (and round choice): task metric may drop at most this")
    metric_floor: float = Field(0.0, description="promotion: lowest metric a first champion needs (0: no floor)")
    task_runner: str | None = Field(None, description="thread | dask (default: TASC_TASK_RUNNER, else thread)")
    ngram_shards: int | None = Field(None, ge=1, description="corpus shards counted as separate tasks (default: "
                                     "TASC_NGRAM_SHARDS, else 1, or one per Dask worker)")
    finetune_deployment: str | None = Field(None, description="fine-tune the chosen round's model on this Prefect "
                                            "deployment, e.g. tasc-finetune-remote/gpu (default: "
                                            "TASC_FINETUNE_DEPLOYMENT, else in this process)")
    force: bool = Field(False, description="run even when data and config are unchanged since a finished run")


def remote_finetune(params: PipelineParams) -> str | None:
    """The deployment that runs the fine-tune stage, or None: in the pipeline's process (also
    when there is no fine-tune stage)."""
    if not (params.vocab_rounds and params.finetune_max_steps):
        return None
    return params.finetune_deployment or finetune_deployment()


def tasc_ft(params: PipelineParams, corpus: dict, run_id: str) -> dict:
    """Vocabulary rounds (subflow) then the fine-tune stage; {} when skipped or no round kept
    the task metric. ``model`` is the folder the later stages use."""
    if params.vocab_rounds == 0:
        return {}
    vocab = vocab_flow(params.spec, params.model, params.vocab_rounds, finetune=params.round_steps != 0,
                       max_steps=params.round_steps or None, tokens_per_round=params.tokens_per_round,
                       min_count=params.vocab_min_count, eval_prompts=params.eval_prompts, ft_only=False,
                       min_token_gain=params.min_token_gain, max_metric_drop=params.max_metric_drop,
                       register_best=False, corpus=corpus, parent_run_id=run_id)
    stage_done("vocab")
    if vocab["chosen"] == params.model:
        print("no vocabulary round kept the task metric: TASC-spec on the base model")
        return {}
    out = {"vocab": {k: vocab[k] for k in ("rounds", "chosen", "report", "mlflow_run_id")}, "model": vocab["chosen"]}
    deployment = remote_finetune(params)
    if deployment:  # on another worker (a GPU pool); inputs and result travel as MLflow artifacts
        out["finetune"] = finetune_on_deployment(deployment, params.spec, vocab["chosen"], params.finetune_max_steps,
                                                 corpus, run_id)
    elif params.finetune_max_steps:
        out["finetune"] = finetune_flow(params.spec, vocab["chosen"], params.finetune_max_steps, corpus, run_id)
    if params.finetune_max_steps:
        out["model"] = out["finetune"]["model_dir"]
        stage_done("finetune")
    return out


@flow(name="tasc-pipeline", log_prints=True)
def pipeline(params: PipelineParams = PipelineParams()) -> dict:
    from tasc.data.spec import load_spec

    spec = load_spec(params.spec)
    experiment = f"tasc-{spec.name}"
    corpus = ingest_flow(params.spec, params.policy)
    stage_done("ingest")
    # Scheduled retraining is a no-op when the data and the configuration are unchanged.
    config = params.model_dump(exclude=EXECUTION_ONLY | {"finetune_deployment"})
    deployment = remote_finetune(params)
    if deployment:  # absent otherwise, so keys of runs without one stay as they were
        config["finetune_deployment"] = deployment
    run_key = hashlib.sha256(json.dumps([corpus["version"], config], sort_keys=True).encode()).hexdigest()[:16]
    previous = None if params.force else find_previous_run(experiment, run_key)
    if previous:
        print(f"data and config unchanged since MLflow run {previous}: nothing to do (force=True reruns)")
        return {"skipped": True, "previous_run_id": previous, "corpus": corpus}
    with tracked_run(experiment, "pipeline", {**params.model_dump(), "finetune_deployment": deployment},
                     tags={"tasc.run_key": run_key}) as run:
        run_id = run.run_id
        fetch_model(params.model)
        ngrams = ngrams_flow.with_options(task_runner=task_runner(params.task_runner))
        tables = ngrams(params.spec, params.model, params.max_n, corpus=corpus, parent_run_id=run_id,
                        shards=default_shards(params.task_runner, params.ngram_shards))
        stage_done("ngrams")
        ft = tasc_ft(params, corpus, run_id)
        model = ft.get("model", params.model)
        drafts = draft_flow(params.spec, model, "auto", params.harvest_limit, "auto", corpus, run_id)
        stage_done("draft")
        # With TASC-ft the new model's methods run against the base model's greedy decoding.
        methods, extra = (params.ft_methods, {"tasc-ft": model}) if ft else (params.methods, None)
        if ft:  # the draft above is already the TASC-ft model's own: bench binds it to its tokenizer
            drafts = {**drafts, "tasc-ft": drafts["main"]}
        summary = bench_flow(params.spec, params.model, methods, params.limit, params.dtype, drafts=drafts,
                             corpus=corpus, parent_run_id=run_id, extra_models=extra)
        stage_done("bench")
        promotion = None
        if params.register_model:
            version = register_model(params.spec, run_id, model, drafts["main"], summary, corpus,
                                     method=registered_method(bool(ft)), dtype=params.dtype)
            promotion = promote_model(params.spec, version, params.min_speedup, params.max_metric_drop,
                                      params.metric_floor)
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
