"""The registered tasc model (MLflow models-from-code): model, tokenizer and draft in one pyfunc.

Artifacts: ``model`` (a Hugging Face folder with the tokenizer), ``draft`` (the text draft,
Parquet), ``config`` (JSON: system prompt, chat template flag, stop strings, dtype,
generation limit), and ``gguf`` where the model came from a GGUF file (decoding runs on its
blocks, as benchmarked). ``predict`` takes a DataFrame with a ``prompt`` column and, for chat
tasks, optional ``system`` and ``messages`` (earlier turns, a JSON list) columns, rendered
as in training (tasc.data.prompts); or a list of prompt strings. Params: ``max_new_tokens``,
``method`` (greedy | tasc-spec) and ``temperature``. It returns one generated string per row.

Inputs are checked here, before any decoding, since a served model takes whatever a client
sends: an empty input gives an empty list; a missing or non-text prompt, or bad ``system`` or
``messages`` values, fail with a ValueError naming the row; ``max_new_tokens`` must be a whole
number from 1 to the model's context, and each prompt's tokens plus it must fit that context
(tasc.decode.engine.check_fits), so an overlong prompt fails at once instead of running for
minutes. The logged signature declares no input schema (params only): MLflow refuses a list
of strings against named columns and drops columns outside an unnamed one, so the checks
here take the place of its schema enforcement.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import mlflow
import numpy as np
import pandas as pd

# The max_new_tokens ceiling for a model whose config names no context length.
NO_CONTEXT_CAP = 32768


class TascModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from storage.drafts import read_draft
        from tasc.decode.draft import BoundDraft
        from tasc.decode.engine import measure_verify_cost
        from tasc.models import load_model

        with open(context.artifacts["config"]) as f:
            self.config = json.load(f)
        self.lm = load_model(context.artifacts["model"], dtype=self.config.get("dtype", "auto"), kernels="auto",
                             gguf=context.artifacts.get("gguf"))
        draft = read_draft(context.artifacts["draft"])
        self.draft = BoundDraft.from_corpus(draft, self.lm.tokenizer)
        # The verify-cost table depends on the serving hardware, so it is measured here.
        self.cost = measure_verify_cost(self.lm.model, reps=2)

    def predict(self, context, model_input, params=None):
        from tasc.decode.engine import DecodeConfig, context_length, generate

        params = params or {}
        rows = input_rows(model_input)
        budget = new_token_budget(params.get("max_new_tokens"), self.config.get("max_new_tokens", 128),
                                  context_length(self.lm.model))
        if not rows:
            return []
        cfg = DecodeConfig(
            max_new_tokens=budget,
            stop=tuple(self.config.get("stop", ())),
            temperature=float(params.get("temperature") or 0.0),
        )
        outs = generate(self.lm.model, self.lm.tokenizer, rows, self.draft, params.get("method") or "tasc-spec",
                        cfg, self.config.get("system_prompt"), self.config.get("chat_template", True), cost=self.cost)
        return [o.text for o in outs]


def new_token_budget(value, default: int, context: int | None) -> int:
    """The ``max_new_tokens`` param, checked: None takes the config's ``default``; else a whole
    number from 1 to the model's ``context`` (or NO_CONTEXT_CAP when the model names none)."""
    if value is None:
        return int(default)
    top = context or NO_CONTEXT_CAP
    whole = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if not whole or not 1 <= value <= top:
        raise ValueError(f"max_new_tokens must be a whole number from 1 to {top} (the model's context); got {value!r}")
    return int(value)


def _missing(value) -> bool:
    # None, NaN or pd.NA: how a DataFrame shows a row without a value in a column.
    return value is None or (not isinstance(value, (str, list, tuple, dict, np.ndarray)) and bool(pd.isna(value)))


def _checked(i: int, row) -> dict | str:
    """One row, or a ValueError naming it (row ``i``) and the field at fault."""
    if isinstance(row, str):
        return row
    if not isinstance(row, Mapping):
        row = {"prompt": row}  # an item of a list of prompts
    prompt = row.get("prompt")
    if not isinstance(prompt, str):
        got = "no value" if _missing(prompt) else type(prompt).__name__
        raise ValueError(f"row {i}: 'prompt' must be text, got {got}; give every row a prompt string")
    out = {"prompt": prompt}
    system, messages = row.get("system"), row.get("messages")
    if not _missing(system):
        if not isinstance(system, str):
            raise ValueError(f"row {i}: 'system' must be text or empty, got {type(system).__name__}")
        out["system"] = system
    if isinstance(messages, np.ndarray):
        messages = messages.tolist()
    if not _missing(messages) and messages != "":
        try:
            turns = json.loads(messages) if isinstance(messages, str) else messages
            ok = isinstance(turns, list) and all(isinstance(t, Mapping) and isinstance(t.get("role"), str)
                                                 and isinstance(t.get("content"), str) for t in turns)
        except json.JSONDecodeError:
            ok = False
        if not ok:
            raise ValueError(f"row {i}: 'messages' must be a JSON list of {{\"role\", \"content\"}} turns")
        out["messages"] = list(turns)
    return out


def input_rows(model_input) -> list:
    """Rows for tasc.data.prompts, checked (see the module docstring): a DataFrame's records
    (``prompt``, or its one column, plus ``system`` and ``messages``), a mapping of columns,
    a prompt string, or a sequence of prompt strings or records."""
    if isinstance(model_input, Mapping):  # one record, or columns of values
        one = all(isinstance(v, str) or _missing(v) for v in model_input.values())
        model_input = [dict(model_input)] if one else pd.DataFrame(dict(model_input))
    if isinstance(model_input, pd.DataFrame):
        frame = model_input
        if "prompt" not in frame and len(frame.columns) == 1:
            frame = frame.rename(columns={frame.columns[0]: "prompt"})
        if "prompt" not in frame and not frame.empty:
            raise ValueError(f"the input has no 'prompt' column (columns: {list(frame.columns)}); pass a DataFrame "
                             f"with a 'prompt' column or a list of prompt strings")
        model_input = frame.to_dict("records")
    if isinstance(model_input, str):
        model_input = [model_input]
    if not isinstance(model_input, (list, tuple, np.ndarray, pd.Series)):
        raise ValueError(f"expected a DataFrame with a 'prompt' column or a list of prompt strings, got "
                         f"{type(model_input).__name__}")
    return [_checked(i, r) for i, r in enumerate(model_input)]


mlflow.models.set_model(TascModel())
