"""One source record -> one corpus row: shaped per ``spec.shape`` (``prompt_completion``,
``messages`` or ``template``), newlines normalised, its texts checked against the spec's limits,
and its id taken from ``id_field`` or hashed from its text. A record that cannot become a row
raises :class:`BadRow` naming the field at fault (tasc.data.ingest collects them)."""

from __future__ import annotations

import hashlib
import json
import re
import string
from typing import Any

from tasc.data.readers import RawRecord
from tasc.data.spec import TaskSpec

FORMATTER = string.Formatter()


class BadRow(Exception):
    """One record that cannot become a corpus row: the field at fault and why."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field, self.reason = field, reason


def _text(fields: dict[str, Any], name: str) -> str:
    """A record field that must be text."""
    if fields.get(name) is None:
        raise BadRow(name, "missing field")
    value = fields[name]
    if not isinstance(value, str):
        raise BadRow(name, f"expected text, got {type(value).__name__}")
    return value


def _render(template: str, fields: dict[str, Any]) -> str:
    """``str.format_map`` over the record, after checking every placeholder resolves to text."""
    for _, name, _, _ in FORMATTER.parse(template):
        if name is None:
            continue
        root = re.split(r"[.\[]", name, maxsplit=1)[0]
        if fields.get(root) is None:
            raise BadRow(root, "missing field")
        try:
            value, _ = FORMATTER.get_field(name, (), fields)
        except (LookupError, AttributeError, TypeError) as e:
            raise BadRow(name, f"cannot resolve {{{name}}}: {type(e).__name__}: {e}") from None
        if value is None or isinstance(value, (dict, list, tuple)):
            raise BadRow(name, f"expected text, got {type(value).__name__}")
    return template.format_map(fields)


def _chat_turns(msgs: Any, name: str) -> list[dict[str, str]]:
    """A validated list of ``{role, content}`` turns."""
    if not isinstance(msgs, list) or not msgs:
        raise BadRow(name, f"expected a non-empty list of messages, got {type(msgs).__name__}")
    turns = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadRow(f"{name}[{i}]", "expected an object with a 'role' and a 'content'")
        if not isinstance(m.get("content"), str):
            raise BadRow(f"{name}[{i}].content", f"expected text, got {type(m.get('content')).__name__}")
        turns.append({"role": m["role"], "content": m["content"]})
    return turns


def _shape_messages(fields: dict[str, Any], spec: TaskSpec) -> dict[str, Any]:
    name = spec.source.messages_field
    if fields.get(name) is None:
        raise BadRow(name, "missing field")
    turns = _chat_turns(fields[name], name)
    system = [t["content"] for t in turns if t["role"] == "system"]
    chat = [t for t in turns if t["role"] != "system"]
    if not chat or chat[-1]["role"] != "assistant":
        raise BadRow(name, "the last message must be the assistant's (the completion)")
    if len(chat) < 2 or chat[-2]["role"] != "user":
        raise BadRow(name, "the assistant's last message must follow a user message (the prompt)")
    return {
        "prompt": chat[-2]["content"],
        "completion": chat[-1]["content"],
        "system": "\n\n".join(system) if system else spec.system_prompt,
        "messages": json.dumps(chat[:-2], ensure_ascii=False),  # earlier turns
    }


def _shape(fields: dict[str, Any], spec: TaskSpec) -> dict[str, Any]:
    """The prompt and completion (and chat columns) of one record, per ``spec.shape``."""
    if spec.shape == "messages":
        return _shape_messages(fields, spec)
    if spec.shape == "template":
        return {
            "prompt": _render(spec.prompt_template or "", fields),
            "completion": _render(spec.completion_template or "", fields),
        }
    src = spec.source
    return {"prompt": _text(fields, src.prompt_field), "completion": _text(fields, src.completion_field)}


def _normalize(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace("\r\n", "\n").replace("\r", "\n")
    if isinstance(value, list):
        return [_normalize(v) for v in value]
    return value


def _labels(spec: TaskSpec) -> tuple[str, str]:
    """How bad rows name the prompt and the completion: the record field where there is one."""
    if spec.shape == "prompt_completion":
        return spec.source.prompt_field, spec.source.completion_field
    if spec.shape == "messages":
        return spec.source.messages_field, spec.source.messages_field
    return "prompt", "completion"


def _check_texts(row: dict[str, Any], spec: TaskSpec) -> None:
    plabel, clabel = _labels(spec)
    if not row["prompt"].strip():
        raise BadRow(plabel, "empty prompt")
    if not row["completion"].strip():
        raise BadRow(clabel, "empty completion")
    for key, label, limit, setting in (
        ("prompt", plabel, spec.limits.max_prompt_chars, "max_prompt_chars"),
        ("completion", clabel, spec.limits.max_completion_chars, "max_completion_chars"),
    ):
        if len(row[key]) > limit:
            raise BadRow(label, f"{key} too long: {len(row[key])} characters > limits.{setting} ({limit})")


def hash_id(row: dict[str, Any]) -> str:
    """A stable id from the row's text (prompt, completion and any chat context)."""
    blob = json.dumps([row.get("system"), row.get("messages"), row["prompt"], row["completion"]])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _row_id(fields: dict[str, Any], row: dict[str, Any], spec: TaskSpec) -> str:
    name = spec.source.id_field
    if not name:
        return hash_id(row)
    value = fields.get(name)
    if value is None or isinstance(value, (dict, list)) or not str(value).strip():
        raise BadRow(name, "missing field (id_field)" if value is None else "not usable as an id")
    return str(value)


def build_row(rec: RawRecord, spec: TaskSpec) -> dict[str, Any]:
    """One corpus row from a record (without its split); raises :class:`BadRow`."""
    if rec.problem is not None:
        raise BadRow("(record)", rec.problem)
    row = _shape(rec.fields, spec)
    for column, name in spec.extras.items():
        if name not in rec.fields:
            raise BadRow(name, "missing field (extras)")
        row[column] = rec.fields[name]
    if spec.source.normalize_newlines:
        row = {k: _normalize(v) for k, v in row.items()}
    _check_texts(row, spec)
    row["id"] = _row_id(rec.fields, row, spec)
    row["source"], row["line"] = rec.source, rec.line
    return row
