"""The MLflow hand-off of fine-tuning inputs and outputs (storage/handoff.py), on the session's
SQLite tracking store and local artifact root."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def _files(folder: Path) -> dict[str, bytes]:
    return {f.relative_to(folder).as_posix(): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


def test_folder_and_file_round_trip(tmp_path):
    from storage import handoff
    from storage.tracking import client, experiment_id

    rid = client().create_run(experiment_id("tasc-handoff-test")).info.run_id
    src = tmp_path / "model"
    (src / "sub").mkdir(parents=True)
    (src / "model.safetensors").write_bytes(os.urandom(200_000))
    (src / "config.json").write_text('{"vocab_size": 803}')
    (src / "sub" / "tokenizer.json").write_text("{}")

    assert not handoff.uploaded(rid, src, handoff.INPUT_MODEL)
    uri = handoff.upload(rid, src, handoff.INPUT_MODEL)
    assert uri == f"runs:/{rid}/input-model" and handoff.uploaded(rid, src, handoff.INPUT_MODEL)
    got = handoff.download(uri, tmp_path / "remote" / "input-model")
    assert got == tmp_path / "remote" / "input-model" and _files(got) == _files(src)

    spec = tmp_path / "my-task.yaml"
    spec.write_text("name: my-task\n")
    spec_uri = handoff.upload(rid, spec, handoff.SPEC)
    assert spec_uri == f"runs:/{rid}/spec/my-task.yaml" and handoff.is_uri(spec_uri) and not handoff.is_uri("snips")
    assert handoff.download(spec_uri, tmp_path / "remote" / "my-task.yaml").read_bytes() == spec.read_bytes()

    # A destination that exists is complete: it is not fetched again.
    (got / "config.json").write_text("changed locally")
    assert handoff.download(uri, got) == got and (got / "config.json").read_text() == "changed locally"
    # Nothing at the URI: an error, and no folder (nor temporary one) left behind.
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException, match="Failed to download"):
        handoff.download(handoff.run_uri(rid, handoff.OUTPUT_MODEL), tmp_path / "remote" / "model")
    assert sorted(p.name for p in (tmp_path / "remote").iterdir()) == ["input-model", "my-task.yaml"]


def test_runs_are_found_again_by_their_key(tmp_path):
    from storage import handoff
    from storage.tracking import client, experiment_id, reopen_run

    c = client()
    assert handoff.find_run("tasc-handoff-test", "no-such-key") is None
    rid = c.create_run(experiment_id("tasc-handoff-test"), tags={handoff.KEY_TAG: "k-1"}).info.run_id
    c.set_terminated(rid, "FAILED")
    assert handoff.find_run("tasc-handoff-test", "k-1") == {"run_id": rid, "status": "FAILED", "has_model": False}
    parent = c.create_run(experiment_id("tasc-handoff-test")).info.run_id
    reopen_run(rid, parent)
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "config.json").write_text("{}")
    handoff.upload(rid, tmp_path / "final", handoff.OUTPUT_MODEL)
    c.log_metric(rid, "steps", 4)
    assert handoff.find_run("tasc-handoff-test", "k-1") == {"run_id": rid, "status": "RUNNING", "has_model": True}
    assert c.get_run(rid).data.tags["mlflow.parentRunId"] == parent
    assert handoff.run_metrics(rid) == {"steps": 4.0}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    """The shipped generic spec's corpus, stored as ingestion stores it."""
    from storage.corpus import corpus_version, write_corpus
    from tasc.data.ingest import fingerprint_sources, ingest
    from tasc.data.spec import load_spec

    spec = load_spec("prompt-completion")
    version = corpus_version(spec, fingerprint_sources(spec))
    return {"path": str(write_corpus(spec.name, version, ingest(spec))), "version": version}


@pytest.mark.slow  # Prefect deployments and waits on a flow run
def test_pipeline_side_fails_naming_the_deployment_and_the_flow_run(prefect_harness, tiny_model_dir, corpus,
                                                                    monkeypatch):
    from flows.finetune_remote import RemoteFinetuneError, finetune_on_deployment, finetune_remote
    from storage import handoff
    from storage.tracking import client

    with pytest.raises(RemoteFinetuneError, match="no Prefect deployment 'tasc-finetune-remote/nowhere'"):
        finetune_on_deployment("tasc-finetune-remote/nowhere", "prompt-completion", str(tiny_model_dir), 2, corpus,
                               None)
    # A deployment that no worker serves: the wait ends at TASC_FINETUNE_TIMEOUT, and says so.
    finetune_remote.to_deployment(name="unserved").apply()
    monkeypatch.setenv("TASC_FINETUNE_TIMEOUT", "1")
    for _ in range(2):
        with pytest.raises(RemoteFinetuneError, match=r"flow run '[\w-]+' \([0-9a-f-]+\) of deployment "
                                                      r"'tasc-finetune-remote/unserved' did not finish within 1.0 s"):
            finetune_on_deployment("tasc-finetune-remote/unserved", "prompt-completion", str(tiny_model_dir), 2,
                                   corpus, None)
    # The second attempt had the same inputs, so it handed out the same MLflow run again.
    key = _key(tiny_model_dir, corpus, "tasc-finetune-remote/unserved")
    runs = client().search_runs([client().get_experiment_by_name("tasc-prompt-completion").experiment_id],
                                filter_string=f"tags.`{handoff.KEY_TAG}` = '{key}'")
    found = handoff.find_run("tasc-prompt-completion", key)
    assert [r.info.run_id for r in runs] == [found["run_id"]]
    assert found["status"] == "FAILED" and not found["has_model"]
    assert handoff.uploaded(found["run_id"], tiny_model_dir, handoff.INPUT_MODEL)
    assert handoff.uploaded(found["run_id"], corpus["path"], handoff.CORPUS)
    assert client().get_run(found["run_id"]).data.tags["tasc.deployment"] == "tasc-finetune-remote/unserved"


def _key(model, corpus, deployment):
    from tasks.policies import fingerprint

    return fingerprint([str(model), corpus["version"], 2, deployment])
