"""Package, register and promote the tasc model in the MLflow Model Registry."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from storage import corpus as store
from storage import registry
from tasc.data.spec import load_spec
from tasc.eval.promotion import PromotionPolicy, Scorecard
from tasc.models import gguf_file, resolve_model
from tasks.policies import TRANSIENT


@task(name="register-model", **TRANSIENT)
def register_model(spec: str, run_id: str, model: str, draft_file: str, bench: dict, corpus: dict,
                   method: str = "tasc-spec", dtype: str = "auto") -> str:
    """Log the pyfunc (model + tokenizer + draft) and register it as the new challenger."""
    spec = load_spec(spec)
    entry = bench["methods"][method]
    card = Scorecard(chars_per_s=entry["chars_per_s"], metric=entry["metric"] or 0.0,
                     corpus_version=corpus["version"],
                     baseline_metric=(bench["methods"].get("greedy") or {}).get("metric"),
                     reference_chars_per_s=(bench["methods"].get("greedy") or {}).get("chars_per_s"))
    config = {"task": spec.name, "system_prompt": spec.system_prompt, "chat_template": spec.chat_template,
              "stop": list(spec.generation.stop), "max_new_tokens": spec.generation.max_new_tokens, "dtype": dtype}
    prompts = store.read_corpus(corpus["path"], split="test")["prompt"].head(2).tolist()
    source = gguf_file(model)  # a short name's file, a .gguf path, or the one a folder notes
    uri = registry.log_pyfunc(run_id, resolve_model(model), draft_file, config, prompts,
                              gguf=str(source) if source else None)
    tags = {"tasc.source_model": model, "tasc.method": method}
    if bench.get("mlflow_run_id"):  # the benchmark's own MLflow run (bench_flow) and its chart there
        tags["tasc.bench.run_id"] = bench["mlflow_run_id"]
        chart = bench.get("paths", {}).get("chart")
        if chart:
            tags["tasc.bench.chart"] = f"runs:/{bench['mlflow_run_id']}/report/{Path(chart).name}"
    version = registry.register(uri, spec.name, card, tags=tags)
    get_run_logger().info("registered %s version %s (challenger) from %s", registry.registered_name(spec.name),
                          version, uri)
    return version


@task(name="promote", **TRANSIENT)
def promote_model(spec: str, version: str, min_speedup: float = 1.05, max_metric_drop: float = 0.01,
                  metric_floor: float = 0.0) -> dict:
    spec = load_spec(spec)
    d = registry.promote(spec.name, version, PromotionPolicy(min_speedup, max_metric_drop, metric_floor))
    get_run_logger().info("version %s: %s (%s)", version, "promoted to champion" if d.promote else "not promoted",
                          d.reason)
    return {"version": version, "promoted": d.promote, "reason": d.reason, "speedup": d.speedup,
            "metric_delta": d.metric_delta}
