from __future__ import annotations

from typer.testing import CliRunner

from tasc.cli import app


def test_help_lists_the_commands():
    res = CliRunner().invoke(app, ["--help"])
    assert res.exit_code == 0
    for cmd in ("ingest", "ngrams", "harvest", "draft", "bench", "generate", "pipeline"):
        assert cmd in res.output


def test_ingest_command_reports_rows(prefect_harness):
    res = CliRunner().invoke(app, ["ingest", "prompt-completion"])
    assert res.exit_code == 0, res.output
    assert "rows:" in res.output and "corpus:" in res.output
