"""Readers on the shipped datasets and on tiny files written here."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from tasc.data.readers import ReaderError, expand_paths, read_records
from tasc.data.spec import Source, default_data_dir

DATA = default_data_dir()
PLAYMUSIC = str(DATA / "snips" / "train" / "train_PlayMusic_full.json")
MARKERS = ("\ufdd0", "\ufdd1")


def _records(reader: str, *paths, **kw) -> list:
    return list(read_records(Source(reader=reader, paths=tuple(str(p) for p in paths), **kw)))


def _write(path, text: str | bytes):
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def test_playmusic_strict_decoding_names_file_and_offset():
    with pytest.raises(ReaderError) as err:
        _records("snips", PLAYMUSIC)
    msg = str(err.value)
    assert "train_PlayMusic_full.json" in msg
    assert "offset 150732" in msg and "0xed" in msg
    assert "errors: replace" in msg


def test_playmusic_replace_counts_the_one_damaged_record():
    recs = _records("snips", PLAYMUSIC, errors="replace")
    assert len(recs) == 2000
    damaged = [r for r in recs if r.replacements]
    assert [r.location for r in damaged] == ["train_PlayMusic_full.json: PlayMusic[461]"]
    assert "\ufffd" in damaged[0].fields["slots"]["playlist"]
    assert not any(m in json.dumps(r.fields) for r in recs for m in MARKERS)


def test_snips_fields_and_canonical_json():
    recs = _records("snips", DATA / "snips" / "validate" / "validate_GetWeather.json")
    assert len(recs) == 100 and all(r.problem is None for r in recs)
    assert [r.line for r in recs[:3]] == [1, 2, 3]
    for r in recs:
        f = r.fields
        assert json.loads(f["json"]) == {"intent": "GetWeather", "slots": f["slots"]}
        assert f["utterance"] == f["utterance"].strip()
        assert all(v in f["utterance"] for v in f["slots"].values())


def test_snips_repeated_slot_becomes_a_list(tmp_path):
    segments = [("add ", None), ("new ", "playlist"), (" by ", None), ("Bo", "artist"), (" and ", None),
                ("jazz", "playlist"), (" please ", None)]  # fmt: skip
    item = {"data": [{"text": t, "entity": e} if e else {"text": t} for t, e in segments]}
    path = _write(tmp_path / "x.json", json.dumps({"AddToPlaylist": [item, {"nodata": 1}]}))
    good, bad = _records("snips", path)
    assert good.fields["utterance"] == "add new  by Bo and jazz please"
    # Slots in utterance order (by first mention), values stripped, a repeated slot as a list.
    expected = '{"intent": "AddToPlaylist", "slots": {"playlist": ["new", "jazz"], "artist": "Bo"}}'
    assert good.fields["json"] == expected
    assert bad.problem.startswith("data:") and bad.location == "x.json: AddToPlaylist[1]"


def test_squad_one_record_per_question():
    recs = _records("squad", DATA / "squad-expmrc" / "expmrc-squad-dev.json")
    assert len(recs) == 501
    assert len({r.fields["id"] for r in recs}) == 501
    assert [r.line for r in recs] == list(range(1, 502))
    first = recs[0].fields
    assert set(first) == {"title", "context", "id", "question", "answers", "answer"}
    assert first["answer"] == first["answers"][0] == "Melbourne"
    assert recs[0].location == "expmrc-squad-dev.json: data[0].paragraphs[0].qas[0]"


def test_jsonl_line_numbers_blank_and_malformed_lines(tmp_path):
    text = '{"a": "x"}\n\n{"a": "line\u2028sep"}\n{"a": \n[1, 2]\n{"a": "end"}\n'
    recs = _records("jsonl", _write(tmp_path / "t.jsonl", text))
    assert [r.line for r in recs] == [1, 3, 4, 5, 6]
    assert recs[1].fields == {"a": "line\u2028sep"}  # U+2028 must not split the line
    assert recs[2].problem.startswith("not valid JSON") and recs[2].raw == '{"a": '
    assert recs[2].location == "t.jsonl:4"
    assert recs[3].problem == "expected an object, got list"
    assert recs[4].fields == {"a": "end"}


def test_jsonl_invalid_byte_strict_and_replace(tmp_path):
    path = _write(tmp_path / "b.jsonl", b'{"a": "ok"}\n{"a": "ok"}\n{"a": "caf\xe9"}\n')
    with pytest.raises(ReaderError, match=r"b\.jsonl: byte 0xe9 at offset 34 \(line 3\)"):
        _records("jsonl", path)
    recs = _records("jsonl", path, errors="replace")
    assert [r.replacements for r in recs] == [0, 0, 1]
    assert recs[2].fields == {"a": "caf\ufffd"}
    assert _records("jsonl", path, encoding="latin-1")[2].fields == {"a": "café"}


def test_utf8_bom_is_not_content(tmp_path):
    path = _write(tmp_path / "bom.jsonl", b'\xef\xbb\xbf{"a": "x"}\n')
    assert _records("jsonl", path)[0].fields == {"a": "x"}
    bad = _write(tmp_path / "bom-bad.jsonl", b'\xef\xbb\xbf{"a": "\xff"}\n')
    with pytest.raises(ReaderError, match="byte 0xff at offset 10 "):  # offsets count the BOM
        _records("jsonl", bad)


def test_json_list_and_json_path(tmp_path):
    path = _write(tmp_path / "d.json", json.dumps({"data": {"rows": [{"q": "1"}, {"q": "2"}]}}))
    recs = _records("json", path, json_path="data.rows")
    assert [(r.line, r.location, r.fields) for r in recs][1] == (2, "d.json: data.rows[1]", {"q": "2"})
    with pytest.raises(ReaderError, match="json_path"):
        _records("json", path)
    with pytest.raises(ReaderError, match="no key 'nope'"):
        _records("json", path, json_path="data.nope")
    bad = _write(tmp_path / "bad.json", '[{"q": 1},\n  {"q": }]')
    with pytest.raises(ReaderError, match=r"bad\.json:2: not valid JSON"):
        _records("json", bad)


def test_csv_rows_start_lines_and_ragged_rows(tmp_path):
    text = 'prompt,completion\nhi,there\n"two\nlines",ok\nonly-one\n'
    recs = _records("csv", _write(tmp_path / "t.csv", text))
    assert [r.line for r in recs] == [2, 3, 5]
    assert recs[1].fields == {"prompt": "two\nlines", "completion": "ok"}
    assert recs[2].problem == "1 values for 2 columns"


def test_parquet_rows(tmp_path):
    path = tmp_path / "t.parquet"
    pd.DataFrame({"prompt": ["a", "b"], "answers": [["x"], ["y", "z"]]}).to_parquet(path)
    recs = _records("parquet", path)
    assert [r.fields for r in recs] == [
        {"prompt": "a", "answers": ["x"]},
        {"prompt": "b", "answers": ["y", "z"]},
    ]
    assert recs[1].location == "t.parquet: [1]" and recs[1].line == 2


def test_globs_are_sorted_and_missing_paths_are_named(tmp_path):
    files = expand_paths(Source("snips", (str(DATA / "snips" / "*" / "*.json"),)))
    assert len(files) == 14 and files == sorted(files)
    with pytest.raises(ReaderError, match="no files match"):
        expand_paths(Source("jsonl", (str(tmp_path / "*.jsonl"),)))
    with pytest.raises(ReaderError, match="no such file"):
        expand_paths(Source("jsonl", (str(tmp_path / "gone.jsonl"),)))
    with pytest.raises(ReaderError, match="hf://owner/name"):
        expand_paths(Source("hf", (str(tmp_path / "squad"),)))


def test_hf_reader_on_local_jsonl(tmp_path):
    path = _write(
        tmp_path / "t.jsonl", '{"question": "q1", "answer": ["a"]}\n{"question": "q2", "answer": ["b"]}\n'
    )
    recs = _records("hf", path)
    assert [r.fields for r in recs] == [
        {"question": "q1", "answer": ["a"]},
        {"question": "q2", "answer": ["b"]},
    ]
    assert recs[1].location.endswith("train[1]") and recs[1].line == 2


def test_hf_hub_id_offline_fails_with_a_clear_message():
    # A fresh interpreter: the hub's offline switch is read when the library is imported.
    code = (
        "from tasc.data.readers import read_records, ReaderError\n"
        "from tasc.data.spec import Source\n"
        "try:\n    list(read_records(Source('hf', ('hf://tasc-missing/none',))))\n"
        "except ReaderError as e:\n    print(e)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "could not load Hugging Face dataset 'tasc-missing/none'" in out.stdout
    assert "network access" in out.stdout


def test_csv_duplicate_header_fails_naming_file_line_and_column(tmp_path):
    path = _write(tmp_path / "dup.csv", "prompt,completion,completion\nhi,a,b\n")
    with pytest.raises(ReaderError) as err:
        _records("csv", path)
    msg = str(err.value)
    assert msg == f"{path}:1: duplicate column 'completion' in the header (columns 2 and 3)"
    assert "\n" not in msg


def test_jsonl_duplicate_key_fails_naming_file_line_and_key(tmp_path):
    text = '{"prompt": "p", "completion": "a"}\n{"prompt": "p", "completion": "a", "completion": "b"}\n'
    path = _write(tmp_path / "dup.jsonl", text)
    with pytest.raises(ReaderError, match=r"dup\.jsonl:2: duplicate key 'completion'") as err:
        _records("jsonl", path)
    assert "\n" not in str(err.value)
    nested = _write(tmp_path / "nested.jsonl", '{"slots": {"city": "A", "city": "B"}}\n')
    with pytest.raises(ReaderError, match=r"nested\.jsonl:1: duplicate key 'city'"):
        _records("jsonl", nested)
