"""Bad inputs and damaged stored files fail clearly or are rebuilt, never pass as success:
the bad-row policy in the corpus version, the registry model's input checks, damaged cache
hits, empty corpora and a damaged model cache."""

from __future__ import annotations

import json
import shutil
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from storage.corpus import CorpusNotFound, corpus_version, latest_corpus, read_corpus
from tasc.cli import app
from tasc.data.ingest import IngestError, fingerprint_sources, ingest
from tasc.data.spec import SpecError, load_spec, parse_spec


def _rows(n: int, bad: int = 0) -> list[dict]:
    good = [{"prompt": f"question {i}", "completion": f"the answer is {i} {i + 1}"} for i in range(n)]
    return good + [{"prompt": f"no answer {i}"} for i in range(bad)]


def _spec_file(tmp_path: Path, rows: list[dict], **raw) -> str:
    """A spec YAML of its own task name (the flow tests share the session's state folder)."""
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    spec = {"name": f"trust-{uuid.uuid4().hex[:8]}", "source": {"reader": "jsonl", "paths": [str(data)]}, **raw}
    path = tmp_path / "spec.yaml"
    path.write_text(json.dumps(spec), encoding="utf-8")  # JSON is YAML
    return str(path)


def _truncate(path: str | Path) -> None:
    p = Path(path)
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


# ---- 1. the bad-row policy is part of the corpus version ---------------------------------


def test_policy_override_changes_the_corpus_version(tmp_path):
    spec = load_spec(_spec_file(tmp_path, _rows(5)))
    fp = fingerprint_sources(spec)
    assert corpus_version(spec, fp, "skip") != corpus_version(spec, fp)
    assert corpus_version(spec, fp, "fail") == corpus_version(spec, fp)  # the spec's own policy
    with pytest.raises(SpecError, match="fail, skip"):
        corpus_version(spec, fp, "drop")


def test_cli_refuses_an_unknown_policy_while_parsing():
    res = CliRunner().invoke(app, ["ingest", "snips", "--policy", "drop"])
    assert res.exit_code == 2
    text = " ".join(res.output.replace("│", " ").split())  # the error box wraps lines
    assert "'drop' is not a bad-row policy; use one of fail, skip" in text


def test_a_skip_corpus_is_not_reused_under_fail(prefect_harness, tmp_path):
    from flows.stages import ingest_flow

    spec = _spec_file(tmp_path, _rows(20, bad=2))
    skipped = ingest_flow(spec, "skip")
    assert skipped["manifest"]["rejected"] == 2 and skipped["manifest"]["policy"] == "skip"
    with pytest.raises(IngestError, match="2 bad row"):
        ingest_flow(spec)  # the spec's policy, fail: the bad rows are reported, not dropped
    with pytest.raises(SpecError, match="not one of fail, skip"):
        ingest_flow(spec, "drop")  # even with a stored corpus for the spec


# ---- 2. the registry model checks its inputs --------------------------------------------


@pytest.fixture(scope="module")
def registry_model(tiny_model_dir, tmp_path_factory):
    """The pyfunc as MLflow saves and loads it, with the signature the registry logs."""
    import mlflow

    from storage.drafts import write_draft
    from storage.registry import PYFUNC_FILE, pyfunc_signature
    from tasc.decode.draft import build_draft_corpus

    d = tmp_path_factory.mktemp("trust-pyfunc")
    draft = write_draft(build_draft_corpus(references=["the answer is 1 2"] * 3), d / "draft.parquet")
    config = {"system_prompt": None, "chat_template": True, "stop": [], "max_new_tokens": 4, "dtype": "float32"}
    (d / "config.json").write_text(json.dumps(config))
    mlflow.pyfunc.save_model(d / "model", python_model=str(PYFUNC_FILE), signature=pyfunc_signature(config, ["q"]),
                             artifacts={"model": str(tiny_model_dir), "draft": str(draft),
                                        "config": str(d / "config.json")})
    return mlflow.pyfunc.load_model(str(d / "model"))


