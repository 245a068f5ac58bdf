"""Metrics and the code sandbox on known cases and real MBPP rows."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from tasc.eval.metrics import (
    METRIC_DESCRIPTIONS,
    chrf,
    exact_match,
    extract_code,
    json_field_accuracy,
    mbpp_pass,
    normalize_answer,
    score,
    score_many,
    token_f1,
)
from tasc.eval.sandbox import NETWORK_ERROR, run_sandboxed

MBPP = Path(os.environ.get("TASC_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "datasets"))
MBPP = MBPP / "mbpp" / "mbpp.jsonl"


@pytest.fixture(scope="module")
def mbpp_rows() -> list[dict]:
    if not MBPP.exists():
        pytest.skip(f"MBPP not found at {MBPP}")
    with open(MBPP, encoding="utf-8") as fh:
        return [json.loads(next(fh)) for _ in range(3)]


# ---------------------------------------------------------------- QA


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("The Eiffel Tower!", "eiffel tower"),
        ("  an   apple, a pear ", "apple pear"),
        ("Denver Broncos.", "denver broncos"),
        ("theory", "theory"),  # articles only as whole words
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_exact_match_any_of_answers():
    assert exact_match("the Denver Broncos", ["Denver Broncos"]) == 1.0
    assert exact_match("Broncos", ["Denver Broncos", "Broncos!"]) == 1.0
    assert exact_match("Carolina Panthers", ["Denver Broncos"]) == 0.0
    assert exact_match("x", []) == 0.0


def test_token_f1_partial_and_best_answer():
    # 1 shared token; precision 1/2, recall 1/1 -> 2/3.
    assert token_f1("Denver Broncos", ["Broncos"]) == pytest.approx(2 / 3)
    assert token_f1("Denver Broncos", ["Broncos", "the Denver Broncos"]) == 1.0
    assert token_f1("red", ["blue"]) == 0.0
    assert token_f1("the", ["a"]) == 1.0  # both empty after normalisation


def test_answers_as_numpy_array_and_default_to_completion():
    row = {"completion": "Paris", "answers": np.array(["City of Paris", "Paris"], dtype=object)}
    assert score("exact_match", "paris.", row) == 1.0
    assert score("f1", "the city", row) == pytest.approx(0.5)  # P=1, R=1/3
    assert score("exact_match", "Paris", {"completion": "Paris"}) == 1.0
    assert score("exact_match", "Paris", {"completion": "Paris", "answers": None}) == 1.0
    assert score("f1", "Lyon", {"completion": "Paris", "answers": float("nan")}) == 0.0


# ---------------------------------------------------------------- JSON

REF = json.dumps({"intent": "GetWeather", "slots": {"city": "New York", "timeRange": "tomorrow"}})


def test_json_exact_and_normalised_values():
    pred = '{"intent": "getweather", "slots": {"city": "new  york", "timeRange": "Tomorrow"}}'
    assert json_field_accuracy(pred, REF) == 1.0


def test_json_fenced_and_surrounding_text():
    pred = f"Sure! Here is the parse:\n```json\n{REF}\n```\nLet me know if you need more."
    assert json_field_accuracy(pred, REF) == 1.0
    assert json_field_accuracy(f"Result: {REF} (done)", REF) == 1.0
    assert json_field_accuracy(f"```\n{REF}\n```", REF) == 1.0


def test_json_missing_and_extra_fields():
    missing = '{"intent": "GetWeather", "slots": {"city": "New York"}}'
    assert json_field_accuracy(missing, REF) == pytest.approx(2 / 3)
    extra = '{"intent": "GetWeather", "slots": {"city": "New York", "timeRange": "tomorrow", "x": "y"}}'
    assert json_field_accuracy(extra, REF) == pytest.approx(3 / 4)
    wrong = '{"intent": "BookRestaurant", "slots": {"city": "New York", "timeRange": "tomorrow"}}'
    assert json_field_accuracy(wrong, REF) == pytest.approx(2 / 3)
    # a flat key does not match a nested one: the union has 4 fields, 2 match
    flat = '{"intent": "GetWeather", "city": "New York", "slots": {"timeRange": "tomorrow"}}'
    assert json_field_accuracy(flat, REF) == pytest.approx(2 / 4)


def test_json_unparsable_and_edge_cases():
    assert json_field_accuracy("no json here", REF) == 0.0
    assert json_field_accuracy('{"intent": "GetWeather", "slots": {"city": ', REF) == 0.0
    assert json_field_accuracy("[1, 2]", REF) == 0.0
    assert json_field_accuracy("{}", "{}") == 1.0
    assert json_field_accuracy('{"n": 5}', {"n": 5}) == 1.0
    assert json_field_accuracy('{"n": "5"}', {"n": 5}) == 0.0
    with pytest.raises(ValueError):
        json_field_accuracy("{}", "not json")
    assert score("json_fields", REF, {"completion": REF}) == 1.0


# ---------------------------------------------------------------- chrF


def test_chrf():
    ref = "The quick brown fox jumps over the lazy dog."
    assert chrf(ref, ref) == pytest.approx(1.0)
    assert chrf("Completely unrelated words in here.", ref) < 0.3
    mid = chrf("The quick brown fox jumped over a dog.", ref)
    assert 0.3 < mid < 1.0
    assert score("chrf", ref, {"completion": ref}) == pytest.approx(1.0)


def test_unknown_metric_lists_known():
    with pytest.raises(ValueError, match="exact_match"):
        score("bleu", "x", {"completion": "x"})
    assert set(METRIC_DESCRIPTIONS) == {"exact_match", "f1", "json_fields", "chrf", "mbpp_pass"}


# ---------------------------------------------------------------- code


def test_extract_code():
    assert extract_code("Here:\n```python\ndef f():\n    return 1\n```\nDone") == "def f():\n    return 1\n"
    assert extract_code("```py\nx = 1\n```") == "x = 1\n"
    assert extract_code("```\nx = 2\n```") == "x = 2\n"
    assert extract_code("```python\nx = 3\n") == "x = 3\n"  # cut off before the closing fence
    assert extract_code("x = 4") == "x = 4"


def test_mbpp_reference_solutions_pass(mbpp_rows):
    for row in mbpp_rows:
        assert "\r\n" in row["code"]
        assert mbpp_pass(row["code"], row["test_list"], row["test_setup_code"]) == 1.0


def test_mbpp_fenced_prediction_and_failures(mbpp_rows):
    row = mbpp_rows[1]
    fenced = f"Here is the function:\n```python\n{row['code']}\n```\nIt uses sets."
    assert mbpp_pass(fenced, row["test_list"]) == 1.0
    wrong = row["code"].replace("&", "|")
    assert mbpp_pass(wrong, row["test_list"]) == 0.0
    assert mbpp_pass("def oops(:\n", row["test_list"]) == 0.0


ADD_TESTS = ["assert add(1, 2) == 3", "assert add(2, 2) == 4"]
WRONG_ADD = "def add(a, b):\n    return a - b\n"
RIGHT_ADD = "def add(a, b):\n    return a + b\n"
EARLY_EXITS = {
    "sys.exit": "import sys\nsys.exit(0)\n",
    "exit": "exit()\n",
    "quit": "quit()\n",
    "os._exit": "import os\nos._exit(0)\n",
    "main guard": "import sys\ndef main():\n    return 0\nif __name__ == '__main__':\n    sys.exit(main())\n",
    "unittest guard": "import unittest\nclass T(unittest.TestCase):\n    def test_ok(self):\n        pass\n"
    "if __name__ == '__main__':\n    unittest.main()\n",
    "unittest": "import unittest\nclass T(unittest.TestCase):\n    def test_ok(self):\n        pass\n"
    "unittest.main()\n",
    "atexit": "import atexit, os\natexit.register(lambda: os._exit(0))\n",
    "rebound exec": "import builtins\nbuiltins.exec = lambda *a, **k: None\n",
}


@pytest.mark.parametrize("cheat", list(EARLY_EXITS))
def test_mbpp_wrong_code_that_exits_early_fails(cheat):
    assert mbpp_pass(WRONG_ADD + EARLY_EXITS[cheat], ADD_TESTS) == 0.0


def test_mbpp_correct_code_passes_and_its_main_block_is_skipped():
    assert mbpp_pass(RIGHT_ADD, ADD_TESTS) == 1.0
    for cheat in ("main guard", "unittest guard"):
        assert mbpp_pass(RIGHT_ADD + EARLY_EXITS[cheat], ADD_TESTS) == 1.0
    # A demo under the guard that would fail (or wait for input) does not run either.
    assert mbpp_pass(RIGHT_ADD + "if __name__ == '__main__':\n    input()\n    raise SystemExit(1)\n",
                     ADD_TESTS) == 1.0
    # A lingering thread does not hold a finished run until its timeout.
    lingering = "import threading, time\nthreading.Thread(target=time.sleep, args=(60,)).start()\n"
    assert mbpp_pass(lingering + RIGHT_ADD, ADD_TESTS, timeout=5) == 1.0


def test_sandbox_ok_needs_the_program_to_reach_its_end():
    res = run_sandboxed("print('started')\nimport sys\nsys.exit(0)\n", timeout=5)
    assert res.returncode == 0 and res.stdout == "started\n"
    assert not res.completed and not res.ok
    res = run_sandboxed("print('done')\n", timeout=5)
    assert res.completed and res.ok
    res = run_sandboxed("import os\nopen('_done', 'w').write('0' * 32)\nos._exit(0)\n", timeout=5)
    assert not res.completed and not res.ok  # the token is not guessable in advance


def test_score_many_mbpp_in_order(mbpp_rows):
    rows = [
        {"completion": r["code"], "tests": np.array(r["test_list"], dtype=object), "test_setup": ""}
        for r in mbpp_rows
    ]
    preds = [mbpp_rows[0]["code"], mbpp_rows[0]["code"], mbpp_rows[2]["code"]]
    assert score_many("mbpp_pass", preds, rows, workers=2) == [1.0, 0.0, 1.0]
    with pytest.raises(ValueError):
        score_many("mbpp_pass", preds[:2], rows)


def test_sandbox_infinite_loop_times_out():
    res = run_sandboxed("while True:\n    pass\n", timeout=2)
    assert res.timed_out and not res.ok
    assert mbpp_pass("def f():\n    while True:\n        pass\n", ["assert f() == 1"], timeout=1) == 0.0


def test_sandbox_network_disabled():
    code = (
        "import socket, urllib.request\n"
        "for attempt in (lambda: socket.create_connection(('1.1.1.1', 80), timeout=1),\n"
        "                lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM),\n"
        "                lambda: urllib.request.urlopen('http://example.com', timeout=1)):\n"
        "    try:\n"
        "        attempt()\n"
        "    except OSError as exc:\n"
        "        print('blocked:', exc)\n"
        "    else:\n"
        "        raise SystemExit('network reachable')\n"
    )
    res = run_sandboxed(code, timeout=5)
    assert res.ok, res.stderr
    assert res.stdout.count(NETWORK_ERROR) == 3


def test_sandbox_memory_bomb_stopped():
    res = run_sandboxed("x = bytearray(8 * 1024 ** 3)\n", timeout=5)
    assert not res.ok and not res.timed_out
    assert "MemoryError" in res.stderr
    # growing allocations stop at the address-space limit, long before the timeout
    res = run_sandboxed("chunks = [bytes(64 << 20) for _ in range(256)]\n", timeout=5)
    assert not res.ok and not res.timed_out
    assert "MemoryError" in res.stderr


def test_sandbox_isolation(monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    code = "import os, sys\nprint(os.getcwd())\nprint(sorted(os.environ))\nprint(sys.flags.isolated)\n"
    res = run_sandboxed(code, timeout=5)
    assert res.ok, res.stderr
    cwd, env_keys, isolated = res.stdout.splitlines()
    assert "tasc-sandbox-" in cwd and not Path(cwd).exists()  # fresh dir, removed afterwards
    assert "PROXY" not in env_keys.upper()
    assert isolated == "1"
    assert run_sandboxed("import sys\nsys.exit(3)\n", timeout=5).returncode == 3
