"""The registered tasc model (MLflow models-from-code): model, tokenizer and draft in one pyfunc.

Artifacts: ``model`` (a Hugging Face folder with the tokenizer), ``draft`` (the text draft,
Parquet), ``config`` (JSON: system prompt, chat template flag, stop strings, dtype,
generation limit). ``predict`` takes a DataFrame with a ``prompt`` column (or a list of
strings) and params ``max_new_tokens``, ``method`` (greedy | tasc-spec) and ``temperature``;
it returns one generated string per prompt.
"""

from __future__ import annotations

import json

import mlflow
import pandas as pd


class TascModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from storage.drafts import read_draft
        from tasc.decode.draft import BoundDraft
        from tasc.decode.engine import measure_verify_cost
        from tasc.models import load_model

        with open(context.artifacts["config"]) as f:
            self.config = json.load(f)
        self.lm = load_model(context.artifacts["model"], dtype=self.config.get("dtype", "auto"), kernels="auto")
        draft = read_draft(context.artifacts["draft"])
        self.draft = BoundDraft.from_corpus(draft, self.lm.tokenizer)
        # The verify-cost table depends on the serving hardware, so it is measured here.
        self.cost = measure_verify_cost(self.lm.model, reps=2)

    def predict(self, context, model_input, params=None):
        from tasc.decode.engine import DecodeConfig, generate

        params = params or {}
        if isinstance(model_input, pd.DataFrame):
            prompts = model_input["prompt" if "prompt" in model_input else model_input.columns[0]].astype(str).tolist()
        elif isinstance(model_input, str):
            prompts = [model_input]
        else:
            prompts = [str(p) for p in model_input]
        cfg = DecodeConfig(
            max_new_tokens=int(params.get("max_new_tokens") or self.config.get("max_new_tokens", 128)),
            stop=tuple(self.config.get("stop", ())),
            temperature=float(params.get("temperature") or 0.0),
        )
        outs = generate(self.lm.model, self.lm.tokenizer, prompts, self.draft, params.get("method") or "tasc-spec",
                        cfg, self.config.get("system_prompt"), self.config.get("chat_template", True), cost=self.cost)
        return [o.text for o in outs]


mlflow.models.set_model(TascModel())
