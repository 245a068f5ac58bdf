"""The benchmark stage: methods side by side on the test split."""

from __future__ import annotations

import time

import torch
from prefect import get_run_logger, task

from storage import corpus as store
from storage.drafts import read_draft
from storage.reports import report_dir, write_report
from tasc.data.spec import load_spec
from tasc.decode.draft import BoundDraft, check_compatible
from tasc.decode.engine import DecodeConfig, measure_verify_cost
from tasc.eval.harness import environment, run_benchmark, spread_sample
from tasc.eval.methods import LLAMA_CPP_METHODS, base_method, build_methods, verify_cost_summary
from tasc.models import gguf_file, load_model
from tasks.policies import TRANSIENT


def _llama_cpp(methods: list[str], model: str, draft_path: str | None, folder) -> dict | None:
    """What the llama.cpp peers need: its tools, the model's GGUF file, the thread count and,
    for lookup decoding, a static n-gram cache built from the main draft's texts."""
    names = {base_method(m) for m in methods} & set(LLAMA_CPP_METHODS)
    if not names:
        return None
    from tasc.eval.llamacpp import build_static_cache, find_binaries

    gguf = gguf_file(model)
    if gguf is None:
        raise ValueError(f"the llama.cpp methods need a GGUF model; {model!r} is not one")
    setup = {"bin_dir": find_binaries(), "gguf": gguf, "threads": torch.get_num_threads(), "static_cache": None}
    if "llama.cpp-lookup" in names:
        if draft_path is None:
            raise ValueError("llama.cpp-lookup needs the task draft (build it with `tasc draft SPEC`)")
        folder.mkdir(parents=True, exist_ok=True)
        setup["static_cache"] = build_static_cache(setup["bin_dir"], gguf, read_draft(draft_path).texts,
                                                   folder / "static-cache.bin")
    return setup


@task(name="benchmark", **TRANSIENT)
def run_bench(spec: str, corpus: dict, model: str, methods: list[str], limit: int | None = 20,
              dtype: str = "auto", drafts: dict[str, str] | None = None, report_json: str | None = None,
              threads: int | None = None, split: str = "test", extra_models: dict[str, str] | None = None) -> dict:
    """Benchmark ``methods`` for one model; returns the report's summary and file paths.
    extra_models: "tasc-ft"/"ft-only" -> model folder or id, loaded with the same dtype."""
    log = get_run_logger()
    if threads:
        torch.set_num_threads(threads)
    spec = load_spec(spec)
    rows = spread_sample(store.read_corpus(corpus["path"], split=split), limit)
    if rows.empty:
        raise ValueError(f"the {split} split of {spec.name} is empty; nothing to benchmark")
    lm = load_model(model, dtype=dtype, kernels="auto")
    extra = {k: load_model(v, dtype=dtype, kernels="auto") for k, v in (extra_models or {}).items()}
    bound = {}
    for role, path in (drafts or {}).items():
        d = read_draft(path)
        check_compatible(d, corpus["version"])
        # A "tasc-ft" draft (the fine-tuned model's own outputs) binds to its expanded
        # tokenizer; without one, the main text draft is bound to it as it is.
        bound[role] = BoundDraft.from_corpus(d, (extra["tasc-ft"] if role == "tasc-ft" else lm).tokenizer)
        if role == "main" and "tasc-ft" in extra and "tasc-ft" not in drafts:
            bound["tasc-ft"] = BoundDraft.from_corpus(d, extra["tasc-ft"].tokenizer)
    cost = measure_verify_cost(lm.model)
    cfg = DecodeConfig(max_new_tokens=spec.generation.max_new_tokens, stop=spec.generation.stop)
    peers = _llama_cpp(methods, model, (drafts or {}).get("main"), report_dir(spec.name, "llama.cpp"))
    made = build_methods(methods, lm, cfg, spec.system_prompt, spec.chat_template, bound, cost, extra, peers)
    t0 = time.time()
    report = run_benchmark(made, rows.to_dict("records"), spec.metric,
                           ids=rows["id"].tolist(), progress=lambda d, n: log.info("benchmark %d/%d", d, n))
    report.update(spec=spec.name, model=model, corpus_version=corpus["version"], split=split,
                  environment=environment(lm.weights, lm.device, lm.kernels),
                  verify_cost=verify_cost_summary(cost), wall_s=time.time() - t0,
                  drafts={k: {"path": v, "tokens": bound[k].num_tokens} for k, v in (drafts or {}).items()},
                  extra_models=extra_models or {})
    paths = write_report(report, report_dir(spec.name, time.strftime("%Y%m%d-%H%M%S")), report_json)
    return {"paths": paths, "speedup_vs_greedy": report["speedup_vs_greedy"],
            "methods": {k: {m: v for m, v in e.items() if m != "differing_ids"} for k, e in report["methods"].items()},
            "verify_cost": report["verify_cost"], "environment": report["environment"]}
