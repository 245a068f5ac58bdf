"""TASC-ft rounds: expand the vocabulary with task tokens, fine-tune, measure.

One round takes the current model and tokenizer (the base ones in round 1, the previous
round's afterwards), selects new tokens on the train completions with the *current*
tokenizer, adds them, initialises their embeddings from their pieces, fine-tunes (unless
disabled) and saves model and tokenizer to ``out_dir/model``. It then measures on the
validation rows, always against the ORIGINAL base tokenizer: tokens per completion before
and after, ``token_reduction`` (fraction of base tokens saved), whether every train and
validation completion round-trips exactly, the validation loss and what the round added.

:func:`finetune_only` is the fair baseline: the same fine-tuning loop and budget without
new tokens. Pure core: no Prefect, no MLflow.
"""

from __future__ import annotations

import contextlib
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from tasc.ft.expand import expand_tokenizer, resize_and_init, round_trip_report
from tasc.ft.select import TOKENS_PER_ROUND, SelectionConfig, select_tokens
from tasc.train.config import FinetuneConfig, cpu_config, gpu_config
from tasc.train.finetune import finetune
from tasc.train.io import encode_rows
from tasc.train.loss import evaluate


def count_output_tokens(tokenizer, completions) -> np.ndarray:
    """int64 (N,): tokens of each completion, no special tokens (the before/after measure)."""
    completions = list(completions)
    if not completions:
        return np.zeros(0, np.int64)
    ids = tokenizer(completions, add_special_tokens=False)["input_ids"]
    return np.fromiter(map(len, ids), np.int64, count=len(ids))


def plateau(history: list[dict[str, float]], min_token_gain: float = 0.02, max_metric_drop: float = 0.01) -> bool:
    """True when another round is not worth it. ``history``: one dict per round, round 0 the
    base model, with ``tokens`` (total output tokens) and ``metric`` (task score, higher is
    better). Stops when the last round cut tokens by less than ``min_token_gain`` (a fraction
    of the previous round's) or lost more than ``max_metric_drop`` of metric."""
    if len(history) < 2:
        return False
    prev, last = history[-2], history[-1]
    gain = (prev["tokens"] - last["tokens"]) / prev["tokens"] if prev["tokens"] else 0.0
    return gain < min_token_gain or (prev["metric"] - last["metric"]) > max_metric_drop


def choose_round(base: dict, rounds: list[dict], max_metric_drop: float) -> dict | None:
    """The round to keep: the last one whose task ``metric`` stayed within ``max_metric_drop``
    of the base's (later rounds save more tokens); a round or base without a measured metric
    counts as within. None when every round lost too much."""
    ok = [r for r in rounds if r["metric"] is None or base["metric"] is None
          or base["metric"] - r["metric"] <= max_metric_drop]
    return ok[-1] if ok else None


@dataclass(frozen=True)
class RoundsConfig:
    rounds: int = 3
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    finetune: FinetuneConfig | None = field(default_factory=cpu_config)  # None: no fine-tuning
    min_token_gain: float = 0.02  # plateau: stop when a round saves less than this fraction
    max_metric_drop: float = 0.01  # plateau: stop when the task metric drops more than this
    init: str = "mean"  # embedding initialisation of new tokens: mean | weighted
    max_eval_rows: int = 32  # validation rows for the loss when there is no fine-tuning


