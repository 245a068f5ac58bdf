"""The simplest single-machine setup: serve the pipeline from one long-running process.

``python -m flows.serve`` (or ``tasc serve``) registers two deployments with the Prefect
API it is pointed at (``PREFECT_API_URL``; start one with ``prefect server start``): a
nightly retraining schedule and an on-demand deployment for runs triggered from the UI.
"""

from __future__ import annotations

from prefect import serve
from prefect.schedules import Cron

from flows.pipeline import PipelineParams, pipeline


def serve_pipeline(spec: str = "snips", cron: str | None = "0 3 * * *") -> None:
    """Serve ``<spec>-nightly`` (on ``cron``, read in UTC) and ``<spec>-on-demand`` until stopped.
    The serving process runs the flow runs itself, so these deployments need no worker: they
    are Ready while it runs and Not Ready once it stops."""
    params = PipelineParams(spec=spec).model_dump()
    served = ("Served by `tasc serve` (or `python -m flows.serve`): ready while that process runs, "
              "Not Ready once it stops; no worker or work pool is involved.")
    when = f"Runs on the cron `{cron}`, time zone UTC. " if cron else ""
    nightly = pipeline.to_deployment(
        name=f"{spec}-nightly", schedule=Cron(cron, timezone="UTC") if cron else None, parameters={"params": params},
        description=f"Scheduled retraining of `{spec}` over its current data. {when}Does nothing when the data and "
                    f"the settings are unchanged since a finished run; the new model becomes champion only if it "
                    f"wins the promotion rule.\n\n{served}")
    on_demand = pipeline.to_deployment(
        name=f"{spec}-on-demand", parameters={"params": params},
        description=f"A run of the pipeline with your own settings: Run > Custom run, then fill in the form "
                    f"(the TASC-ft, promotion and scale-out groups can mostly stay as they are).\n\n{served}")
    serve(nightly, on_demand)


if __name__ == "__main__":
    serve_pipeline()
