"""The end-to-end TASC pipeline as one Prefect flow.

ingest -> n-gram tables -> harvest -> draft -> benchmark, logged as one parent MLflow run
with a nested run per stage. Between tasks travel Parquet paths and model names/URIs,
never pickled models."""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel, Field

from flows.stages import DEFAULT_MODEL, bench_flow, draft_flow, ingest_flow, ngrams_flow
from tasks.tracking import end_run, log_to_run, start_run


class PipelineParams(BaseModel):
    """Parameters of a pipeline run (the Prefect UI renders them as a form)."""

    spec: str = Field("snips", description="task spec: a shipped name (snips, mbpp, squad, nq-open) or a YAML path")
    model: str = Field(DEFAULT_MODEL, description="short name, local folder, Hugging Face id")
    methods: str = Field("greedy,pld,tasc-spec,tasc-spec-ref", description="benchmark methods, comma-separated")
    limit: int = Field(12, ge=1, description="test prompts to benchmark")
    harvest_limit: int = Field(96, ge=0, description="train prompts to harvest on-policy outputs from (0: references only)")
    dtype: str = Field("auto", description="auto | float32 | bfloat16")
    max_n: int = Field(8, ge=1, le=16, description="longest n-gram counted")
    policy: str | None = Field(None, description="bad-row policy override: fail | skip")


@flow(name="tasc-pipeline", log_prints=True)
def pipeline(params: PipelineParams = PipelineParams()) -> dict:
    from tasc.spec import load_spec

    spec = load_spec(params.spec)
    run_id = start_run(f"tasc-{spec.name}", "pipeline", params.model_dump())
    try:
        corpus = ingest_flow(params.spec, params.policy, parent_run_id=run_id)
        tables = ngrams_flow(params.spec, params.model, params.max_n, corpus=corpus, parent_run_id=run_id)
        drafts = draft_flow(params.spec, params.model, "auto", params.harvest_limit, "auto", corpus, run_id)
        summary = bench_flow(params.spec, params.model, params.methods, params.limit, params.dtype, drafts=drafts,
                             corpus=corpus, parent_run_id=run_id)
    except BaseException:
        end_run(run_id, "FAILED")
        raise
    log_to_run(run_id, metrics={f"speedup.{k}": v for k, v in summary["speedup_vs_greedy"].items()},
               artifacts={"report": summary["paths"]["json"]})
    end_run(run_id)
    table = open(summary["paths"]["markdown"]).read()
    create_markdown_artifact(
        key=f"tasc-{spec.name}-bench".replace("_", "-").lower(),
        markdown=f"# tasc pipeline: {spec.name}\n\n{table}\n\nMLflow run: `{run_id}`\n",
        description="benchmark table",
    )
    return {"corpus": corpus, "ngrams": tables, "drafts": drafts, "bench": summary, "mlflow_run_id": run_id}
