"""The Prefect flows end to end on a tiny model, with real MLflow (temp SQLite) and a real
Prefect test harness."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


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
