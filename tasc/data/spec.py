"""Task specs: one small YAML file describes a task.

A spec names its data sources and reader, how a record becomes a prompt and a completion,
the metric, the generation limits and the split rule. Paths may use ``${VAR}`` or
``${VAR:-default}``; ``TASC_DATA_DIR`` defaults to ``<repo>/../shared/datasets``. Relative
paths are taken from the spec file's folder.

Example::

    name: snips
    source:
      reader: snips                 # jsonl | json | csv | parquet | hf | snips | squad
      paths: ["${TASC_DATA_DIR}/snips/train/*.json"]
      encoding: utf-8
      errors: strict                # strict | replace | ignore | backslashreplace
    shape: template                 # prompt_completion | messages | template
    prompt_template: "Parse: {utterance}"
    completion_template: "{json}"
    extras: {answers: answer}       # output column -> record field, kept in the corpus
    metric: json_fields
    generation: {max_new_tokens: 96, stop: []}
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

READERS = ("jsonl", "json", "csv", "parquet", "hf", "snips", "squad")
SHAPES = ("prompt_completion", "messages", "template")
METRICS = ("exact_match", "f1", "json_fields", "chrf", "mbpp_pass")
ERROR_MODES = ("strict", "replace", "ignore", "backslashreplace")
BAD_ROW_POLICIES = ("fail", "skip")

REPO_ROOT = Path(__file__).resolve().parents[2]
SPECS_DIR = REPO_ROOT / "specs"


class SpecError(ValueError):
    """A spec file that cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class Source:
    reader: str
    paths: tuple[str, ...]  # expanded: env vars substituted, relative paths resolved
    encoding: str = "utf-8"
    errors: str = "strict"
    hf_split: str | None = None  # for reader "hf": the dataset split to read
    json_path: str | None = None  # for reader "json": dotted path to the list of records
    prompt_field: str = "prompt"  # shape prompt_completion
    completion_field: str = "completion"
    messages_field: str = "messages"  # shape messages
    id_field: str | None = None  # default: a stable hash of the prompt and completion
    normalize_newlines: bool = False  # turn \r\n and \r into \n in prompts, completions, extras


@dataclass(frozen=True)
class Generation:
    max_new_tokens: int = 128
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class SplitRule:
    validation: float = 0.05
    test: float = 0.10
    seed: str = "tasc"


@dataclass(frozen=True)
class Limits:
    max_prompt_chars: int = 16000
    max_completion_chars: int = 8000


