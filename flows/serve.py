"""The simplest single-machine setup: serve the pipeline from one long-running process.

``python -m flows.serve`` (or ``tasc serve``) registers two deployments with the Prefect
API it is pointed at (``PREFECT_API_URL``; start one with ``prefect server start``): a
nightly retraining schedule and an on-demand deployment for runs triggered from the UI.
"""

from __future__ import annotations

from prefect import serve

from flows.pipeline import PipelineParams, pipeline


def serve_pipeline(spec: str = "snips", cron: str | None = "0 3 * * *") -> None:
    params = PipelineParams(spec=spec).model_dump()
    nightly = pipeline.to_deployment(name=f"{spec}-nightly", cron=cron, parameters={"params": params},
                                     description="scheduled retraining; a no-op when data and config are unchanged")
    on_demand = pipeline.to_deployment(name=f"{spec}-on-demand", parameters={"params": params},
                                       description="trigger from the UI with your own parameters")
    serve(nightly, on_demand)


if __name__ == "__main__":
    serve_pipeline()
