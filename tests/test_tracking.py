"""tracked_run (storage/tracking.py): the run ends FINISHED or FAILED however its body ends,
read back through the MLflow client on the session's SQLite store; and its Prefect-task
form (tasks/tracking.py) in a flow, with logging from a worker thread."""

from __future__ import annotations

import pytest

EXPERIMENT = "tasc-tracking-test"


class Boom(RuntimeError):
    pass


def test_a_run_that_raises_is_failed_and_the_error_propagates():
    from storage.tracking import client, tracked_run

    with pytest.raises(Boom, match="stage broke"), tracked_run(EXPERIMENT, "breaks", {"p": 1}) as run:
        run.log_metrics({"before": 1.0})
        raise Boom("stage broke")
    got = client().get_run(run.run_id)
    assert got.info.status == "FAILED"
    assert got.data.metrics == {"before": 1.0} and got.data.params == {"p": "1"}


def test_a_run_that_completes_is_finished_with_what_it_logged(tmp_path):
    from storage.tracking import client, experiment_id, tracked_run

    report = tmp_path / "report.md"
    report.write_text("| a |")
    parent = client().create_run(experiment_id(EXPERIMENT)).info.run_id
    with tracked_run(EXPERIMENT, "works", {"model": "tiny"}, tags={"k": "v"}, parent_run_id=parent) as run:
        assert client().get_run(run.run_id).info.status == "RUNNING"
        # Method names become valid metric names; None and NaN are skipped.
        run.log(metrics={"tasc-ft+spec@max_len=24.chars_per_s": 12.5, "none": None, "nan": float("nan")},
                params={"dtype": "float32"}, artifacts={"report": [report]}, json_files={"doc.json": {"a": 1}})
    got = client().get_run(run.run_id)
    assert got.info.status == "FINISHED" and got.info.run_name == "works"
    assert got.data.metrics == {"tasc-ft_plus_spec_max_len_24.chars_per_s": 12.5}
    assert got.data.params == {"model": "tiny", "dtype": "float32"}
    assert got.data.tags["k"] == "v" and got.data.tags["mlflow.parentRunId"] == parent
    assert {a.path for a in client().list_artifacts(run.run_id)} == {"report", "doc.json"}
    assert [a.path for a in client().list_artifacts(run.run_id, "report")] == ["report/report.md"]


def test_a_resumed_run_is_reopened_and_keeps_its_params():
    from storage.tracking import client, experiment_id, tracked_run

    with pytest.raises(Boom), tracked_run(EXPERIMENT, "handoff", {"spec": "snips"}) as first:
        raise Boom
    assert client().get_run(first.run_id).info.status == "FAILED"
    parent = client().create_run(experiment_id(EXPERIMENT)).info.run_id
    # Other param values (a spec named by path, say) must not be logged over the first ones.
    with tracked_run(EXPERIMENT, "handoff", {"spec": "specs/snips.yaml"}, parent_run_id=parent,
                     resume_run_id=first.run_id) as again:
        assert again.run_id == first.run_id
        assert client().get_run(first.run_id).info.status == "RUNNING"
        again.log_metrics({"steps": 4})
    got = client().get_run(first.run_id)
    assert got.info.status == "FINISHED" and got.data.metrics == {"steps": 4.0}
    assert got.data.params == {"spec": "snips"} and got.data.tags["mlflow.parentRunId"] == parent


def test_the_body_error_wins_over_a_failure_to_end_the_run():
    from storage.tracking import RunSteps, tracked_run

    def end(run_id, status):
        raise ConnectionError("tracking server away")

    steps = RunSteps(start=lambda *a: "run-1", end=end)
    with pytest.raises(Boom), tracked_run(EXPERIMENT, "x", steps=steps):
        raise Boom


def test_flow_runs_as_tasks_end_failed_or_finished(prefect_harness):
    from prefect import flow, task

    from storage.tracking import client, experiment_id
    from tasks.tracking import run_log, tracked_run

    @task
    def work(run_id: str) -> None:  # in a worker thread: the run is addressed by its id
        run_log(run_id).log_metrics({"from_task": 2.0})

    @flow
    def stage(fail: bool) -> str:
        with tracked_run(EXPERIMENT, "stage", {"fail": fail}) as run:
            work.submit(run.run_id).result()
            if fail:
                raise Boom("stage failed")
        return run.run_id

    run_id = stage(False)
    got = client().get_run(run_id)
    assert got.info.status == "FINISHED" and got.data.metrics == {"from_task": 2.0}
    state = stage(True, return_state=True)
    assert state.is_failed()
    last = client().search_runs([experiment_id(EXPERIMENT)], filter_string="params.fail = 'True'",
                                max_results=1)[0]
    assert last.info.status == "FAILED" and last.data.metrics == {"from_task": 2.0}
