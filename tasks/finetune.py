"""The fine-tuning stage: train a model folder on the train split, resumable.

The run's folder is keyed by the starting model (names, sizes and times of its files) and the
weight-changing settings, so an interrupted run of the same model and settings resumes from
its newest checkpoint (tasc.train.finetune) and a different one never picks it up."""

from __future__ import annotations

from prefect import get_run_logger, task

from storage import corpus as store
from storage import vocab_store
from tasc.data.spec import load_spec
from tasc.ft.rounds import make_config
from tasc.models import load_model
from tasc.train.finetune import finetune
from tasks.policies import TRANSIENT, fingerprint


@task(name="finetune", **TRANSIENT)
def finetune_model(spec: str, corpus: dict, model: str, max_steps: int | None = None) -> dict:
    """Fine-tune ``model`` (LoRA on CPU, full on a GPU; added tokens trained in full) for
    ``max_steps``; returns the final folder, steps and the step it resumed from."""
    spec = load_spec(spec)
    train, val = (store.read_corpus(corpus["path"], split=s) for s in ("train", "validation"))
    config = make_config(finetune=True, max_steps=max_steps).finetune
    out = vocab_store.finetune_dir(spec.name, corpus["version"], fingerprint([model, config.hash()]))
    lm = load_model(model, dtype="float32")
    # The step bar shows only on a terminal (tasc.progress_bar), beside the log line below.
    res = finetune(lm.model, lm.tokenizer, train, val, config, out, spec.chat_template, spec.system_prompt,
                   progress=True)
    get_run_logger().info("fine-tuned %s: %d steps (resumed from step %d) -> %s", model, res.steps,
                          res.resumed_from, res.checkpoint_dir)
    return {"model_dir": str(res.checkpoint_dir), "steps": res.steps, "resumed_from": res.resumed_from,
            "train_loss": res.train_loss, "val_loss": res.val_loss, "run_dir": str(out)}
