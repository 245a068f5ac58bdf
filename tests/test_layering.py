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


def _module_graph(folder: str) -> dict[str, set[str]]:
    """Package-internal import edges of ``folder``, every import counted (function-level and
    TYPE_CHECKING ones too: a cycle through either still couples the modules)."""
    files = {".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): f
             for f in (ROOT / folder).rglob("*.py")}
    graph = {m: set() for m in files}
    for mod, f in files.items():
        pkg = mod if f.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in files:
                    t = t.rpartition(".")[0]
                # A module importing its own package's __init__ is not an edge back.
                if t and t != mod and not mod.startswith(t + "."):
                    graph[mod].add(t)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the stack, 2 done

    def visit(m, path):
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return path[path.index(n):] + [n] if n in path else [m, n]
            if n not in state and (found := visit(n, path + [n])):
                return found
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m, [m])):
            return found
    return None


def test_no_import_cycles():
    for folder in ("tasc", "storage", "tasks", "flows"):
        cycle = _cycle(_module_graph(folder))
        assert cycle is None, f"import cycle in {folder}/: {' -> '.join(cycle)}"


def test_cycle_check_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_core_is_grouped_by_stage():
    top = sorted(p.name for p in (ROOT / "tasc").iterdir() if p.name != "__pycache__")
    assert len(top) <= 11, top
    for stage in ("data", "ngrams", "ft", "train", "decode", "accel", "eval"):
        assert (ROOT / "tasc" / stage / "__init__.py").exists(), stage
