"""Harvest on-policy outputs and build the text draft."""

from __future__ import annotations

import pandas as pd
from prefect import get_run_logger, task

from storage import corpus as store
from storage.drafts import (
    draft_path,
    harvest_is_current,
    harvest_path,
    harvest_problem,
    read_harvest,
    write_draft,
    write_harvest,
)
from tasc.data.spec import load_spec
from tasc.decode.draft import BoundDraft, build_draft_corpus
from tasc.decode.harvest import harvest
from tasc.eval.harness import spread_sample
from tasc.models import load_model
from tasks.policies import TRANSIENT, DraftInputs, cached


@task(name="harvest", **TRANSIENT)
def harvest_outputs(spec: str, corpus: dict, model: str, limit: int | None = None, dtype: str = "auto",
                    batch_size: int = 8, force: bool = False) -> str:
    """Run the model over the train prompts; reuses an existing whole harvest of at least
    ``limit`` rows written after the model (a model folder rewritten since, e.g. a TASC-ft
    round run with other settings, is harvested again), unless ``force``."""
    spec = load_spec(spec)
    path = harvest_path(spec.name, corpus["version"], model)
    train = store.read_corpus(corpus["path"], split="train")
    want = len(train) if limit is None else min(limit, len(train))
    if path.exists() and not force and harvest_is_current(path, model):
        if problem := harvest_problem(path):
            get_run_logger().warning("stored harvest damaged, harvesting again: %s", problem)
        elif len(read_harvest(path)) >= want:
            get_run_logger().info("harvest reused: %s", path)
            return str(path)
    rows = spread_sample(train, want)
    lm = load_model(model, dtype=dtype, kernels="auto")
    log = get_run_logger()
    refs = BoundDraft.from_corpus(build_draft_corpus(train["completion"].tolist()), lm.tokenizer)
    outs = harvest(lm, rows.to_dict("records"), spec.generation.max_new_tokens, spec.system_prompt,
                   spec.chat_template, batch_size, progress=lambda d, n: log.info("harvest %d/%d", d, n), draft=refs)
    frame = pd.DataFrame({"id": rows["id"].tolist(), "prompt": rows["prompt"].tolist(), "output": outs})
    return str(write_harvest(frame, path, {"model": model, "corpus_version": corpus["version"], "dtype": dtype}))


@task(name="build-draft", **cached(DraftInputs(modules=("tasc.decode.draft", "storage.drafts"))))
def build_draft(spec: str, corpus: dict, source: str = "auto", model: str | None = None,
                harvest_file: str | None = None) -> str:
    """Build the text draft: references, on-policy, or both; 'auto' takes on-policy where a
    harvest exists for the model, else references. Deterministic, so it is rebuilt only
    when its inputs change (the file name encodes them)."""
    spec = load_spec(spec)
    if harvest_file is None and model is not None:
        candidate = harvest_path(spec.name, corpus["version"], model)
        harvest_file = str(candidate) if candidate.exists() else None
    if source == "auto":
        source = "on-policy" if harvest_file else "references"
    if source in ("on-policy", "both") and not harvest_file:
        raise FileNotFoundError(f"no on-policy harvest for {spec.name} with {model}; run `tasc harvest {spec.path}`")
    refs = store.read_corpus(corpus["path"], split="train")["completion"].tolist() if source != "on-policy" else []
    gens = read_harvest(harvest_file)["output"].tolist() if source != "references" else []
    out = draft_path(spec.name, corpus["version"], source, model if source != "references" else None)
    draft = build_draft_corpus(refs, gens, corpus_hash=corpus["version"],
                               meta={"task": spec.name, "model": model, "harvest": harvest_file})
    write_draft(draft, out)
    get_run_logger().info("draft %s: %d texts (%s) -> %s", spec.name, len(draft.texts), draft.source, out)
    return str(out)
