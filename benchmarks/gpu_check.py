"""TASC on one accelerator, core only (no Prefect, no MLflow): spec decoding side by side
with greedy and prompt lookup, then one TASC-ft round with the GPU fine-tuning config
against the ft-only baseline at the same training budget.

    python -m benchmarks.gpu_check --model DIR --out OUT \
        [--harvest-specs snips=corpus.parquet,mbpp=corpus.parquet --harvest-limit 400] \
        [--spec snips --corpus corpus.parquet --steps 750 --tokens 12,30 --limit 32 --metric-limit 256] \
        [--spec-bench] [--deadline 450]

Phase 1 (``--harvest-specs``) writes OUT/harvest-SPEC.parquet: the model's fp32 greedy outputs
for a spread sample of each spec's train prompts (batched), the on-policy corpus for CPU
benchmarks of the same weights. Phase 2 (``--corpus``) fine-tunes ft-only and tasc-ft with
the GPU config, harvests the tasc-ft model's own outputs for its draft and benchmarks.
Writes OUT/gpu_report.json after every phase and prints readable tables. Runs on CPU too
(for a dry run with a tiny model); it uses CUDA when available.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd
import torch

from tasc.data.spec import load_spec
from tasc.decode.draft import BoundDraft, build_draft_corpus
from tasc.decode.engine import DecodeConfig, measure_verify_cost
from tasc.decode.harvest import harvest
from tasc.eval.harness import environment, markdown_table, run_benchmark, spread_sample
from tasc.eval.methods import build_methods, verify_cost_summary
from tasc.eval.metrics import score_many
from tasc.ft.expand import expand_tokenizer, resize_and_init, round_trip_report
from tasc.ft.rounds import count_output_tokens
from tasc.ft.select import SelectionConfig, select_tokens
from tasc.models import load_model
from tasc.train.config import cpu_config, gpu_config
from tasc.train.finetune import finetune


def bench(lms: dict, spec, rows: pd.DataFrame, draft_texts, methods: list[str], ft_draft_texts=None) -> dict:
    base = lms["base"]
    cost = measure_verify_cost(base.model)
    cfg = DecodeConfig(max_new_tokens=spec.generation.max_new_tokens, stop=spec.generation.stop)
    drafts = {"main": BoundDraft.from_corpus(draft_texts, base.tokenizer)}
    made = build_methods([m for m in methods if not m.startswith(("ft", "tasc-ft"))], base, cfg, spec.system_prompt,
                         spec.chat_template, drafts, cost)
    from tasc.eval.harness import Method

    for name in ("ft-only", "tasc-ft"):
        if name in lms and name in methods:
            made += [Method(name, m.run) for m in build_methods(["greedy"], lms[name], cfg, spec.system_prompt,
                                                                 spec.chat_template, {}, cost)]
    if "tasc-ft" in lms and "tasc-ft+spec" in methods:
        ft = lms["tasc-ft"]
        # A text draft binds to the expanded tokenizer as it is; the best one is the fine-tuned
        # model's own outputs.
        bound = {"main": BoundDraft.from_corpus(ft_draft_texts or draft_texts, ft.tokenizer)}
        made += [Method("tasc-ft+spec", m.run) for m in build_methods(
            ["tasc-spec"], ft, cfg, spec.system_prompt, spec.chat_template, bound, measure_verify_cost(ft.model))]
    report = run_benchmark(made, rows.to_dict("records"), spec.metric, ids=rows["id"].tolist())
    report.update(spec=spec.name, environment=environment(str(base.dtype), base.device),
                  verify_cost=verify_cost_summary(cost))
    report["per_sample"] = report.get("per_sample", [])[:6]
    return report


def harvest_specs(args, out: Path, result: dict, save) -> None:
    lm = load_model(args.model, dtype="float32")
    result["harvest"] = {}
    for item in args.harvest_specs.split(","):
        name, path = item.split("=", 1)
        spec = load_spec(name)
        corpus = pd.read_parquet(path)
        train = spread_sample(corpus[corpus.split == "train"], args.harvest_limit)
        t0 = time.time()
        outs = harvest(lm, train.to_dict("records"), spec.generation.max_new_tokens, spec.system_prompt,
                       spec.chat_template, batch_size=args.batch)
        pd.DataFrame({"id": train["id"].tolist(), "prompt": train["prompt"].tolist(), "output": outs}).to_parquet(
            out / f"harvest-{name}.parquet")
        result["harvest"][name] = {"rows": len(outs), "seconds": time.time() - t0, "dtype": "float32"}
        print(name, result["harvest"][name], flush=True)
        save()
    del lm


def batched_metric(lm, spec, rows: pd.DataFrame, batch: int) -> dict:
    """Task metric of ``lm`` on many rows with batched greedy generation (the batch-1 bench
    is too slow for a metric that must resolve one point): metric, output tokens and chars."""
    t0 = time.time()
    outs = harvest(lm, rows.to_dict("records"), spec.generation.max_new_tokens, spec.system_prompt,
                   spec.chat_template, batch_size=batch)
    scores = score_many(spec.metric, outs, rows.to_dict("records"))
    tokens = count_output_tokens(lm.tokenizer, outs)
    return {"rows": len(outs), "metric": float(sum(scores) / max(len(scores), 1)),
            "tokens_per_completion": float(tokens.mean()) if len(outs) else 0.0,
            "chars_per_completion": float(sum(map(len, outs)) / max(len(outs), 1)),
            "seconds": time.time() - t0}


def train_one(name: str, args, out: Path, result: dict, spec, train, val, ft_cfg, base, tokens=None):
    """Fine-tune one candidate (ft-only when ``tokens`` is None) and load it for generation."""
    lm = load_model(args.model, dtype="float32")
    tok = lm.tokenizer
    if tokens is not None:
        tok = expand_tokenizer(base.tokenizer, tokens)
        added = resize_and_init(lm.model, base.tokenizer, tok, tokens)
        result[f"{name}_added_params"] = added
        result[f"{name}_added_params_pct"] = 100.0 * added / sum(p.numel() for p in lm.model.parameters())
        rt = round_trip_report(tok, train["completion"].tolist()[:5000])
        result[f"{name}_round_trip"] = {k: v for k, v in rt.items() if k != "failures"}
    t0 = time.time()
    res = finetune(lm.model, tok, train, val, ft_cfg, out / f"ft-{name}", spec.chat_template, spec.system_prompt,
                   progress=False)
    result[f"{name}_finetune"] = {"steps": res.steps, "train_loss": res.train_loss, "val_loss": res.val_loss,
                                  "seconds": time.time() - t0, "tokens_per_s": res.tokens_per_s,
                                  "history": [h for h in res.history if "val_loss" in h]}
    del lm
    trained = load_model(str(res.checkpoint_dir), dtype=args.dtype)
    result[f"{name}_val_tokens_per_completion"] = float(
        count_output_tokens(trained.tokenizer, val["completion"].tolist()).mean())
    print(name, result[f"{name}_finetune"], flush=True)
    return trained


def tasc_ft(args, out: Path, result: dict, save, started: float) -> None:
    spec = load_spec(args.spec)
    corpus = pd.read_parquet(args.corpus)
    train, val, test = (corpus[corpus.split == s] for s in ("train", "validation", "test"))
    bench_rows = spread_sample(test, args.limit)
    metric_rows = spread_sample(test, args.metric_limit)
    texts = train["completion"].tolist()
    if args.harvest:
        texts += pd.read_parquet(args.harvest)["output"].tolist()
    draft = build_draft_corpus(on_policy=texts)
    base = load_model(args.model, dtype=args.dtype)

    def left() -> float:
        return args.deadline - (time.time() - started)

    # Candidates against ft-only, same fine-tuning config and steps.
    make_cfg = gpu_config if torch.cuda.is_available() else cpu_config
    ft_cfg = make_cfg(max_steps=args.steps, eval_every=max(args.steps // 3, 1), save_every=args.steps)
    result["ft_config"] = ft_cfg.__dict__
    result["batched_metric"] = {"base": batched_metric(base, spec, metric_rows, args.batch)}
    lms = {"base": base, "ft-only": train_one("ft-only", args, out, result, spec, train, val, ft_cfg, base)}
    result["batched_metric"]["ft-only"] = batched_metric(lms["ft-only"], spec, metric_rows, args.batch)
    print(result["batched_metric"], flush=True)
    save()
    counts = [int(c) for c in str(args.tokens).split(",")]
    cost = args.round_cost
    for i, n in enumerate(counts):
        if i and left() < cost:
            result.setdefault("skipped", []).append(f"tasc-ft@{n}: deadline")
            continue
        t_round = time.time()
        sel = select_tokens(train["completion"].tolist(), base.tokenizer, SelectionConfig(tokens_per_round=n))
        name = f"tasc-ft@{n}"
        lms[name] = train_one(name, args, out, result, spec, train, val, ft_cfg, base, sel.tokens)
        result["batched_metric"][name] = batched_metric(lms[name], spec, metric_rows, args.batch)
        print(name, result["batched_metric"][name], flush=True)
        save()
        cost = max(cost, time.time() - t_round)  # the next candidate costs about as much
    # Batch-1 speed of the first candidate, side by side with greedy and ft-only.
    first = f"tasc-ft@{counts[0]}"
    ft = lms[first]
    rows = spread_sample(train, args.ft_harvest_limit)
    t0 = time.time()
    ft_texts = harvest(ft, rows.to_dict("records"), spec.generation.max_new_tokens, spec.system_prompt,
                       spec.chat_template, batch_size=args.batch)
    result["ft_harvest"] = {"rows": len(ft_texts), "seconds": time.time() - t0}
    result["ft_bench"] = bench({"base": base, "ft-only": lms["ft-only"], "tasc-ft": ft}, spec, bench_rows, draft,
                               ["greedy", "ft-only", "tasc-ft", "tasc-ft+spec"], build_draft_corpus(on_policy=ft_texts))
    result["ft_bench"]["tasc-ft_is"] = first
    print(markdown_table(result["ft_bench"]), flush=True)
    save()
    if args.spec_bench and left() > 60:
        result["spec_bench"] = bench({"base": base}, spec, bench_rows, draft, ["greedy", "pld", "tasc-spec"])
        print(markdown_table(result["spec_bench"]), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--harvest-specs", default="", help="spec=corpus.parquet,... for phase 1")
    ap.add_argument("--harvest-limit", type=int, default=400)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--corpus", default=None, help="corpus of --spec for phase 2 (TASC-ft)")
    ap.add_argument("--harvest", default=None, help="base model harvest added to the spec-bench draft")
    ap.add_argument("--spec", default="snips")
    ap.add_argument("--spec-bench", action="store_true")
    ap.add_argument("--limit", type=int, default=32)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--tokens", default="12", help="tokens per round; several (12,30) train one candidate each")
    ap.add_argument("--metric-limit", type=int, default=256, help="test rows for the batched task metric")
    ap.add_argument("--deadline", type=float, default=1e9, help="seconds; later candidates are skipped after it")
    ap.add_argument("--report", default=None, help="report path (default OUT/gpu_report.json)")
    ap.add_argument("--round-cost", type=float, default=120, help="seconds one more candidate needs")
    ap.add_argument("--ft-harvest-limit", type=int, default=400)
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {}
    t = time.time()

    def save() -> None:
        result["wall_s"] = time.time() - t
        Path(args.report or out / "gpu_report.json").write_text(json.dumps(result, indent=2, default=str))

    if args.harvest_specs:
        harvest_specs(args, out, result, save)
    if args.corpus:
        tasc_ft(args, out, result, save, t)
    save()
    print(json.dumps({k: v for k, v in result.items() if not k.endswith("bench")}, indent=2, default=str))


if __name__ == "__main__":
    main()
