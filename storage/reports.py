"""Benchmark reports on disk: JSON (stable keys), a Markdown table and a PNG chart; and the
summary as flat metrics for the tracking store."""

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


BENCH_KEYS = ("chars_per_s", "tokens_per_s", "latency_ms_p50", "latency_ms_p95", "forward_passes", "acceptance_rate",
              "mean_accepted_length", "metric", "identical_to_greedy", "tokens_per_completion", "propose_share")


def flat_bench_metrics(summary: dict) -> dict:
    """A benchmark summary as flat metric names, e.g. ``tasc-spec.chars_per_s``,
    ``speedup.pld`` and ``verify_cost.V4`` (the tracking store makes method names such as
    ``tasc-spec@max_len=24`` valid metric names)."""
    out = {f"{method}.{key}": entry.get(key) for method, entry in summary["methods"].items() for key in BENCH_KEYS}
    out.update({f"speedup.{method}": r for method, r in summary["speedup_vs_greedy"].items()})
    out.update({f"verify_cost.{k}": v for k, v in summary.get("verify_cost", {}).items()})
    return out
