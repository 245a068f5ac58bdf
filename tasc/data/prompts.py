"""How a corpus row becomes the text and the token ids the model sees.

Training, harvesting, benchmarking, serving and the command line all render prompts through
this one module, so a fine-tuned model is asked at inference exactly what it was trained on.
A row is a mapping with a ``prompt`` and, for chat corpora (spec shape ``messages``), a
``system`` message and the earlier turns as a ``messages`` JSON list; a plain string is a
row with only a prompt. With the chat template, the text is the template with a generation
prompt (system message, earlier turns, the prompt as the last user turn); without one (the
spec turns it off, or the tokenizer has none) it is the bare prompt.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

# A corpus row (``prompt`` plus optional ``system`` and ``messages``) or a bare prompt.
Row = Mapping[str, Any] | str


def _text(value: Any) -> str | None:
    # Missing values arrive as None or NaN from a DataFrame: only non-empty strings count.
    return value if isinstance(value, str) and value else None


def as_rows(rows: Any) -> list[Row]:
    """A list of rows from a DataFrame (its records), a sequence of mappings or of strings."""
    if hasattr(rows, "to_dict"):
        return rows.to_dict("records")
    return [r if isinstance(r, str) else dict(r) for r in rows]


def prompt_of(row: Row) -> str:
    return row if isinstance(row, str) else row["prompt"]


def chat_messages(row: Row, system_prompt: str | None = None) -> list[dict[str, str]]:
    """The chat turns before the answer: the row's ``system`` message (else ``system_prompt``,
    the spec's), the earlier turns of its ``messages`` column, then the prompt as user turn."""
    if isinstance(row, str):
        row = {"prompt": row}
    system = _text(row.get("system")) or system_prompt
    turns = [{"role": "system", "content": system}] if system else []
    earlier = row.get("messages")
    if isinstance(earlier, str):
        earlier = json.loads(earlier) if earlier else []
    turns += [dict(t) for t in earlier] if isinstance(earlier, (list, tuple)) else []
    return turns + [{"role": "user", "content": row["prompt"]}]


def uses_chat_template(tokenizer, chat_template: bool = True) -> bool:
    """Whether prompts are rendered with the chat template: asked for, and the tokenizer has one."""
    return bool(chat_template and getattr(tokenizer, "chat_template", None))


def render_prompt(tokenizer, row: Row, system_prompt: str | None = None, chat_template: bool = True) -> str:
    """The exact text fed to the model before its answer (see the module docstring)."""
    if not uses_chat_template(tokenizer, chat_template):
        return prompt_of(row)
    return tokenizer.apply_chat_template(chat_messages(row, system_prompt), tokenize=False, add_generation_prompt=True)


def encode_prompts(tokenizer, rows: Sequence[Row], system_prompt: str | None = None,
                   chat_template: bool = True) -> list[list[int]]:
    """The prompt ids of each row, as rendered by :func:`render_prompt`."""
    texts = [render_prompt(tokenizer, r, system_prompt, chat_template) for r in rows]
    if not texts:
        return []
    # The chat template already holds any special tokens the model expects; a bare prompt
    # gets the tokenizer's own (e.g. a BOS), as in the model's pretraining.
    return tokenizer(texts, add_special_tokens=not uses_chat_template(tokenizer, chat_template))["input_ids"]