def test_a_plain_list_of_prompts_passes_mlflow(registry_model):
    out = registry_model.predict(["question 1", "question 2"], params={"max_new_tokens": 3})
    assert len(out) == 2 and all(isinstance(o, str) for o in out)
    chat = pd.DataFrame({"prompt": ["question 1"], "system": ["answer briefly"]})
    assert len(registry_model.predict(chat, params={"max_new_tokens": 3})) == 1
    assert registry_model.predict([]) == []


@pytest.mark.parametrize("model_input, match", [
    (pd.DataFrame({"prompt": ["fine", None]}), "row 1: 'prompt' must be text, got no value"),
    ([None], "row 0: 'prompt' must be text"),
    ([3], "row 0: 'prompt' must be text, got int"),
    (pd.DataFrame({"text": ["a"], "other": ["b"]}), "no 'prompt' column"),
    (pd.DataFrame({"prompt": ["a"], "messages": ["not json"]}), "row 0: 'messages' must be a JSON list"),
])
def test_bad_rows_fail_naming_the_row(registry_model, model_input, match):
    with pytest.raises(ValueError, match=match):
        registry_model.unwrap_python_model().predict(None, model_input, {"max_new_tokens": 2})


def test_empty_inputs_give_an_empty_list(registry_model):
    model = registry_model.unwrap_python_model()
    assert model.predict(None, pd.DataFrame({"prompt": pd.Series([], dtype=object)}), {}) == []
    assert model.predict(None, pd.DataFrame(), {}) == []


@pytest.mark.parametrize("value", [10**12, 0, -1, 2.5, True, 2048])
def test_max_new_tokens_is_a_whole_number_within_the_context(registry_model, value):
    with pytest.raises(ValueError, match=r"max_new_tokens.*(from 1 to 2048|no room)"):
        registry_model.unwrap_python_model().predict(None, ["question 1"], {"max_new_tokens": value})


def test_an_overlong_prompt_fails_at_once_with_the_limit(registry_model):
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"prompt 0 is \d+ tokens; with max_new_tokens=4 that exceeds the "
                                         r"model's context of 2048 tokens"):
        registry_model.predict(["question " * 3000], params={"max_new_tokens": 4})
    assert time.perf_counter() - t0 < 30


def test_engine_refuses_a_budget_decode_cannot_hold():
    from tasc.decode.engine import DecodeConfig

    for bad in (0, -1, 10**12 + 0.5, None):
        with pytest.raises(ValueError, match="max_new_tokens must be a whole number"):
            DecodeConfig(max_new_tokens=bad)


# ---- 3. damaged cache hits are rebuilt; --force rebuilds ----------------------------------


def test_stage_commands_have_force():
    for cmd in ("ingest", "ngrams", "harvest", "draft"):
        res = CliRunner().invoke(app, [cmd, "--help"])
        assert res.exit_code == 0 and "--force" in res.output, cmd


def test_a_damaged_corpus_is_rebuilt(prefect_harness, tmp_path):
    from flows.stages import ingest_flow

    spec = _spec_file(tmp_path, _rows(30))
    first = ingest_flow(spec)
    _truncate(Path(first["path"]) / "corpus.parquet")
    again = ingest_flow(spec)
    assert again["path"] == first["path"] and not again.get("reused")
    assert len(read_corpus(again["path"])) == 30
    forced = ingest_flow(spec, force=True)
    assert not forced.get("reused") and len(read_corpus(forced["path"])) == 30


