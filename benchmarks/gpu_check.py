"""TASC on one accelerator, core only (no Prefect, no MLflow): spec decoding side by side
with greedy and prompt lookup, then one TASC-ft round with the GPU fine-tuning config
against the ft-only baseline at the same training budget.

    python -m benchmarks.gpu_check --model DIR --corpus corpus.parquet --harvest harvest.parquet \
        --spec snips --out OUT [--limit 30] [--steps 300] [--tokens 200]

Writes OUT/gpu_report.json and prints readable tables. Runs on CPU too (for a dry run with a
tiny model); it uses CUDA when available.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd
import torch

from tasc.bench import environment, markdown_table, run_benchmark
from tasc.draft import BoundDraft, build_draft_corpus
from tasc.engine import DecodeConfig, measure_verify_cost
from tasc.finetune import cpu_config, finetune, gpu_config
from tasc.models import load_model
from tasc.rounds import count_output_tokens
from tasc.runners import build_methods, verify_cost_summary
from tasc.spec import load_spec
from tasc.vocab import SelectionConfig, expand_tokenizer, resize_and_init, round_trip_report, select_tokens


def bench(lms: dict, spec, rows: pd.DataFrame, draft_texts, methods: list[str]) -> dict:
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
        bound = {"main": BoundDraft.from_corpus(draft_texts, ft.tokenizer)}  # the same text draft, rebound
        made += [Method("tasc-ft+spec", m.run) for m in build_methods(
            ["tasc-spec"], ft, cfg, spec.system_prompt, spec.chat_template, bound, measure_verify_cost(ft.model))]
    report = run_benchmark(made, rows["prompt"].tolist(), rows.to_dict("records"), spec.metric, ids=rows["id"].tolist())
    report.update(spec=spec.name, environment=environment(str(base.dtype), base.device),
                  verify_cost=verify_cost_summary(cost))
    report.pop("per_sample", None)
    return report


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--harvest", default=None)
    ap.add_argument("--spec", default="snips")
    ap.add_argument("--out", required=True)
    ap.add_argument("--limit", type=int, default=30)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    spec = load_spec(args.spec)
    corpus = pd.read_parquet(args.corpus)
    train, val, test = (corpus[corpus.split == s] for s in ("train", "validation", "test"))
    test = test.iloc[: args.limit]
    texts = train["completion"].tolist()
    if args.harvest:
        texts += pd.read_parquet(args.harvest)["output"].tolist()
    draft = build_draft_corpus(on_policy=texts)
    result: dict = {}
    t = time.time()
    base = load_model(args.model, dtype=args.dtype)
    result["spec_bench"] = bench({"base": base}, spec, test, draft, ["greedy", "pld", "tasc-spec"])
    print(markdown_table(result["spec_bench"]), flush=True)
    # One TASC-ft round against ft-only, same fine-tuning config and steps.
    cuda = torch.cuda.is_available()
    make_cfg = gpu_config if cuda else cpu_config
    ft_cfg = make_cfg(max_steps=args.steps, eval_every=max(args.steps // 3, 1), save_every=args.steps)
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
                                      "seconds": time.time() - t0, "tokens_per_s": res.tokens_per_s}
        lms[name] = load_model(str(res.checkpoint_dir), dtype=args.dtype)
        result[f"{name}_val_tokens_per_completion"] = float(
            count_output_tokens(lms[name].tokenizer, val["completion"].tolist()).mean())
    result["ft_bench"] = bench(lms, spec, test, draft, ["greedy", "ft-only", "tasc-ft", "tasc-ft+spec"])
    print(markdown_table(result["ft_bench"]), flush=True)
    result["wall_s"] = time.time() - t
    (out / "gpu_report.json").write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps({k: v for k, v in result.items() if not k.endswith("bench")}, indent=2, default=str))


if __name__ == "__main__":
    main()
