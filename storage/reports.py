"""Benchmark reports on disk: JSON (stable keys), a Markdown table and a PNG chart."""

from __future__ import annotations

import json
from pathlib import Path

from storage.settings import reports_dir
from tasc.eval.harness import markdown_table, plot_report


def report_dir(task: str, stamp: str) -> Path:
    return reports_dir() / task / stamp


def write_report(report: dict, out_dir: str | Path, json_path: str | Path | None = None) -> dict[str, str]:
    """Write report.json, report.md and report.png; also ``json_path`` when the user named one."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "markdown": out / "report.md", "chart": out / "report.png"}
    text = json.dumps(report, indent=2, default=str)
    paths["json"].write_text(text)
    paths["markdown"].write_text(markdown_table(report))
    plot_report(report, str(paths["chart"]))
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(text)
        paths["user_json"] = Path(json_path)
    return {k: str(v) for k, v in paths.items()}
