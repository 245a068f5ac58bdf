"""Reading what Prefect recorded about a flow run and its subflows, through the real API."""

from __future__ import annotations


def task_states(flow_run_id) -> dict[str, list[str]]:
    """Task name -> state names of its runs, over the flow run and all its nested subflow runs."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterParentFlowRunId

    with get_client(sync_client=True) as client:
        ids, frontier = [flow_run_id], [flow_run_id]
        while frontier:
            kids = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=frontier)))
            frontier = [k.id for k in kids]
            ids += frontier
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)), limit=200)
    out: dict[str, list[str]] = {}
    for r in runs:
        # Task run names are "<task name>-<suffix>".
        out.setdefault(r.name.rsplit("-", 1)[0], []).append(r.state.name if r.state else "?")
    return out
