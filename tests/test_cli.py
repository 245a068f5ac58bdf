from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tasc.cli import app

TASC = str(Path(sys.executable).parent / "tasc")


def test_help_lists_the_commands():
    res = CliRunner().invoke(app, ["--help"])
    assert res.exit_code == 0
    for cmd in ("ingest", "ngrams", "harvest", "draft", "bench", "generate", "pipeline", "promote", "rollback"):
        assert cmd in res.output


@pytest.mark.slow  # starts its own Prefect API server: 6 s idle, a minute on a busy machine
def test_ingest_command_reports_rows():
    # A real process, as a user runs it (its own ephemeral Prefect API, the session's state folder).
    res = subprocess.run([TASC, "ingest", "prompt-completion"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "rows:" in res.stdout and "corpus:" in res.stdout


def test_bad_spec_fails_with_a_clear_message(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nsource: {reader: nope, paths: [a.jsonl]}\n")
    res = subprocess.run([TASC, "ingest", str(bad)], capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    assert "source.reader" in (res.stdout + res.stderr)


@pytest.mark.slow  # two real processes, each with its own Prefect API server
def test_bad_rows_end_with_the_whole_message_and_no_traceback(tmp_path):
    # The run fails inside a Prefect task: Prefect's console logs keep to one line a record,
    # and the command's error names the file, line and field and says what to do.
    (tmp_path / "data.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c"}\n')
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: badrows\nsource: {reader: jsonl, paths: [data.jsonl]}\nshape: prompt_completion\n"
                    "metric: exact_match\n")
    res = subprocess.run([TASC, "ingest", str(spec)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 1
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    error = res.stderr[res.stderr.index("error: "):]
    assert "data.jsonl:2 completion: missing field" in error and "on_bad_rows: skip" in error
    shown = subprocess.run([TASC, "ingest", str(spec)], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "TASC_TRACEBACK": "1"})
    assert shown.returncode == 1 and "Traceback" in shown.stderr and "IngestError" in shown.stderr
