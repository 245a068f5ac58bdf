from __future__ import annotations

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