def make_config(rounds: int = 3, finetune: bool = True, max_steps: int | None = None,
                tokens_per_round: int = TOKENS_PER_ROUND, min_count: int = 5, device: str = "auto") -> RoundsConfig:
    """A RoundsConfig from command-line style settings: cpu_config or gpu_config by device."""
    from tasc.models import pick_device

    ft = None
    if finetune:
        ft = gpu_config() if pick_device(device).startswith("cuda") else cpu_config()
        if max_steps is not None:
            ft = replace(ft, max_steps=max_steps, warmup_steps=min(ft.warmup_steps, max(0, max_steps // 5)),
                         eval_every=min(ft.eval_every, max_steps), save_every=min(ft.save_every, max_steps))
    return RoundsConfig(rounds=rounds, selection=SelectionConfig(tokens_per_round=tokens_per_round,
                        min_count=min_count), finetune=ft)


@dataclass
class RoundResult:
    model_dir: Path  # model + tokenizer of this round, loadable with tasc.models.load_model
    selection: Any  # tasc.ft.select.Selection
    added_tokens: int
    added_params: int
    added_params_pct: float
    tokens_per_completion_base: float  # validation, base tokenizer
    tokens_per_completion_before: float  # validation, the tokenizer this round started from
    tokens_per_completion: float  # validation, this round's tokenizer
    token_reduction: float  # 1 - new tokens / base tokens on the validation completions
    round_trip_exact: bool
    round_trip_failures: int
    val_loss: float | None
    finetune_steps: int = 0
    train_loss: float | None = None
    metric: float | None = None
    model: Any = None  # the round's model in memory (not part of the summary)
    tokenizer: Any = None

    def summary(self) -> dict:
        """JSON-ready numbers of the round."""
        skip = {"model", "tokenizer", "selection"}
        out = {k: getattr(self, k) for k in self.__dataclass_fields__ if k not in skip}
        out["model_dir"] = str(self.model_dir)
        out["tokens"] = self.selection.tokens if self.selection is not None else []
        return out


def _completions(rows) -> list[str]:
    recs = rows.to_dict("records") if hasattr(rows, "to_dict") else [dict(r) for r in rows]
    return [r["completion"] for r in recs]


def _mean(x: np.ndarray) -> float:
    return float(x.mean()) if x.size else 0.0


def validation_loss(model, tokenizer, val_rows, chat_template: bool, system_prompt: str | None,
                    max_rows: int = 32, max_seq_len: int = 256, batch_size: int = 4) -> float | None:
    """Mean loss per completion token on up to ``max_rows`` validation rows."""
    val = encode_rows(tokenizer, val_rows, chat_template, system_prompt, max_seq_len)[:max_rows]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    loss = evaluate(model, val, batch_size, pad, str(model.device), contextlib.nullcontext())
    model.eval()
    return loss


def _train(model, tokenizer, train_rows, val_rows, config: FinetuneConfig, out_dir: Path, chat_template: bool,
           system_prompt: str | None, new_token_ids: list[int]):
    """Fine-tune and reload the final weights (LoRA merged) as a plain model."""
    from transformers import AutoModelForCausalLM

    res = finetune(model, tokenizer, train_rows, val_rows, config, out_dir / "finetune", chat_template,
                   system_prompt, progress=True, new_token_ids=new_token_ids)  # bar: terminal only
    from tasc.models import pick_device

    trained = AutoModelForCausalLM.from_pretrained(res.checkpoint_dir).to(pick_device(config.device)).eval()
    return trained, res


def _save(model, tokenizer, folder: Path) -> Path:
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def run_round(model, base_tokenizer, tokenizer, train_rows, val_rows, config: RoundsConfig, out_dir: str | Path,
              chat_template: bool = True, system_prompt: str | None = None) -> RoundResult:
    """One expansion round (see the module docstring). ``model`` and ``tokenizer`` are the
    current ones (``model`` is resized in place); ``base_tokenizer`` the original one."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_c, val_c = _completions(train_rows), _completions(val_rows)
    selection = select_tokens(train_c, tokenizer, config.selection)
    new_tok = expand_tokenizer(tokenizer, selection.tokens)
    added = resize_and_init(model, tokenizer, new_tok, selection.tokens, config.init)
    new_ids = [new_tok.convert_tokens_to_ids(t) for t in selection.tokens]
    steps, train_loss, val_loss = 0, None, None
    if config.finetune is not None:
        model, res = _train(model, new_tok, train_rows, val_rows, config.finetune, out_dir, chat_template,
                            system_prompt, new_ids)
        steps, train_loss, val_loss = res.steps, res.train_loss, res.val_loss
    if val_loss is None:
        val_loss = validation_loss(model, new_tok, val_rows, chat_template, system_prompt, config.max_eval_rows)
    model_dir = _save(model, new_tok, out_dir / "model")
    base = count_output_tokens(base_tokenizer, val_c)
    before = count_output_tokens(tokenizer, val_c)
    after = count_output_tokens(new_tok, val_c)
    rt = round_trip_report(new_tok, train_c + val_c, base_tokenizer)
    total = sum(p.numel() for p in model.parameters())
    return RoundResult(
        model_dir=model_dir, selection=selection, added_tokens=len(selection.tokens), added_params=int(added),
        added_params_pct=100.0 * added / total if total else 0.0,
        tokens_per_completion_base=_mean(base), tokens_per_completion_before=_mean(before),
        tokens_per_completion=_mean(after),
        token_reduction=float(1.0 - after.sum() / base.sum()) if base.sum() else 0.0,
        round_trip_exact=bool(rt["exact"]), round_trip_failures=len(rt["failures"]), val_loss=val_loss,
        finetune_steps=steps, train_loss=train_loss, model=model, tokenizer=new_tok,
    )


def finetune_only(model, tokenizer, train_rows, val_rows, config: FinetuneConfig, out_dir: str | Path,
                  chat_template: bool = True, system_prompt: str | None = None) -> dict:
    """The ``ft-only`` baseline: the same fine-tuning loop and budget, no new tokens. Saves
    to ``out_dir/model``; returns model_dir, steps, train/val loss, tokens per completion."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    trained, res = _train(model, tokenizer, train_rows, val_rows, config, out_dir, chat_template, system_prompt, [])
    model_dir = _save(trained, tokenizer, out_dir / "model")
    tokens = count_output_tokens(tokenizer, _completions(val_rows))
    return {"model_dir": str(model_dir), "steps": res.steps, "train_loss": res.train_loss, "val_loss": res.val_loss,
            "vocab_size": len(tokenizer), "tokens_per_completion": _mean(tokens)}


def task_metric(model, tokenizer, rows, metric: str, max_new_tokens: int, stop: tuple[str, ...] = (),
                system_prompt: str | None = None, chat_template: bool = True, limit: int = 8) -> float | None:
    """Mean task metric of greedy outputs on ``limit`` rows spread over the split (None without rows)."""
    from tasc.decode.engine import DecodeConfig, generate
    from tasc.eval.harness import spread_sample
    from tasc.eval.metrics import score_many

    if hasattr(rows, "to_dict") and "id" in rows:
        rows = spread_sample(rows, limit)
    recs = (rows.to_dict("records") if hasattr(rows, "to_dict") else [dict(r) for r in rows])[:limit]
    if not recs or limit <= 0:
        return None
    outs = generate(model, tokenizer, recs, None, "greedy",
                    DecodeConfig(max_new_tokens=max_new_tokens, stop=tuple(stop)), system_prompt, chat_template)
    return float(np.mean(score_many(metric, [o.text for o in outs], recs)))
