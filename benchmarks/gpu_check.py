"""TASC on one accelerator, core only (no Prefect, no MLflow): spec decoding side by side
with greedy and prompt lookup, then one TASC-ft round with the GPU fine-tuning config
against the ft-only baseline at the same training budget.

    python -m benchmarks.gpu_check --model DIR --out OUT \
        [--harvest-specs snips=corpus.parquet,mbpp=corpus.parquet --harvest-limit 400] \
        [--spec snips --corpus corpus.parquet --steps 500 --tokens 200 --limit 32] [--spec-bench]

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

from tasc.bench import environment, markdown_table, run_benchmark, spread_sample
from tasc.draft import BoundDraft, build_draft_corpus
from tasc.engine import DecodeConfig, measure_verify_cost
from tasc.expand import expand_tokenizer, resize_and_init, round_trip_report
from tasc.finetune import cpu_config, finetune, gpu_config
from tasc.harvest import harvest
from tasc.models import load_model
from tasc.rounds import count_output_tokens
from tasc.runners import build_methods, verify_cost_summary
from tasc.spec import load_spec
from tasc.vocab import SelectionConfig, select_tokens


def bench(lms: dict, spec, rows: pd.DataFrame, draft_texts, methods: list[str], ft_draft_texts=None) -> dict:
    base = lms["base"]
    cost = measure_verify_cost(base.model)
    cfg = DecodeConfig(max_new_tokens=spec.generation.max_new_tokens, stop=spec.generation.stop)
    drafts = {"main": BoundDraft.from_corpus(draft_texts, base.tokenizer)}
    made = build_methods([m for m in methods if not m.startswith(("ft", "tasc-ft"))], base, cfg, spec.system_prompt,
                         spec.chat_template, drafts, cost)
    from tasc.bench import Method

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
    report = run_benchmark(made, rows["prompt"].tolist(), rows.to_dict("records"), spec.metric, ids=rows["id"].tolist())
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
        outs = harvest(lm, train["prompt"].tolist(), spec.generation.max_new_tokens, spec.system_prompt,
                       spec.chat_template, batch_size=args.batch)
        pd.DataFrame({"id": train["id"].tolist(), "prompt": train["prompt"].tolist(), "output": outs}).to_parquet(
            out / f"harvest-{name}.parquet")
        result["harvest"][name] = {"rows": len(outs), "seconds": time.time() - t0, "dtype": "float32"}
        print(name, result["harvest"][name], flush=True)
        save()
    del lm


def tasc_ft(args, out: Path, result: dict, save) -> None:
    spec = load_spec(args.spec)
    corpus = pd.read_parquet(args.corpus)
    train, val, test = (corpus[corpus.split == s] for s in ("train", "validation", "test"))
    test = spread_sample(test, args.limit)
    texts = train["completion"].tolist()
    if args.harvest:
        texts += pd.read_parquet(args.harvest)["output"].tolist()
    draft = build_draft_corpus(on_policy=texts)
    base = load_model(args.model, dtype=args.dtype)
    if args.spec_bench:
        result["spec_bench"] = bench({"base": base}, spec, test, draft, ["greedy", "pld", "tasc-spec"])
        print(markdown_table(result["spec_bench"]), flush=True)
        save()
    # One TASC-ft round against ft-only, same fine-tuning config and steps.
    make_cfg = gpu_config if torch.cuda.is_available() else cpu_config
    ft_cfg = make_cfg(max_steps=args.steps, eval_every=max(args.steps // 3, 1), save_every=args.steps)
    result["ft_config"] = ft_cfg.__dict__
    sel = select_tokens(train["completion"].tolist(), base.tokenizer, SelectionConfig(tokens_per_round=args.tokens))
    lms = {"base": base}
    for name in ("ft-only", "tasc-ft"):
        lm = load_model(args.model, dtype="float32")
        tok = lm.tokenizer
        if name == "tasc-ft":
            tok = expand_tokenizer(base.tokenizer, sel.tokens)
            added = resize_and_init(lm.model, base.tokenizer, tok, sel.tokens)
            result["added_params"] = added
            result["added_params_pct"] = 100.0 * added / sum(p.numel() for p in lm.model.parameters())
            result["round_trip"] = {k: v for k, v in round_trip_report(tok, texts[:5000]).items() if k != "failures"}
        t0 = time.time()
        res = finetune(lm.model, tok, train, val, ft_cfg, out / f"ft-{name}", spec.chat_template, spec.system_prompt,
                       progress=False)
        result[f"{name}_finetune"] = {"steps": res.steps, "train_loss": res.train_loss, "val_loss": res.val_loss,
                                      "seconds": time.time() - t0, "tokens_per_s": res.tokens_per_s,
                                      "history": [h for h in res.history if "val_loss" in h]}
        lms[name] = load_model(str(res.checkpoint_dir), dtype=args.dtype)
        result[f"{name}_val_tokens_per_completion"] = float(
            count_output_tokens(lms[name].tokenizer, val["completion"].tolist()).mean())
        print(name, result[f"{name}_finetune"], flush=True)
        save()
    ft = lms["tasc-ft"]
    rows = spread_sample(train, args.ft_harvest_limit)
    t0 = time.time()
    ft_texts = harvest(ft, rows["prompt"].tolist(), spec.generation.max_new_tokens, spec.system_prompt,
                       spec.chat_template, batch_size=args.batch)
    result["ft_harvest"] = {"rows": len(ft_texts), "seconds": time.time() - t0}
    result["ft_bench"] = bench(lms, spec, test, draft, ["greedy", "ft-only", "tasc-ft", "tasc-ft+spec"],
                               build_draft_corpus(on_policy=ft_texts))
    print(markdown_table(result["ft_bench"]), flush=True)


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
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--ft-harvest-limit", type=int, default=400)
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {}
    t = time.time()

    def save() -> None:
        result["wall_s"] = time.time() - t
        (out / "gpu_report.json").write_text(json.dumps(result, indent=2, default=str))

    if args.harvest_specs:
        harvest_specs(args, out, result, save)
    if args.corpus:
        tasc_ft(args, out, result, save)
    save()
    print(json.dumps({k: v for k, v in result.items() if not k.endswith("bench")}, indent=2, default=str))


if __name__ == "__main__":
    main()
