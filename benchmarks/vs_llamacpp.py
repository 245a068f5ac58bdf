"""tasc beside llama.cpp on the same GGUF, prompts and thread count, interleaved in one run.

    python -m benchmarks.vs_llamacpp snips --limit 20 --threads 1 [--dtype auto] [--llama-cpp DIR]

Runs the benchmark stage (``tasc bench``) with the methods greedy, tasc-spec, llama.cpp and
llama.cpp-lookup (llama.cpp's lookup decoding with a static n-gram cache built from the same
draft texts TASC-spec uses), then prints tok/s, chars/s and the ratios the engine targets are
stated in. llama.cpp is built once outside the repo (../shared/tools/build-llama-cpp.sh) or
found through ``--llama-cpp`` / ``TASC_LLAMA_CPP``; it is not a dependency of tasc or its tests.
"""

from __future__ import annotations

import argparse
import json
import os

from storage.settings import configure

METHODS = "greedy,tasc-spec,llama.cpp,llama.cpp-lookup"
RATIOS = (("greedy", "llama.cpp"), ("tasc-spec", "llama.cpp"), ("tasc-spec", "llama.cpp-lookup"),
          ("llama.cpp-lookup", "llama.cpp"), ("tasc-spec", "greedy"))


def ratios(methods: dict) -> dict[str, dict[str, float | None]]:
    """a/b for chars/s and tokens/s of the method pairs in RATIOS present in the report."""
    out = {}
    for a, b in RATIOS:
        if a in methods and b in methods:
            out[f"{a} / {b}"] = {k: (methods[a][k] / methods[b][k] if methods[b][k] else None)
                                 for k in ("chars_per_s", "tokens_per_s")}
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("spec")
    ap.add_argument("--limit", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--model", default=None, help="a GGUF model (default: the shipped one)")
    ap.add_argument("--methods", default=METHODS)
    ap.add_argument("--harvest-limit", type=int, default=400)
    ap.add_argument("--llama-cpp", default=None, help="llama.cpp's bin/ folder (default: TASC_LLAMA_CPP or the cache)")
    ap.add_argument("--report", default=None, help="also write the JSON summary here")
    args = ap.parse_args(argv)
    if args.llama_cpp:
        os.environ["TASC_LLAMA_CPP"] = args.llama_cpp
    configure()
    from flows.stages import bench_flow
    from tasc.models import DEFAULT_MODEL

    summary = bench_flow(args.spec, args.model or DEFAULT_MODEL, args.methods, args.limit, args.dtype,
                         harvest_limit=args.harvest_limit, threads=args.threads)
    methods = summary["methods"]
    env = summary["environment"]
    print(f"\n{args.spec}, {args.limit} prompts, {args.threads} thread(s), {env.get('cpu')}, tasc dtype "
          f"{env.get('dtype')}, kernels {env.get('kernels')}")
    print("| method | chars/s | tokens/s | p50 ms | first token ms | mean accepted | metric |\n"
          "|---|---|---|---|---|---|---|")
    for name, m in methods.items():
        acc, first = m.get("mean_accepted_length"), m.get("first_token_ms_p50")
        print(f"| {name} | {m['chars_per_s']:.1f} | {m['tokens_per_s']:.1f} | {m['latency_ms_p50']:.0f} | "
              f"{'-' if first is None else f'{first:.0f}'} | {'-' if acc is None else f'{acc:.2f}'} | {m['metric']:.3f} |")
    table = ratios(methods)
    print("\n| ratio | chars/s | tokens/s |\n|---|---|---|")
    for name, r in table.items():
        print(f"| {name} | {r['chars_per_s']:.2f} | {r['tokens_per_s']:.2f} |")
    print(f"\nreport: {summary['paths']['json']}")
    result = {"spec": args.spec, "limit": args.limit, "threads": args.threads, "environment": env,
              "methods": methods, "ratios": table, "report": summary["paths"]["json"]}
    if args.report:
        with open(args.report, "w") as f:
            json.dump(result, f, indent=2, default=str)
    return result


if __name__ == "__main__":
    main()
