"""TASC-ft vocabulary rounds as tasks: the base measure, one task per round, the ft-only baseline.

Models travel between tasks as folders (the previous round's ``model/``), never pickled.
A round folder records the inputs it was made from (storage/vocab_store.py); a rerun with
the same inputs returns a finished round as it is and resumes an interrupted one from its
newest fine-tuning checkpoint, while other inputs start the round afresh."""

from __future__ import annotations

from prefect import get_run_logger, task

from storage import corpus as store
from storage import vocab_store
from tasc.data.spec import load_spec
from tasc.ft.rounds import (
    count_output_tokens,
    finetune_only,
    make_config,
    run_round,
    task_metric,
    validation_loss,
)
from tasc.models import load_model, load_tokenizer
from tasc.train.io import ResumeError
from tasks.policies import TRANSIENT, fingerprint


def _split(corpus: dict, split: str):
    return store.read_corpus(corpus["path"], split=split)


def _metric(spec, lm, val, eval_prompts: int):
    return task_metric(lm.model, lm.tokenizer, val, spec.metric, spec.generation.max_new_tokens,
                       spec.generation.stop, spec.system_prompt, spec.chat_template, eval_prompts)


@task(name="vocab-baseline", **TRANSIENT)
def vocab_baseline(spec: str, corpus: dict, model: str, eval_prompts: int = 8, dtype: str = "float32") -> dict:
    """Round 0: validation tokens and loss with the base model and, with eval_prompts > 0, the task metric."""
    spec, val, lm = load_spec(spec), _split(corpus, "validation"), load_model(model, dtype=dtype)
    tokens = count_output_tokens(lm.tokenizer, val["completion"].tolist())
    loss = validation_loss(lm.model, lm.tokenizer, val, spec.chat_template, spec.system_prompt)
    metric = _metric(spec, lm, val, eval_prompts) if eval_prompts > 0 else None
    return {"round": 0, "tokens": int(tokens.sum()), "tokens_per_completion": float(tokens.mean()) if len(tokens)
            else 0.0, "token_reduction": 0.0, "added_tokens": 0, "val_loss": loss, "metric": metric,
            "model_dir": model}


@task(name="vocab-round", **TRANSIENT)
def vocab_round(spec: str, corpus: dict, base_model: str, current_model: str, index: int, settings: dict,
                eval_prompts: int = 8, dtype: str = "float32") -> dict:
    """Round ``index``: expand the current model's vocabulary (and fine-tune), save and measure."""
    spec, train, val = load_spec(spec), _split(corpus, "train"), _split(corpus, "validation")
    out = vocab_store.round_dir(spec.name, corpus["version"], index)
    origin = fingerprint([corpus["version"], base_model, current_model, index, settings, eval_prompts, dtype])
    if (done := vocab_store.finished_round(out, origin)) is not None:
        get_run_logger().info("round %d: finished before with the same inputs, reused", index)
        return done
    vocab_store.claim(out, origin)
    try:
        res = _run_round(spec, train, val, base_model, current_model, settings, out, dtype)
    except ResumeError:  # checkpoints of an incompatible run: train from scratch
        vocab_store.drop_checkpoints(out)
        res = _run_round(spec, train, val, base_model, current_model, settings, out, dtype)
    res.metric = _metric(spec, res, val, eval_prompts) if eval_prompts > 0 else None  # res has model, tokenizer
    summary = res.summary() | {"round": index, "tokens": int(count_output_tokens(res.tokenizer,
                               val["completion"].tolist()).sum()), "settings": settings, "origin": origin}
    summary = vocab_store.save_round(out, summary, res.selection.table, {"task": spec.name, "base_model": base_model})
    get_run_logger().info("round %d: +%d tokens, reduction %.3f", index, res.added_tokens, res.token_reduction)
    return summary


def _run_round(spec, train, val, base_model: str, current_model: str, settings: dict, out, dtype: str):
    lm = load_model(current_model, dtype=dtype)
    return run_round(lm.model, load_tokenizer(base_model), lm.tokenizer, train, val, make_config(**settings), out,
                     spec.chat_template, spec.system_prompt)


@task(name="vocab-ft-only", **TRANSIENT)
def ft_only_baseline(spec: str, corpus: dict, model: str, settings: dict, dtype: str = "float32") -> dict:
    """The fine-tune-only baseline at the rounds' training budget (one round's steps)."""
    spec, train, val = load_spec(spec), _split(corpus, "train"), _split(corpus, "validation")
    config = make_config(**settings).finetune
    if config is None:
        raise ValueError("ft-only needs fine-tuning; it is the baseline of fine-tuned rounds")
    lm = load_model(model, dtype=dtype)
    out = vocab_store.ft_only_dir(spec.name, corpus["version"])
    # Only what changes its training: rounds with other selection settings share one baseline.
    vocab_store.claim(out, fingerprint([corpus["version"], model, config.hash(), dtype]))
    return finetune_only(lm.model, lm.tokenizer, train, val, config, out, spec.chat_template, spec.system_prompt)
