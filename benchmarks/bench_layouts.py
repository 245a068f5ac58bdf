"""Greedy decode speed with the quantised kernel layouts in one buffer on transparent huge pages
(quant.pack_together, the default) against each layout in a buffer of its own
(``TASC_HUGE_PAGES=0``): the shipped model loaded both ways in one process, the same prompts
decoded by each in turn, alternating the order every round.

    python -m benchmarks.bench_layouts [--threads 1 2] [--rounds 10] [--new-tokens 96] [--json out.json]

tasc's rate is new tokens over request latency (prefill included), the prompt prefix cache off.
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch

from benchmarks import save_report
from benchmarks.bench_threads import PROMPTS

VARIANTS = {"separate": "0", "together": "1"}  # TASC_HUGE_PAGES at load


def _huge_pages_mb() -> float:
    with open("/proc/self/smaps") as f:
        return sum(int(line.split()[1]) for line in f if line.startswith("AnonHugePages:")) / 1024


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--json", default=None, help="also write the report here")
    args = ap.parse_args(argv)
    from tasc.decode.engine import DecodeConfig, generate
    from tasc.eval.harness import cpu_name
    from tasc.models import load_model

    models, huge = {}, {}
    for name, env in VARIANTS.items():
        os.environ["TASC_HUGE_PAGES"] = env
        before = _huge_pages_mb()
        models[name] = load_model(kernels="auto")
        huge[name] = _huge_pages_mb() - before
    os.environ.pop("TASC_HUGE_PAGES")
    cfg = DecodeConfig(max_new_tokens=args.new_tokens, prefix_cache=False)
    report = {"cpu": cpu_name(), "weights": models["together"].weights, "huge_pages_mb": huge, "threads": {}}
    print(f"CPU: {report['cpu']}; weights: {report['weights']}")
    print("| threads | separate tok/s | together tok/s | together / separate | identical |\n|---|---|---|---|---|")
    for threads in args.threads:
        torch.set_num_threads(threads)
        rates: dict[str, list[float]] = {name: [] for name in models}
        tokens: dict[str, list] = {}
        for r in range(args.rounds + 1):  # round 0 warms up
            for name in (list(models) if r % 2 else list(models)[::-1]):
                lm = models[name]
                outs = generate(lm.backend, lm.tokenizer, PROMPTS, method="greedy", config=cfg)
                tokens[name] = [o.token_ids for o in outs]
                if r:
                    rates[name].append(sum(o.stats.new_tokens for o in outs) / sum(o.stats.latency_s for o in outs))
        med = {name: statistics.median(v) for name, v in rates.items()}
        same = tokens["separate"] == tokens["together"]
        report["threads"][threads] = {"tokens_per_s": med, "ratio": med["together"] / med["separate"],
                                      "identical": same, "rates": rates}
        print(f"| {threads} | {med['separate']:.1f} | {med['together']:.1f} | "
              f"{med['together'] / med['separate']:.2f} | {same} |")
    print(f"huge pages gained at load, MB: {huge}")
    save_report(report, args.json)
    return report


if __name__ == "__main__":
    main()
