"""The Prefect flows end to end on a tiny model, with real MLflow (temp SQLite) and a real
Prefect test harness."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

# Every test here shares one end-to-end pipeline run (the session fixture ``pipeline_result``).
pytestmark = pytest.mark.slow


def test_pipeline_writes_corpus_tables_draft_and_report(pipeline_result):
    out = pipeline_result
    corpus = Path(out["corpus"]["path"])
    assert (corpus / "corpus.parquet").exists() and (corpus / "rejected.parquet").exists()
    assert Path(out["ngrams"]["text"]).exists() and Path(out["ngrams"]["token"]).exists()
    assert Path(out["drafts"]["main"]).name.startswith("on-policy")
    report = json.loads(Path(out["bench"]["paths"]["json"]).read_text())
    assert set(report["methods"]) == {"greedy", "pld", "tasc-spec", "tasc-spec-ref"}
    assert report["speedup_vs_greedy"]["greedy"] == pytest.approx(1.0)
    # Greedy speculative decoding is lossless in fp32.
    assert report["methods"]["tasc-spec"]["identical_to_greedy"] == 1.0
    assert report["environment"]["dtype"] == "float32"
    assert Path(out["bench"]["paths"]["chart"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pipeline_logs_to_mlflow(pipeline_result):
    from storage.tracking import client

    c = client()
    parent = c.get_run(pipeline_result["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    assert "speedup.tasc-spec" in parent.data.metrics
    children = c.search_runs([parent.info.experiment_id],
                             filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    names = {r.info.run_name for r in children}
    assert {"ngrams", "draft", "bench"} <= names
    bench = next(r for r in children if r.info.run_name == "bench")
    assert bench.data.metrics["tasc-spec.identical_to_greedy"] == 1.0
    arts = {a.path for a in c.list_artifacts(bench.info.run_id, "report")}
    assert {"report/report.json", "report/report.md", "report/report.png"} <= arts


def test_reingest_is_a_noop(pipeline_result, prefect_harness):
    from flows.stages import ingest_flow

    again = ingest_flow("prompt-completion")
    assert again["reused"] is True
    assert again["version"] == pipeline_result["corpus"]["version"]


def test_unchanged_rerun_is_skipped(pipeline_result, prefect_harness, tiny_model_dir):
    from flows.pipeline import pipeline

    again = pipeline(pipeline_result["params"])
    assert again["skipped"] is True
    assert again["previous_run_id"] == pipeline_result["mlflow_run_id"]


def _mtimes(*paths) -> list[int]:
    return [Path(p).stat().st_mtime_ns for p in paths]


def test_second_run_hits_the_cache(pipeline_result, prefect_harness):
    """The deterministic steps do not execute again: Prefect reports them Cached and their
    files are not rewritten."""
    from flows.stages import draft_flow, ngrams_flow
    from tests.prefect_runs import task_states

    out, params = pipeline_result, pipeline_result["params"]
    files = [out["ngrams"]["text"], out["ngrams"]["token"], out["drafts"]["main"], out["drafts"]["references"]]
    before = _mtimes(*files)
    state = ngrams_flow(params.spec, params.model, params.max_n, corpus=out["corpus"], return_state=True)
    tables = state.result()
    assert tables["cached"] is True and tables["text"] == out["ngrams"]["text"]
    assert task_states(state.state_details.flow_run_id)["ngram-tables"] == ["Cached"]
    state = draft_flow(params.spec, params.model, "auto", params.harvest_limit, "auto", out["corpus"],
                       return_state=True)
    assert state.result() == out["drafts"]
    assert task_states(state.state_details.flow_run_id)["build-draft"] == ["Cached", "Cached"]
    assert _mtimes(*files) == before


def test_cache_hit_whose_files_are_gone_is_recomputed(pipeline_result, prefect_harness):
    from flows.stages import ngrams_flow

    out, params = pipeline_result, pipeline_result["params"]
    text = Path(out["ngrams"]["text"])
    expected = text.read_bytes()
    text.unlink()
    tables = ngrams_flow(params.spec, params.model, params.max_n, corpus=out["corpus"])
    assert tables["cached"] is False and tables["text"] == str(text)
    assert text.read_bytes() == expected  # deterministic: the same table again


def test_fail_at_hook_fails_after_the_named_stage(pipeline_result, prefect_harness, monkeypatch):
    from flows.pipeline import pipeline
    from flows.resume import InjectedFailure
    from storage.tracking import client

    monkeypatch.setenv("TASC_FAIL_AT", "ngrams")
    params = pipeline_result["params"].model_copy(update={"force": True})
    state = pipeline(params, return_state=True)
    assert state.is_failed()
    with pytest.raises(InjectedFailure, match="after stage 'ngrams'"):
        state.result()
    c = client()
    exp = c.get_experiment_by_name("tasc-prompt-completion")
    last = c.search_runs([exp.experiment_id], filter_string="tags.mlflow.runName = 'pipeline'",
                         order_by=["attributes.start_time DESC"], max_results=1)[0]
    assert last.info.status == "FAILED"  # the pipeline's MLflow run is closed as failed