@dataclass(frozen=True)
class TaskSpec:
    name: str
    path: Path | None
    source: Source
    shape: str = "prompt_completion"
    prompt_template: str | None = None
    completion_template: str | None = None
    system_prompt: str | None = None
    chat_template: bool = True
    extras: dict[str, str] = field(default_factory=dict)
    metric: str = "exact_match"
    generation: Generation = field(default_factory=Generation)
    split: SplitRule = field(default_factory=SplitRule)
    limits: Limits = field(default_factory=Limits)
    on_bad_rows: str = "fail"
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path) if self.path else None
        return d

    def hash(self) -> str:
        """Content hash of everything that shapes the corpus (not the file's location)."""
        d = self.to_dict()
        d.pop("path")
        d.pop("description")
        blob = json.dumps(d, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def default_data_dir() -> Path:
    return Path(os.environ.get("TASC_DATA_DIR") or (REPO_ROOT.parent / "shared" / "datasets"))


def expand_path(raw: str, base: Path | None) -> str:
    """Substitute ``${VAR}`` / ``${VAR:-default}`` and resolve relative to ``base``."""

    def sub(m: re.Match) -> str:
        name, default = m.group(1), m.group(2)
        if name == "TASC_DATA_DIR":
            return os.environ.get(name) or str(default_data_dir())
        val = os.environ.get(name, default)
        if val is None:
            raise SpecError(f"environment variable {name} is not set (used in path {raw!r})")
        return val

    out = _VAR.sub(sub, raw)
    if "://" in out or (base is None) or os.path.isabs(out):
        return out
    return str((base / out).resolve())


def _check(value: Any, allowed: tuple[str, ...], where: str, key: str) -> None:
    if value not in allowed:
        raise SpecError(f"{where}: '{key}' must be one of {', '.join(allowed)}; got {value!r}")


def bad_row_policy(spec: TaskSpec, policy: str | None = None) -> str:
    """The bad-row policy an ingest runs under: ``policy`` when given, else the spec's.
    Checked before anything is looked up, since the policy is part of the corpus version."""
    if policy is not None and policy not in BAD_ROW_POLICIES:
        raise SpecError(f"bad-row policy {policy!r} is not one of {', '.join(BAD_ROW_POLICIES)}; "
                        f"pass --policy {' or --policy '.join(BAD_ROW_POLICIES)}, or leave it out for the "
                        f"spec's on_bad_rows ({spec.on_bad_rows})")
    return policy or spec.on_bad_rows


def resolve_spec_path(spec: str | Path) -> Path:
    """A spec given by path, or by short name from the shipped ``specs/`` folder."""
    p = Path(spec)
    if p.exists():
        return p
    for cand in (SPECS_DIR / f"{spec}.yaml", SPECS_DIR / f"{spec}.yml"):
        if cand.exists():
            return cand
    shipped = ", ".join(sorted(x.stem for x in SPECS_DIR.glob("*.yaml")))
    raise SpecError(f"no spec file {spec!r}; shipped specs: {shipped}")


def load_spec(spec: str | Path) -> TaskSpec:
    """The task spec named ``spec`` (a shipped spec's name or a YAML path), parsed and checked."""
    path = resolve_spec_path(spec)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: a spec is a mapping of keys; got {type(raw).__name__}")
    return parse_spec(raw, path)


def parse_spec(raw: dict[str, Any], path: Path | None = None) -> TaskSpec:
    where = str(path) if path else "<spec>"
    known = {f for f in TaskSpec.__dataclass_fields__} - {"path"}
    unknown = set(raw) - known
    if unknown:
        raise SpecError(f"{where}: unknown key(s) {sorted(unknown)}; known: {sorted(known)}")
    for key in ("name", "source"):
        if key not in raw:
            raise SpecError(f"{where}: missing required key '{key}'")
    src = dict(raw["source"])
    _check(src.get("reader"), READERS, where, "source.reader")
    _check(src.get("errors", "strict"), ERROR_MODES, where, "source.errors")
    paths = src.get("paths") or ([src["path"]] if "path" in src else [])
    src.pop("path", None)
    if isinstance(paths, str):
        paths = [paths]
    if not paths:
        raise SpecError(f"{where}: 'source.paths' lists no files or dataset ids")
    base = path.parent.resolve() if path else None
    src["paths"] = tuple(expand_path(p, base) for p in paths)
    try:
        source = Source(**src)
    except TypeError as e:
        raise SpecError(f"{where}: bad 'source' keys: {e}") from e
    shape = raw.get("shape", "prompt_completion")
    _check(shape, SHAPES, where, "shape")
    if shape == "template" and not (raw.get("prompt_template") and raw.get("completion_template")):
        raise SpecError(f"{where}: shape 'template' needs both 'prompt_template' and 'completion_template'")
    metric = raw.get("metric", "exact_match")
    _check(metric, METRICS, where, "metric")
    policy = raw.get("on_bad_rows", "fail")
    _check(policy, BAD_ROW_POLICIES, where, "on_bad_rows")
    gen = dict(raw.get("generation") or {})
    gen["stop"] = tuple(gen.get("stop") or ())
    try:
        return TaskSpec(
            name=str(raw["name"]),
            path=path,
            source=source,
            shape=shape,
            prompt_template=raw.get("prompt_template"),
            completion_template=raw.get("completion_template"),
            system_prompt=raw.get("system_prompt"),
            chat_template=bool(raw.get("chat_template", True)),
            extras=dict(raw.get("extras") or {}),
            metric=metric,
            generation=Generation(**gen),
            split=SplitRule(**(raw.get("split") or {})),
            limits=Limits(**(raw.get("limits") or {})),
            on_bad_rows=policy,
            description=str(raw.get("description", "")),
        )
    except TypeError as e:
        raise SpecError(f"{where}: {e}") from e
