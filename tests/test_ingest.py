"""Ingestion of the shipped specs, bad-row policies, splits, duplicates and the corpus store."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import yaml

from storage.corpus import (
    CorpusNotFound,
    corpus_version,
    find_corpus,
    latest_corpus,
    mark_latest,
    read_corpus,
    read_manifest,
    read_rejected,
    write_corpus,
)
from tasc.data.ingest import (
    BASE_COLUMNS,
    REJECTED_COLUMNS,
    IngestError,
    assign_split,
    fingerprint_sources,
    ingest,
)
from tasc.data.readers import ReaderError
from tasc.data.spec import SPECS_DIR, SplitRule, load_spec, parse_spec

SHIPPED = sorted(p.stem for p in SPECS_DIR.glob("*.yaml"))


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8"
    )
    return path


def _spec(path: Path, **raw):
    source = {"reader": "jsonl", "paths": [str(path)], **raw.pop("source", {})}
    return parse_spec({"name": "t", "source": source, **raw})


def _pairs(n: int, start: int = 0) -> list[dict]:
    return [{"prompt": f"question {i}", "completion": f"answer {i}"} for i in range(start, start + n)]


# ---- shipped specs ----------------------------------------------------------------------


def test_every_shipped_spec_is_here():
    assert SHIPPED == ["mbpp", "nq-open", "prompt-completion", "snips", "squad"]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_spec_ingests_cleanly(name):
    spec = load_spec(name)
    result = ingest(spec)
    corpus, m = result.corpus, result.manifest
    assert len(corpus) > 0 and result.rejected.empty and m["rejected"] == 0
    assert list(corpus.columns[: len(BASE_COLUMNS)]) == BASE_COLUMNS
    assert list(corpus.columns[len(BASE_COLUMNS) :]) == list(spec.extras)
    assert corpus["id"].is_unique and set(corpus["split"]) == {"train", "validation", "test"}
    assert sum(m["rows"].values()) == m["total"] == len(corpus)
    assert m["total"] + m["duplicates_removed"] == m["records_read"]
    assert m["spec_hash"] == spec.hash()
    assert {p: s["sha256"] for p, s in m["sources"].items()} == fingerprint_sources(spec)
    assert all(s["bytes"] > 0 for s in m["sources"].values())
    assert corpus["completion"].str.strip().str.len().min() > 0


def test_snips_corpus():
    m = ingest(load_spec("snips"))
    c, man = m.corpus, m.manifest
    assert man["records_read"] == 14484 and man["duplicates_removed"] == 174
    assert man["decode_replacements"] == 1  # the PlayMusic row with the damaged emoji
    assert len(man["sources"]) == 14
    completion = json.loads(c["completion"].iloc[0])
    assert set(completion) == {"intent", "slots"}
    assert "SearchScreeningEvent" in c["prompt"].iloc[0]
    assert (c["prompt"].str.rstrip() == c["prompt"]).all()  # utterances are stripped


def test_snips_strict_decoding_stops_with_the_file_named():
    raw = yaml.safe_load((SPECS_DIR / "snips.yaml").read_text())
    raw["source"]["errors"] = "strict"
    with pytest.raises(ReaderError, match=r"train_PlayMusic_full\.json: byte 0xed at offset 150732"):
        ingest(parse_spec(raw, SPECS_DIR / "snips.yaml"))


def test_mbpp_corpus():
    c = ingest(load_spec("mbpp")).corpus.set_index("id")
    assert len(c) == 974 and "11" in c.index
    assert not c["completion"].str.contains("\r").any()
    assert not c["test_setup"].str.contains("\r").any()
    row = c.loc["11"]
    assert len(row["tests"]) == 3 and row["tests"][0] in row["prompt"]


@pytest.mark.parametrize("name", ["squad", "nq-open"])
def test_qa_corpus_keeps_all_answers(name):
    c = ingest(load_spec(name)).corpus
    assert all(comp == answers[0] for comp, answers in zip(c["completion"], c["answers"], strict=True))
    assert c["answers"].map(len).max() > 1


# ---- bad rows ---------------------------------------------------------------------------

GOOD = {"prompt": "p", "completion": "c"}
BAD_CASES = {
    "malformed": ('{"prompt": "p", ', {}, "(record)", "not valid JSON"),
    "missing": ({"prompt": "p"}, {}, "completion", "missing field"),
    "empty": ({"prompt": "p", "completion": " \n "}, {}, "completion", "empty completion"),
    "non_text": ({"prompt": "p", "completion": 42}, {}, "completion", "expected text, got int"),
    "too_long": ({"prompt": "p" * 50, "completion": "c"}, {"limits": {"max_prompt_chars": 20}}, "prompt",
                 "prompt too long: 50 characters > limits.max_prompt_chars (20)"),
    "template_missing": ({"q": "p", "a": ["x"]}, {"shape": "template", "prompt_template": "Q: {question}",
                         "completion_template": "{a[0]}"}, "question", "missing field"),
    "template_index": ({"question": "p", "a": []}, {"shape": "template", "prompt_template": "Q: {question}",
                       "completion_template": "{a[0]}"}, "a[0]", "cannot resolve"),
    "template_list": ({"question": ["p"], "a": ["x"]}, {"shape": "template", "prompt_template": "{question}",
                      "completion_template": "{a[0]}"}, "question", "expected text, got list"),
    "extras_missing": ({"prompt": "p", "completion": "c"}, {"extras": {"answers": "answer"}}, "answer", "missing"),
}  # fmt: skip


def _good_row(i: int, extra: dict) -> dict:
    if extra.get("shape") == "template":
        return {"question": f"p{i}", "a": [f"c{i}"]}
    row = {"prompt": f"p{i}", "completion": f"c{i}"}
    return {**row, "answer": ["x"]} if "extras" in extra else row


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_row_fails_the_run(tmp_path, case):
    bad, extra, field, reason = BAD_CASES[case]
    path = _jsonl(tmp_path / "in.jsonl", [_good_row(1, extra), _good_row(2, extra), bad, _good_row(4, extra)])
    with pytest.raises(IngestError) as err:
        ingest(_spec(path, **extra))
    msg = str(err.value)
    assert "1 bad row(s)" in msg and f"in.jsonl:3 {field}: " in msg and reason in msg
    assert "on_bad_rows: skip" in msg
    assert list(err.value.rejected.columns) == REJECTED_COLUMNS and len(err.value.rejected) == 1


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_row_is_skipped_and_reported(tmp_path, case):
    bad, extra, field, reason = BAD_CASES[case]
    path = _jsonl(tmp_path / "in.jsonl", [_good_row(1, extra), _good_row(2, extra), bad, _good_row(4, extra)])
    result = ingest(_spec(path, **extra), policy="skip")
    assert list(result.corpus["line"]) == [1, 2, 4]
    rej = result.rejected.iloc[0]
    assert (rej["source"], rej["line"], rej["location"]) == (str(path), 3, "in.jsonl:3")
    assert rej["field"] == field and reason in rej["reason"]
    if isinstance(bad, str):
        assert rej["raw"] == bad  # the line as it was, since it does not parse
    else:
        assert json.loads(rej["raw"]) == bad
    assert result.manifest["rejected"] == 1 and result.manifest["policy"] == "skip"


def test_spec_policy_skip_and_error_lists_the_first_five(tmp_path):
    rows = [GOOD] + [{"prompt": f"p{i}"} for i in range(8)]
    path = _jsonl(tmp_path / "in.jsonl", rows)
    assert len(ingest(_spec(path, on_bad_rows="skip")).rejected) == 8
    with pytest.raises(IngestError) as err:
        ingest(_spec(path, on_bad_rows="skip"), policy="fail")
    msg = str(err.value)
    assert "8 bad row(s); the first 5:" in msg
    assert "in.jsonl:6 completion" in msg and "in.jsonl:7 " not in msg
    assert len(err.value.rejected) == 8


def test_duplicate_ids_with_different_text_are_bad_rows(tmp_path):
    rows = [{"id": 1, "prompt": "a", "completion": "x"}, {"id": 1, "prompt": "b", "completion": "y"}]
    result = ingest(_spec(_jsonl(tmp_path / "in.jsonl", rows), source={"id_field": "id"}), policy="skip")
    assert list(result.corpus["id"]) == ["1"]
    assert "duplicate id '1' (first at in.jsonl:1)" in result.rejected["reason"].iloc[0]


def test_messages_shape(tmp_path):
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}]  # fmt: skip
    bad = [{"role": "user", "content": "no reply"}]
    path = _jsonl(tmp_path / "chat.jsonl", [{"messages": chat}, {"messages": bad}])
    result = ingest(_spec(path, shape="messages"), policy="skip")
    row = result.corpus.iloc[0]
    assert (row["prompt"], row["completion"], row["system"]) == ("2+2?", "4", "be brief")
    assert json.loads(row["messages"]) == chat[1:3]
    assert "assistant" in result.rejected["reason"].iloc[0]


# ---- duplicates and splits --------------------------------------------------------------


def test_exact_duplicates_are_removed_and_counted(tmp_path):
    rows = [GOOD, {"prompt": "other", "completion": "c"}, GOOD, GOOD]
    result = ingest(_spec(_jsonl(tmp_path / "in.jsonl", rows)))
    assert len(result.corpus) == 2 and result.manifest["duplicates_removed"] == 2
    assert list(result.corpus["line"]) == [1, 2]


def test_split_is_stable_and_order_free(tmp_path):
    rows = _pairs(2000)
    first = ingest(_spec(_jsonl(tmp_path / "a.jsonl", rows))).corpus
    random.Random(7).shuffle(rows)
    second = ingest(_spec(_jsonl(tmp_path / "b.jsonl", rows))).corpus
    assert dict(zip(first["id"], first["split"], strict=True)) == dict(
        zip(second["id"], second["split"], strict=True)
    )
    share = first["split"].value_counts(normalize=True)
    assert abs(share["test"] - 0.10) < 0.03 and abs(share["validation"] - 0.05) < 0.02
    # Pinned values: the mapping must never change between versions or interpreters.
    assert {i: assign_split(f"id{i}", SplitRule()) for i in (4, 14, 22, 36)} == _PINNED_SPLITS
    assert assign_split("id0", SplitRule()) == "train"
    assert assign_split("id0", SplitRule(seed="other")) in ("train", "validation", "test")


_PINNED_SPLITS = {4: "test", 14: "test", 22: "validation", 36: "validation"}


def test_split_fractions_follow_the_spec(tmp_path):
    corpus = ingest(
        _spec(_jsonl(tmp_path / "in.jsonl", _pairs(1000)), split={"validation": 0.3, "test": 0.3})
    ).corpus
    share = corpus["split"].value_counts(normalize=True)
    assert abs(share["train"] - 0.4) < 0.06


# ---- storage ----------------------------------------------------------------------------


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("TASC_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_corpus_round_trip_and_noop_reingest(tmp_path, home):
    data = _jsonl(
        tmp_path / "in.jsonl", [{**p, "answer": ["x", "y"]} for p in _pairs(40)] + [{"prompt": "p"}]
    )
    spec = _spec(data, extras={"answers": "answer"}, on_bad_rows="skip")
    version = corpus_version(spec, fingerprint_sources(spec))
    assert find_corpus("t", version) is None
    result = ingest(spec)
    path = write_corpus("t", version, result)
    assert path == home / "corpora" / "t" / version
    assert {p.name for p in (home / "corpora" / "t").iterdir()} == {"LATEST", version}  # no temp left
    assert find_corpus("t", version) == path == latest_corpus("t")
    back = read_corpus(path)
    assert back.drop(columns="answers").equals(result.corpus.drop(columns="answers"))
    assert back["answers"].iloc[0] == ["x", "y"] and isinstance(back["answers"].iloc[0], list)
    assert set(read_corpus(path, split="test")["split"]) == {"test"}
    assert len(read_rejected(path)) == 1 and read_manifest(path)["version"] == version
    # Unchanged inputs: same version, found before parsing.
    assert find_corpus("t", corpus_version(spec, fingerprint_sources(spec))) == path
    _jsonl(data, _pairs(41))
    assert corpus_version(spec, fingerprint_sources(spec)) != version


def test_rejected_file_is_written_even_when_empty(tmp_path, home):
    spec = _spec(_jsonl(tmp_path / "in.jsonl", _pairs(5)))
    path = write_corpus("t", "v1", ingest(spec))
    rejected = read_rejected(path)
    assert rejected.empty and list(rejected.columns) == REJECTED_COLUMNS


def test_latest_corpus_follows_writes_and_reuse(tmp_path, home):
    with pytest.raises(CorpusNotFound, match="tasc ingest SPEC"):
        latest_corpus("t")
    result = ingest(_spec(_jsonl(tmp_path / "in.jsonl", _pairs(5))))
    a, b = write_corpus("t", "va", result), write_corpus("t", "vb", result)
    assert latest_corpus("t") == b
    mark_latest("t", "va")  # a no-op re-ingest of the older inputs
    assert latest_corpus("t") == a
    (a.parent / "LATEST").unlink()
    assert latest_corpus("t") in (a, b)
    with pytest.raises(ValueError, match="folder name"):
        latest_corpus("../escape")
