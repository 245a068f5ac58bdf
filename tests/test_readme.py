"""The README's code blocks, for real: every fenced block is checked by a test here.

* ``bash`` blocks: every command line is a real command. ``tasc ...`` lines are parsed by the
  CLI itself (unknown commands, options or missing arguments fail), their spec names and
  benchmark methods resolved; ``make X`` names a Makefile target whose recipe runs what the
  README says; ``python -m benchmarks.run ...`` is parsed by its own parser.
* ``python`` blocks are executed: the Python API one on the tiny test model, the registry
  consumer one against a tiny model registered as ``tasc-snips@champion`` in the test
  session's own MLflow store.
* the plain block (the layout) names folders and files that exist.

The ``tasc`` lines of the ``bash`` blocks in docs/ are parsed the same way, and every relative
link in the README and docs/ points to a file (and heading) that exists.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import typer.main

from tasc.cli import app

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
FENCE = re.compile(r"^```([\w-]*)\n(.*?)^```", re.S | re.M)
DEFAULT_MODEL = "smollm2-135m-instruct"


def blocks(path: Path) -> list[tuple[str, str]]:
    """(language, code) of every fenced block, in order."""
    return FENCE.findall(path.read_text(encoding="utf-8"))


def readme_blocks(lang: str) -> list[str]:
    return [code for kind, code in blocks(README) if kind == lang]


def command_lines(code: str) -> list[str]:
    """Logical lines (backslash continuations joined), comments and blanks left out."""
    joined = re.sub(r"\\\n\s*", " ", code)
    out = []
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        if words:
            out.append(line.strip())
    return out


# ---------------------------------------------------------------- command checks


def check_tasc(args: list[str]) -> None:
    """Parse ``tasc ARGS`` with the real CLI, without running the command."""
    group = typer.main.get_command(app)
    assert args, "a bare `tasc`"
    name, rest = args[0], args[1:]
    assert name in group.commands, f"`tasc {name}` is not a command; commands: {sorted(group.commands)}"
    cmd = group.commands[name]
    ctx = cmd.make_context(name, list(rest))  # raises click.UsageError on bad options or arguments
    params = ctx.params
    if params.get("spec"):
        from tasc.data.spec import resolve_spec_path

        resolve_spec_path(params["spec"])
    if params.get("task"):
        from tasc.data.spec import resolve_spec_path

        resolve_spec_path(params["task"])
    if params.get("methods"):
        check_methods(params["methods"])


def check_methods(methods: str) -> None:
    from tasc.eval.methods import METHOD_NAMES

    for m in methods.split(","):
        assert m.split("@")[0] in METHOD_NAMES, f"unknown benchmark method {m!r}"


def check_benchmarks_run(args: list[str]) -> None:
    from benchmarks.run import build_parser

    ns = build_parser().parse_args(args)
    check_methods(ns.methods)
    from tasc.data.spec import resolve_spec_path

    for spec in ns.specs:
        resolve_spec_path(spec)


def makefile_recipe(target: str) -> str:
    """What `make -n TARGET` would run (a dry run: nothing is executed)."""
    res = subprocess.run(["make", "-n", "-C", str(ROOT), target], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, f"make has no target {target!r}: {res.stderr}"
    return res.stdout


MAKE_RUNS = {"demo": "tasc pipeline snips", "test": "pytest", "bench": "-m benchmarks.run snips"}


def check_readme_line(line: str) -> None:
    words = shlex.split(line, comments=True)
    if words[0] == "tasc":
        check_tasc(words[1:])
    elif words[0] == "make":
        assert len(words) == 2 and words[1] in MAKE_RUNS, f"README runs `{line}`; say here what it must run"
        assert MAKE_RUNS[words[1]] in makefile_recipe(words[1])
    elif words[:3] == ["python", "-m", "benchmarks.run"]:
        check_benchmarks_run(words[3:])
    elif words[0] == "source":
        assert words[1:] == [".venv/bin/activate"]
        assert re.search(r"^VENV := \.venv$", (ROOT / "Makefile").read_text(), re.M)
    else:
        pytest.fail(f"README bash line not checked by any test: {line!r}")


# ---------------------------------------------------------------- README bash blocks


def test_readme_has_only_checked_kinds_of_blocks():
    kinds = [kind for kind, _ in blocks(README)]
    assert set(kinds) <= {"bash", "python", ""}, kinds
    assert kinds.count("python") == 2  # the Python API and the registry consumer, both run below


@pytest.mark.parametrize("line", [ln for code in readme_blocks("bash") for ln in command_lines(code)])
def test_readme_bash_line_is_a_real_command(line):
    check_readme_line(line)


def test_readme_two_commands_block():
    first = readme_blocks("bash")[0]
    assert [shlex.split(ln, comments=True) for ln in command_lines(first)] == [["make", "demo"], ["make", "test"]]


def test_benchmarks_run_help(capsys):
    from benchmarks.run import build_parser

    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["--help"])
    assert e.value.code == 0
    assert "--limit" in capsys.readouterr().out
    defaults = build_parser().parse_args([])
    assert defaults.specs == ["snips"] and defaults.limit == 20 and defaults.dtype == "auto"


# ---------------------------------------------------------------- docs bash blocks

DOC_PREFIXES = ("tasc ", "torchrun ", "accelerate ", "python -m benchmarks.")


def doc_tasc_lines() -> list[tuple[str, str]]:
    out = []
    for doc in DOCS:
        for kind, code in blocks(doc):
            if kind != "bash":
                continue
            for line in re.sub(r"\\\n\s*", " ", code).splitlines():
                if line.strip().startswith(DOC_PREFIXES):
                    out.append((doc.name, line.strip()))
    return out


@pytest.mark.parametrize("doc,line", doc_tasc_lines())
def test_docs_tasc_line_is_a_real_command(doc, line):
    words = shlex.split(line, comments=True)
    if words[0] == "tasc":
        check_tasc(words[1:])
    elif words[0] in ("torchrun", "accelerate"):
        i = words.index("-m")
        assert words[i + 1] == "tasc.cli"
        check_tasc(words[i + 2 :])
    elif words[2] == "benchmarks.run":
        check_benchmarks_run(words[3:])
    else:
        assert importlib.util.find_spec(words[2]) is not None, f"{doc}: no module {words[2]}"


# ---------------------------------------------------------------- README python blocks


def api_block() -> str:
    (code,) = [c for c in readme_blocks("python") if "mlflow" not in c]
    return code


def registry_block() -> str:
    (code,) = [c for c in readme_blocks("python") if "mlflow.pyfunc.load_model" in c]
    return code


def run_block(code: str, name: str) -> tuple[dict, str]:
    namespace: dict = {"__name__": name}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, f"README.md ({name})", "exec"), namespace)
    return namespace, out.getvalue()


def test_readme_python_api_runs(tiny_model_dir):
    code = api_block()
    assert code.count(f'"{DEFAULT_MODEL}"') == 1
    # The same code on the tiny test model instead of SmolLM2 (its assert checks losslessness).
    ns, printed = run_block(code.replace(f'"{DEFAULT_MODEL}"', repr(str(tiny_model_dir))), "python-api")
    assert ns["fast"][0].text == ns["plain"][0].text
    assert ns["fast"][0].stats.forward_passes <= ns["plain"][0].stats.forward_passes
    assert printed.strip()


@pytest.fixture(scope="module")
def snips_champion(tiny_model_dir, tmp_path_factory):
    """The tiny model with a small text draft, registered as ``tasc-snips`` and promoted."""
    from storage import registry
    from storage.drafts import write_draft
    from storage.tracking import experiment_id
    from tasc.decode.draft import build_draft_corpus
    from tasc.eval.promotion import PromotionPolicy, Scorecard

    d = tmp_path_factory.mktemp("readme-registry")
    draft = write_draft(build_draft_corpus(references=['{"intent": "BookRestaurant", "slots": {}}'] * 3),
                        d / "draft.parquet")
    run_id = registry.client().create_run(experiment_id("tasc-snips")).info.run_id
    config = {"task": "snips", "system_prompt": None, "chat_template": True, "stop": [], "max_new_tokens": 16,
              "dtype": "float32"}
    uri = registry.log_pyfunc(run_id, str(tiny_model_dir), str(draft), config, ["Book a table for two"])
    registry.client().set_terminated(run_id)
    version = registry.register(uri, "snips", Scorecard(chars_per_s=1.0, metric=1.0))
    assert registry.promote("snips", version, PromotionPolicy()).promote
    assert registry.alias_version("snips", "champion") == version
    return version


@pytest.fixture(scope="module")
def registry_run(snips_champion):
    return run_block(registry_block(), "registry-consumer")


@pytest.mark.slow  # registers, logs and loads a pyfunc: about 20 s
def test_readme_registry_consumer_runs(registry_run):
    ns, printed = registry_run
    assert len(ns["answers"]) == 1 and isinstance(ns["answers"][0], str)
    assert printed == ns["answers"][0] + "\n"


@pytest.mark.slow  # registers, logs and loads a pyfunc: about 20 s
def test_readme_plain_list_remark_is_true(registry_run):
    # The README says a plain list of prompts works; keep it true.
    ns, _ = registry_run
    assert 'model.predict(["..."])' in README.read_text()
    out = ns["model"].predict(["Book a table for two in Paris tonight"], params={"max_new_tokens": 4})
    assert len(out) == 1 and isinstance(out[0], str)


# ---------------------------------------------------------------- the layout block, links, facts


def test_readme_layout_names_existing_paths():
    (layout,) = [code for kind, code in blocks(README) if kind == "" and "tasc/" in code]
    named = []
    for line in layout.splitlines():
        if line[:1].isspace():  # a description continued from the line above
            continue
        segments = re.split(r"\s{2,}", line.strip())
        named += segments[0::2]
    for path in named:
        assert (ROOT / path).exists(), f"README layout names {path}, which does not exist"
    packages = {p.parent.name for p in (ROOT / "tasc").glob("*/__init__.py")}
    listed = {p.strip("/").split("/")[1] for p in named if p.startswith("tasc/") and p.endswith("/")}
    assert packages == listed, f"tasc/ packages missing from the README layout: {packages - listed}"


def _anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    heads = re.findall(r"^#+\s+(.*)$", text, re.M)
    return {re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", h.strip().lower())) for h in heads}


@pytest.mark.parametrize("doc", [README, *DOCS], ids=lambda p: p.name)
def test_relative_links_resolve(doc):
    text = FENCE.sub("", doc.read_text(encoding="utf-8"))
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        file, _, anchor = target.partition("#")
        dest = (doc.parent / file).resolve() if file else doc
        assert dest.exists(), f"{doc.name}: link to {target} (no such file)"
        if anchor:
            assert anchor in _anchors(dest), f"{doc.name}: link to {target} (no such heading)"


def test_readme_front_door_facts():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 200
    assert "2602.24174" in text
    for doc in DOCS:
        assert f"docs/{doc.name}" in text, f"README does not link docs/{doc.name}"


def _table(text: str, first_header: str) -> dict[str, dict[str, str]]:
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(f"| {first_header} |"))
    head = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = {}
    for ln in lines[start + 2 :]:
        if not ln.startswith("|"):
            break
        cells = [c.strip() for c in ln.strip("|").split("|")]
        rows[cells[0]] = dict(zip(head, cells, strict=True))
    return rows


def test_readme_results_match_performance_doc():
    ours = _table(README.read_text(), "task (prompts)")
    theirs = _table((ROOT / "docs" / "performance.md").read_text(), "task (prompts)")
    assert set(ours) == {"SNIPS (20)", "MBPP (20)", "SQuAD (20)"} == set(theirs)
    for spec, row in ours.items():
        assert row == theirs[spec], spec
        speedup = float(row["TASC-spec"]) / float(row["llama.cpp"])
        assert speedup == pytest.approx(float(row["x llama.cpp"]), abs=0.01)
        assert row["identical to greedy"] == "1.00"


# ---------------------------------------------------------------- make bench, for real


@pytest.mark.slow
def test_benchmarks_run_on_the_tiny_model(prefect_harness, tiny_model_dir, capsys):
    from benchmarks.run import main

    (summary,) = main(["prompt-completion", "--model", str(tiny_model_dir), "--limit", "1", "--harvest-limit", "2",
                       "--methods", "greedy,tasc-spec"])
    out = capsys.readouterr().out
    assert "| greedy |" in out and "| tasc-spec |" in out
    assert f"report: {summary['paths']['json']}" in out
    assert summary["methods"]["tasc-spec"]["identical_to_greedy"] == 1.0
