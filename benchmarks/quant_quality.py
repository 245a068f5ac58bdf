"""Task metric of quantised decoding against fp32, on the same test prompts.

    python -m benchmarks.quant_quality snips squad mbpp --limit 40 [--weights gguf,q8_0] [--splits test] [--json out.json]

For each spec, greedy outputs of the model in float32 and in each quantised weight format
(``gguf``: the GGUF file's own blocks; ``q8_0``/``q4_0``/``q4_1``: quantised at load), scored
with the spec's metric and with chrF against the references, plus how many outputs are the
same text as fp32's and on how many prompts each format scores better or worse than fp32
(the paired difference: what decides whether a gap is more than noise). The ingested corpus comes from the state folder (``tasc ingest SPEC``).
"""

from __future__ import annotations

import argparse

import pandas as pd
import torch

from benchmarks import save_report


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("specs", nargs="+")
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--weights", default="gguf,q8_0")
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--splits", default="test",
                    help="corpus splits to draw prompts from, comma-separated (a model fine-tuned on 'train' has "
                         "seen those prompts: fine for comparing weight formats, not for the metric's level)")
    ap.add_argument("--shard", default="0/1",
                    help="I/N: only prompts I, I+N, I+2N, ... of the sample, to spread a long run over processes "
                         "(the shards' prompt counts, better and worse add up; metrics average by prompts)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    shard, shards = (int(v) for v in args.shard.split("/"))
    if not 0 <= shard < shards:
        ap.error(f"--shard {args.shard}: I must be from 0 to N-1")
    torch.set_num_threads(args.threads)
    from flows.stages import ingest_flow
    from storage import corpus as store
    from storage.settings import configure
    from tasc import progress_bar
    from tasc.data.spec import load_spec
    from tasc.decode.engine import DecodeConfig, generate
    from tasc.eval.harness import spread_sample
    from tasc.eval.metrics import score_many
    from tasc.models import DEFAULT_MODEL, load_model

    configure()
    model = args.model or DEFAULT_MODEL
    variants = ["float32", *args.weights.split(",")]
    loaded = {w: load_model(model, dtype=w, device="cpu", kernels="auto") for w in variants}
    report: dict = {"model": model, "threads": args.threads, "shard": args.shard, "specs": {},
                    "weights": {w: lm.weights for w, lm in loaded.items()}}
    for name in args.specs:
        spec = load_spec(name)
        corpus = ingest_flow(name)
        table = pd.concat([store.read_corpus(corpus["path"], split=split) for split in args.splits.split(",")],
                          ignore_index=True)
        rows = spread_sample(table, args.limit).to_dict("records")[shard::shards]
        cfg = DecodeConfig(max_new_tokens=spec.generation.max_new_tokens, stop=spec.generation.stop)
        texts: dict[str, list[str]] = {w: [] for w in loaded}
        with progress_bar(len(rows) * len(loaded), desc=name, unit="req") as bar:
            for row in rows:  # prompt by prompt, every format: the ETA holds from the start
                for w, lm in loaded.items():
                    out = generate(lm.backend, lm.tokenizer, [row], None, "greedy", cfg, spec.system_prompt,
                                   spec.chat_template)
                    texts[w].append(out[0].text)
                    bar.update()
        entry, base = {}, score_many(spec.metric, texts["float32"], rows)
        for w, out in texts.items():
            scores = score_many(spec.metric, out, rows)
            entry[w] = {"metric": float(sum(scores) / len(rows)),
                        "chrf": float(sum(score_many("chrf", out, rows)) / len(rows)),
                        "same_as_fp32": sum(a == b for a, b in zip(out, texts["float32"], strict=True)) / len(rows),
                        # paired: the prompts this format scores better / worse than fp32 on
                        "better": sum(a > b for a, b in zip(scores, base, strict=True)),
                        "worse": sum(a < b for a, b in zip(scores, base, strict=True))}
        report["specs"][name] = {"metric": spec.metric, "prompts": len(rows), "splits": args.splits, "results": entry}
        print(f"\n{name} ({len(rows)} prompts from {args.splits}, metric {spec.metric})")
        print("| weights | metric | chrF | same text as fp32 | prompts better / worse than fp32 |\n|---|---|---|---|---|")
        for w, e in entry.items():
            print(f"| {loaded[w].weights} | {e['metric']:.3f} | {e['chrf']:.2f} | {e['same_as_fp32']:.2f} "
                  f"| {e['better']} / {e['worse']} |")
    save_report(report, args.json)
    return report


if __name__ == "__main__":
    main()
