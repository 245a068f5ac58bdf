"""The core stays free of orchestration and registry code; dependencies point one way."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _imports(folder: str) -> dict[str, set[str]]:
    found = {}
    for f in (ROOT / folder).rglob("*.py"):
        mods = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                mods |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                mods.add(node.module.split(".")[0])
        found[str(f.relative_to(ROOT))] = mods
    return found


def test_core_imports_neither_prefect_nor_mlflow():
    bad = {f: m & {"prefect", "mlflow"} for f, m in _imports("tasc").items() if m & {"prefect", "mlflow"}}
    assert not bad, f"tasc/ must not import prefect or mlflow: {bad}"


def test_core_does_not_import_outer_layers_except_the_cli():
    bad = {f: m & {"flows", "tasks", "storage"} for f, m in _imports("tasc").items()
           if m & {"flows", "tasks", "storage"} and not f.endswith("cli.py")}
    assert not bad, f"tasc/ must not import flows/tasks/storage: {bad}"


def test_storage_and_tasks_do_not_import_flows():
    for folder in ("storage", "tasks"):
        bad = {f: m for f, m in _imports(folder).items() if "flows" in m}
        assert not bad, f"{folder}/ must not import flows: {bad}"


def test_mlflow_only_in_storage():
    for folder in ("tasks", "flows", "tasc"):
        bad = [f for f, m in _imports(folder).items() if "mlflow" in m]
        assert not bad, f"only storage/ touches MLflow: {bad}"
