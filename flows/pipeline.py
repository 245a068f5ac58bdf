"""The end-to-end TASC pipeline as one Prefect flow.

ingest -> n-gram tables -> harvest -> draft -> benchmark, logged as one parent MLflow run
with a nested run per stage. Between tasks travel Parquet paths and model names/URIs,
never pickled models."""


import hashlib
import json

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel, Field

from flows.stages import DEFAULT_MODEL, bench_flow, draft_flow, ingest_flow, ngrams_flow
from tasks.registry import promote_model, register_model
from tasks.tracking import end_run, find_previous_run, log_to_run, start_run


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
    register_model: bool = Field(True, description="register the model in MLflow and run the promotion rule")
    min_speedup: float = Field(1.05, description="promotion: chars/s over the champion at least this")
    max_metric_drop: float = Field(0.01, description="promotion: task metric may drop at most this (absolute)")
    force: bool = Field(False, description="run even when data and config are unchanged since a finished run")


@flow(name="tasc-pipeline", log_prints=True)
def pipeline(params: PipelineParams = PipelineParams()) -> dict:
    from tasc.spec import load_spec

    spec = load_spec(params.spec)
    experiment = f"tasc-{spec.name}"
    corpus = ingest_flow(params.spec, params.policy)
    # Scheduled retraining is a no-op when the data and the configuration are unchanged.
    config = params.model_dump(exclude={"force"})
    run_key = hashlib.sha256(json.dumps([corpus["version"], config], sort_keys=True).encode()).hexdigest()[:16]
    previous = None if params.force else find_previous_run(experiment, run_key)
    if previous:
        print(f"data and config unchanged since MLflow run {previous}: nothing to do (force=True reruns)")
        return {"skipped": True, "previous_run_id": previous, "corpus": corpus}
    run_id = start_run(experiment, "pipeline", params.model_dump(), tags={"tasc.run_key": run_key})
    try:
        tables = ngrams_flow(params.spec, params.model, params.max_n, corpus=corpus, parent_run_id=run_id)
        drafts = draft_flow(params.spec, params.model, "auto", params.harvest_limit, "auto", corpus, run_id)
        summary = bench_flow(params.spec, params.model, params.methods, params.limit, params.dtype, drafts=drafts,
                             corpus=corpus, parent_run_id=run_id)
        promotion = None
        if params.register_model:
            version = register_model(params.spec, run_id, params.model, drafts["main"], summary, corpus,
                                     dtype=params.dtype)
            promotion = promote_model(params.spec, version, params.min_speedup, params.max_metric_drop)
    except BaseException:
        end_run(run_id, "FAILED")
        raise
    log_to_run(run_id, metrics={f"speedup.{k}": v for k, v in summary["speedup_vs_greedy"].items()},
               artifacts={"report": summary["paths"]["json"]})
    end_run(run_id)
    table = open(summary["paths"]["markdown"]).read()
    create_markdown_artifact(
        key=f"tasc-{spec.name}-bench".replace("_", "-").lower(),
        markdown=f"# tasc pipeline: {spec.name}\n\n{table}\n\nMLflow run: `{run_id}`\n\nPromotion: {promotion}\n",
        description="benchmark table",
    )
    return {"corpus": corpus, "ngrams": tables, "drafts": drafts, "bench": summary, "mlflow_run_id": run_id,
            "promotion": promotion}
