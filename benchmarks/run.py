"""The side-by-side benchmark of `tasc bench`, with the settings of the published CPU table.

For each spec: ingest (cached), build or reuse the on-policy draft, then run the methods
interleaved per test prompt in one process after a warm-up, and print the Markdown table
and where the JSON report and the chart are. It calls the flow `tasc bench` calls
(flows.stages.bench_flow), so the run is logged in MLflow like any other. `make bench` runs
it on SNIPS.

    python -m benchmarks.run [SPEC ...] [--model smollm2-135m-instruct] [--limit 20]
        [--methods greedy,pld,tasc-spec,context-only,tasc-spec-ref] [--dtype auto]
        [--harvest-limit 400] [--report-dir DIR]

The first run on a spec harvests the model's own outputs on ``--harvest-limit`` train prompts
for the draft; later runs reuse it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tasc.models import DEFAULT_MODEL

DEFAULT_METHODS = "greedy,pld,tasc-spec,context-only,tasc-spec-ref"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    ap.add_argument("specs", nargs="*", default=["snips"], help="spec names or YAML paths (default: snips)")
    ap.add_argument("--model", default=DEFAULT_MODEL, help="short name, local folder or Hugging Face id")
    ap.add_argument("--methods", default=DEFAULT_METHODS, help="comma-separated benchmark methods")
    ap.add_argument("--limit", type=int, default=20, help="test prompts per spec")
    ap.add_argument("--dtype", default="auto",
                    help="auto (on a CPU: the GGUF file's own quantised blocks, else q8_0) | float32 | q8_0 | ...")
    ap.add_argument("--harvest-limit", type=int, default=400, help="train prompts for the on-policy draft")
    ap.add_argument("--report-dir", default=None, help="also write SPEC.json reports into this folder")
    return ap


def main(argv: list[str] | None = None) -> list[dict]:
    args = build_parser().parse_args(argv)
    from storage.settings import configure

    configure()
    from flows.stages import bench_flow

    summaries = []
    for spec in args.specs:
        report = None
        if args.report_dir:
            Path(args.report_dir).mkdir(parents=True, exist_ok=True)
            report = str(Path(args.report_dir) / f"{Path(spec).stem}.json")
        summary = bench_flow(spec, args.model, args.methods, args.limit, args.dtype, report,
                             harvest_limit=args.harvest_limit)
        print(Path(summary["paths"]["markdown"]).read_text())
        print(f"report: {summary['paths']['json']}\nchart: {summary['paths']['chart']}\n")
        summaries.append(summary)
    return summaries


if __name__ == "__main__":
    main()
