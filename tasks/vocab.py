"""TASC-ft vocabulary rounds as tasks: the base measure, one task per round, the ft-only baseline.

Models travel between tasks as folders (the previous round's ``model/``), never pickled."""

from __future__ import annotations

import shutil

from prefect import get_run_logger, task

from storage import corpus as store
from storage import vocab_store
from tasc.finetune import count_output_tokens
from tasc.models import load_model, load_tokenizer
from tasc.rounds import finetune_only, make_config, run_round, task_metric, validation_loss
from tasc.spec import load_spec


def _split(corpus: dict, split: str):
    return store.read_corpus(corpus["path"], split=split)


def _metric(spec, lm, val, eval_prompts: int):
    return task_metric(lm.model, lm.tokenizer, val, spec.metric, spec.generation.max_new_tokens,
                       spec.generation.stop, spec.system_prompt, spec.chat_template, eval_prompts)


@task(name="vocab-baseline")
def vocab_baseline(spec_path: str, corpus: dict, model: str, eval_prompts: int = 8, dtype: str = "float32") -> dict:
    """Round 0: validation tokens and loss with the base model and, with eval_prompts > 0, the task metric."""
    spec, val, lm = load_spec(spec_path), _split(corpus, "validation"), load_model(model, dtype=dtype)
    tokens = count_output_tokens(lm.tokenizer, val["completion"].tolist())
    loss = validation_loss(lm.model, lm.tokenizer, val, spec.chat_template, spec.system_prompt)
    metric = _metric(spec, lm, val, eval_prompts) if eval_prompts > 0 else None
    return {"round": 0, "tokens": int(tokens.sum()), "tokens_per_completion": float(tokens.mean()) if len(tokens)
            else 0.0, "token_reduction": 0.0, "added_tokens": 0, "val_loss": loss, "metric": metric,
            "model_dir": model}


@task(name="vocab-round")
def vocab_round(spec_path: str, corpus: dict, base_model: str, current_model: str, index: int, settings: dict,
                eval_prompts: int = 8, dtype: str = "float32") -> dict:
    """Round ``index``: expand the current model's vocabulary (and fine-tune), save and measure."""
    spec, train, val = load_spec(spec_path), _split(corpus, "train"), _split(corpus, "validation")
    out = vocab_store.round_dir(spec.name, corpus["version"], index)
    shutil.rmtree(out, ignore_errors=True)  # a rerun starts the round afresh
    lm = load_model(current_model, dtype=dtype)
    res = run_round(lm.model, load_tokenizer(base_model), lm.tokenizer, train, val, make_config(**settings), out,
                    spec.chat_template, spec.system_prompt)
    lm.model, lm.tokenizer = res.model, res.tokenizer
    res.metric = _metric(spec, lm, val, eval_prompts) if eval_prompts > 0 else None
    summary = res.summary() | {"round": index, "tokens": int(count_output_tokens(res.tokenizer,
                               val["completion"].tolist()).sum()), "settings": settings}
    summary["selection"] = str(vocab_store.write_selection(res.selection.table, out / "selection.parquet", index,
                                                          {"task": spec.name, "base_model": base_model}))
    summary["round_json"] = str(vocab_store.write_json(summary, out / "round.json"))
    get_run_logger().info("round %d: +%d tokens, reduction %.3f", index, res.added_tokens, res.token_reduction)
    return summary


@task(name="vocab-ft-only")
def ft_only_baseline(spec_path: str, corpus: dict, model: str, settings: dict, dtype: str = "float32") -> dict:
    """The fine-tune-only baseline at the rounds' training budget (one round's steps)."""
    spec, train, val = load_spec(spec_path), _split(corpus, "train"), _split(corpus, "validation")
    config = make_config(**settings).finetune
    if config is None:
        raise ValueError("ft-only needs fine-tuning; it is the baseline of fine-tuned rounds")
    lm = load_model(model, dtype=dtype)
    out = vocab_store.ft_only_dir(spec.name, corpus["version"])
    return finetune_only(lm.model, lm.tokenizer, train, val, config, out, spec.chat_template, spec.system_prompt)
