"""The prompt prefix cache (tasc.accel.prefix) on a task's prompts: each prompt computed in full
("cold", what ``tasc bench`` and llama.cpp's runs time) against the same prompt started from
the stored rows of the earlier prompts ("warm", what a service answering the task sees),
interleaved prompt by prompt in one process.

Reports, per mode, the median time to the first token (the prompt's pass) and to the whole
completion (greedy, or TASC-spec with the task's draft), the prompt tokens reused, and whether
the warm tokens equal the cold ones.

    python -m benchmarks.bench_prefix snips [--method greedy|tasc-spec] [--limit 40] [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from benchmarks import save_report


def _run(lm, ids: list[int], cfg, proposer=None) -> tuple[float, float, list[int], int]:
    """(seconds to the first token, seconds in all, tokens, prompt tokens reused) of one request."""
    from tasc.decode.engine import decode

    out = decode(lm.backend, lm.tokenizer, ids, proposer, cfg)
    return out.stats.first_token_s, out.stats.latency_s, out.token_ids, out.stats.reused_prompt_tokens


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("spec")
    ap.add_argument("--method", choices=("greedy", "tasc-spec"), default="greedy")
    ap.add_argument("--draft", default="auto", help="tasc-spec's draft: auto (the task's built draft), none or a path")
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--model", default=None)
    ap.add_argument("--json", default=None, help="also write the report here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from dataclasses import replace

    from benchmarks.bench_batch import find_draft
    from flows.stages import ingest_flow
    from storage import corpus as store
    from storage.settings import configure
    from tasc.data.prompts import encode_prompts
    from tasc.data.spec import load_spec
    from tasc.decode.engine import DecodeConfig, measure_verify_cost
    from tasc.decode.proposer import Proposer, new_trust
    from tasc.eval.harness import environment, spread_sample
    from tasc.models import DEFAULT_MODEL, load_model

    configure()
    spec = load_spec(args.spec)
    lm = load_model(args.model or DEFAULT_MODEL, dtype=args.dtype, device="cpu", kernels="auto")
    if lm.backend.prefixes is None:
        raise SystemExit(f"no prefix cache on this backend (kernels: {lm.kernels}): prompts are always computed in full")
    corpus = ingest_flow(args.spec)["path"]
    rows = spread_sample(store.read_corpus(corpus, split="test"), args.limit).to_dict("records")
    proposers = {"cold": lambda: None, "warm": lambda: None}
    if args.method == "tasc-spec":  # each mode its own proposers' calibration, as its own runner
        draft, _ = find_draft(args.draft, spec.name, Path(corpus).name, args.model or DEFAULT_MODEL, lm.tokenizer)
        cost, trusts = measure_verify_cost(lm.model), {mode: new_trust() for mode in proposers}
        proposers = {mode: (lambda m=mode: Proposer(draft, None, cost, trusts[m])) for mode in proposers}
    prompts = encode_prompts(lm.tokenizer, rows, spec.system_prompt, spec.chat_template)
    warm = DecodeConfig(max_new_tokens=spec.generation.max_new_tokens, stop=spec.generation.stop)
    cold = replace(warm, prefix_cache=False)
    for ids in prompts[:2]:  # warm-up
        _run(lm, ids, cold, proposers["cold"]()), _run(lm, ids, warm, proposers["warm"]())
    lm.backend.prefixes.clear()
    _run(lm, prompts[-1], warm, proposers["warm"]())  # the store holds one earlier prompt of the task
    res: dict[str, list] = {"cold": [], "warm": []}
    for i, ids in enumerate(prompts):
        order = ("cold", "warm") if i % 2 == 0 else ("warm", "cold")
        for mode in order:
            res[mode].append(_run(lm, ids, cold if mode == "cold" else warm, proposers[mode]()))
    same = sum(c[2] == w[2] for c, w in zip(res["cold"], res["warm"], strict=True)) / len(prompts)
    report = {"spec": args.spec, "method": args.method, "prompts": len(prompts), "threads": args.threads,
              "environment": environment(lm.weights, "cpu", lm.kernels),
              "prompt_tokens_mean": statistics.mean(len(p) for p in prompts), "identical": same, "modes": {}}
    for mode, runs in res.items():
        report["modes"][mode] = {"first_token_ms_p50": 1e3 * statistics.median(r[0] for r in runs),
                                 "latency_ms_p50": 1e3 * statistics.median(r[1] for r in runs),
                                 "reused_tokens_mean": statistics.mean(r[3] for r in runs)}
    c, w = report["modes"]["cold"], report["modes"]["warm"]
    report["first_token_speedup"] = c["first_token_ms_p50"] / w["first_token_ms_p50"]
    report["latency_speedup"] = c["latency_ms_p50"] / w["latency_ms_p50"]
    env = report["environment"]
    print(f"{args.spec}, {args.method}, {len(prompts)} prompts of {report['prompt_tokens_mean']:.0f} tokens on average, "
          f"{args.threads} thread(s), {env.get('cpu')}, {lm.weights}")
    print("| mode | first token ms (p50) | request ms (p50) | prompt tokens reused |\n|---|---|---|---|")
    for mode, m in report["modes"].items():
        print(f"| {mode} | {m['first_token_ms_p50']:.1f} | {m['latency_ms_p50']:.1f} | {m['reused_tokens_mean']:.1f} |")
    print(f"first token x{report['first_token_speedup']:.2f}, request x{report['latency_speedup']:.2f}; "
          f"warm tokens identical to cold on {same:.2f} of prompts")
    save_report(report, args.json)
    return report


if __name__ == "__main__":
    main()