def test_damaged_tables_drafts_and_harvests_are_rebuilt(prefect_harness, tmp_path, tiny_model_dir):
    from flows.resume import damage
    from flows.stages import draft_flow, ingest_flow, ngrams_flow
    from storage.drafts import read_draft, read_harvest
    from storage.ngram_tables import read_ngram_table

    spec, model = _spec_file(tmp_path, _rows(30), generation={"max_new_tokens": 4}), str(tiny_model_dir)
    corpus = ingest_flow(spec)
    tables = ngrams_flow(spec, model, 3, 1, corpus=corpus)
    assert ngrams_flow(spec, model, 3, 1, corpus=corpus)["cached"] is True
    _truncate(tables["text"])
    assert "not a readable Parquet file" in damage(tables)
    again = ngrams_flow(spec, model, 3, 1, corpus=corpus)
    assert again["cached"] is False and read_ngram_table(again["text"])[0].num_rows == tables["rows"]["text"]
    assert ngrams_flow(spec, model, 3, 1, corpus=corpus, force=True)["cached"] is False

    drafts = draft_flow(spec, model, "on-policy", 2, "float32", corpus)
    harvest = Path(read_draft(drafts["main"]).meta["harvest"])
    _truncate(drafts["main"])
    _truncate(harvest)
    again = draft_flow(spec, model, "on-policy", 2, "float32", corpus)
    assert read_draft(again["main"]).texts and len(read_harvest(harvest)) == 2


# ---- 4. an empty corpus is a failure ----------------------------------------------------


def test_an_empty_source_fails_naming_the_file(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    spec = parse_spec({"name": "t", "source": {"reader": "jsonl", "paths": [str(empty)]}})
    with pytest.raises(IngestError, match=f"{empty}: no records to ingest .*add rows"):
        ingest(spec)


def test_every_row_rejected_under_skip_fails(tmp_path):
    spec = load_spec(_spec_file(tmp_path, _rows(0, bad=3), on_bad_rows="skip"))
    with pytest.raises(IngestError, match=r"data.jsonl: all 3 records were rejected under policy skip "
                                          r"\(the first: .*:1 completion: missing field\)"):
        ingest(spec)


def test_an_empty_corpus_is_neither_stored_nor_latest(prefect_harness, tmp_path):
    from flows.stages import ingest_flow

    spec = _spec_file(tmp_path, _rows(0, bad=4))
    with pytest.raises(IngestError, match="all 4 records were rejected"):
        ingest_flow(spec, "skip")
    with pytest.raises(CorpusNotFound):
        latest_corpus(load_spec(spec).name)


# ---- 5. a damaged model.safetensors --------------------------------------------------------


def test_a_damaged_user_model_folder_fails_naming_the_file(tiny_model_dir, tmp_path):
    from tasc.models import ModelError, load_model, safetensors_problem

    assert safetensors_problem(tiny_model_dir) is None
    bad = tmp_path / "model"
    shutil.copytree(tiny_model_dir, bad)
    _truncate(bad / "model.safetensors")
    with pytest.raises(ModelError, match=f"{bad / 'model.safetensors'}: .*(truncated|unreadable)"):
        load_model(str(bad), dtype="float32", device="cpu")


def test_a_damaged_cached_conversion_is_converted_again(tiny_model_dir, tmp_path, monkeypatch):
    import tasc.models as models

    calls = []

    def convert(gguf, out_dir):  # stands in for the minute-long dequantisation
        calls.append(out_dir)
        shutil.rmtree(out_dir, ignore_errors=True)
        shutil.copytree(tiny_model_dir, out_dir)
        return out_dir

    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(tmp_path / "model.gguf"), "llama")  # a whole GGUF file, checked before converting
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    monkeypatch.setattr(models, "convert_gguf", convert)
    monkeypatch.setattr(models, "find_gguf_file", lambda src: tmp_path / "model.gguf")
    cache = tmp_path / "cache"
    shutil.copytree(tiny_model_dir, cache / models.DEFAULT_MODEL)
    _truncate(cache / models.DEFAULT_MODEL / "model.safetensors")
    assert models.resolve_model(models.DEFAULT_MODEL, cache) == str(cache / models.DEFAULT_MODEL)
    assert calls == [cache / models.DEFAULT_MODEL]
    assert models.safetensors_problem(cache / models.DEFAULT_MODEL) is None
    models.resolve_model(models.DEFAULT_MODEL, cache)
    assert len(calls) == 1  # whole now: used as it is
