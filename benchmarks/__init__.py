"""Benchmarks: side-by-side measurements run by hand (not part of the test suite)."""

from __future__ import annotations

import json


def save_report(report: dict, path: str | None) -> None:
    """Write ``report`` as indented JSON to ``path`` (the scripts' ``--json``), if one is given."""
    if path:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
