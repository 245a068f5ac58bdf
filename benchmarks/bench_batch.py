"""Batched decoding against one-request-at-a-time decoding on a task's test prompts.

Four methods on the same N prompts, in one process, with the same dtype and threads:

* ``greedy-b1``: engine.generate greedy, one prompt at a time (the reference);
* ``tasc-spec-b1``: engine.generate with the task draft, one prompt at a time;
* ``greedy-bB``: batch_engine.generate_batch greedy, B prompts per batch;
* ``tasc-spec-bB``: generate_batch with the task draft.

The prompts are sorted by token length and cut into groups of B (as generate_batch groups
them); each group runs through all four methods, the order rotating from group to group so
drift (thermal, other load) hits them alike, after one warm-up group. Speed is total output
characters over the total wall time of a method's calls: the rows of a batch run at once,
so their latencies overlap and are not summed. ``model_passes`` counts the forward calls
the model ran (a batch runs until its slowest row ends); ``row_passes`` the passes each
request took part in. The Proposer's verify-cost table is measured once at batch size 1.

    python -m benchmarks.bench_batch [--spec snips] [--model smollm2-135m-instruct] [--n 32] [--batch 4]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence

import numpy as np

from tasc.data.prompts import Row, encode_prompts
from tasc.decode import engine
from tasc.decode.batch_engine import generate_batch
from tasc.decode.draft import BoundDraft
from tasc.decode.engine import DecodeConfig, Output
from tasc.models import DEFAULT_MODEL


def _methods(lm, batch: int, draft: BoundDraft | None, cfg: DecodeConfig, cost, system_prompt, chat_template
             ) -> dict[str, Callable[[list[Row]], list[Output]]]:
    common = dict(config=cfg, system_prompt=system_prompt, chat_template=chat_template, cost=cost)

    def single(method):
        return lambda ps: engine.generate(lm.model, lm.tokenizer, ps, draft=draft, method=method, **common)

    def batched(method):
        return lambda ps: generate_batch(lm.model, lm.tokenizer, ps, draft=draft, method=method,
                                         batch_size=batch, **common)

    return {"greedy-b1": single("greedy"), "tasc-spec-b1": single("tasc-spec"),
            f"greedy-b{batch}": batched("greedy"), f"tasc-spec-b{batch}": batched("tasc-spec")}


def compare(lm, prompts: Sequence[Row], batch: int, draft: BoundDraft | None, cfg: DecodeConfig,
            cost=None, system_prompt: str | None = None, chat_template: bool = True, warmup: int = 1,
            metric: str | None = None, rows: Sequence[dict] | None = None) -> dict:
    """Run the four methods over ``prompts`` interleaved by group; returns the report dict.

    rows: corpus rows in the order of ``prompts`` for ``metric`` (both optional)."""
    if batch < 2:
        raise ValueError("--batch must be at least 2 (batch 1 is the reference)")
    methods = _methods(lm, batch, draft, cfg, cost, system_prompt, chat_template)
    ids = encode_prompts(lm.tokenizer, prompts, system_prompt, chat_template)
    order = sorted(range(len(prompts)), key=lambda i: len(ids[i]))
    groups = [order[s : s + batch] for s in range(0, len(order), batch)]
    for g in groups[:warmup]:
        for run in methods.values():
            run([prompts[i] for i in g])
    names = list(methods)
    outs: dict[str, list[Output]] = {n: [None] * len(prompts) for n in names}  # type: ignore[list-item]
    wall = dict.fromkeys(names, 0.0)
    calls = dict.fromkeys(names, 0)
    for k, g in enumerate(groups):
        for name in names[k % len(names) :] + names[: k % len(names)]:
            t = time.perf_counter()
            res = methods[name]([prompts[i] for i in g])
            wall[name] += time.perf_counter() - t
            for i, o in zip(g, res, strict=True):
                outs[name][i] = o
            passes = [o.stats.forward_passes for o in res]
            # one prompt at a time: every pass is a model call; batched: the slowest row's count
            calls[name] += sum(passes) if name.endswith("-b1") else max(passes)
    ref = outs["greedy-b1"]
    report: dict = {"samples": len(prompts), "batch": batch, "max_new_tokens": cfg.max_new_tokens,
                    "metric_name": metric, "methods": {}}
    for name in names:
        st = [o.stats for o in outs[name]]
        chars, drafted = sum(s.chars for s in st), sum(s.drafted for s in st)
        same_text = [a.text == b.text for a, b in zip(outs[name], ref, strict=True)]
        same_ids = [a.token_ids == b.token_ids for a, b in zip(outs[name], ref, strict=True)]
        entry = {
            "wall_s": wall[name],
            "output_chars": chars,
            "output_tokens": sum(s.new_tokens for s in st),
            "chars_per_s": chars / max(wall[name], 1e-9),
            "model_passes": calls[name],
            "row_passes": sum(s.forward_passes for s in st),
            "acceptance_rate": sum(s.accepted for s in st) / drafted if drafted else None,
            "identical_to_greedy": float(np.mean(same_text)),
            "identical_tokens": float(np.mean(same_ids)),
            "differing": [i for i, s in enumerate(same_ids) if not s][:50],
        }
        if metric and rows is not None:
            from tasc.eval.metrics import score_many

            entry["metric"] = float(np.mean(score_many(metric, [o.text for o in outs[name]], rows)))
        report["methods"][name] = entry
    base = report["methods"]["greedy-b1"]["chars_per_s"]
    same_batch = {"-b1": base, f"-b{batch}": report["methods"][f"greedy-b{batch}"]["chars_per_s"]}
    for name, e in report["methods"].items():
        e["x_greedy_b1"] = e["chars_per_s"] / base if base else None
        b = same_batch[name[name.rindex("-b"):]]
        e["x_greedy_same_batch"] = e["chars_per_s"] / b if b else None
    return report


def _fmt(v, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def markdown_table(report: dict) -> str:
    lines = ["| method | chars/s | x greedy b1 | x greedy same batch | model passes | row passes "
             "| accept rate | identical | metric |", "|---|---|---|---|---|---|---|---|---|"]
    for name, e in report["methods"].items():
        lines.append(f"| {name} | {e['chars_per_s']:.1f} | {_fmt(e['x_greedy_b1'])} | "
                     f"{_fmt(e['x_greedy_same_batch'])} | {e['model_passes']} | {e['row_passes']} | "
                     f"{_fmt(e['acceptance_rate'])} | {_fmt(e['identical_to_greedy'])} | "
                     f"{_fmt(e.get('metric'), '.3f')} |")
    env = report.get("environment", {})
    tail = (f"\n\n{report['samples']} samples of {report.get('spec', '?')} ({report.get('model', '?')}), "
            f"batch {report['batch']}, max_new_tokens {report['max_new_tokens']}")
    if env:
        tail += f"; weights {env.get('dtype')}, {env.get('threads')} threads, kernels {env.get('kernels', 'torch')}, torch {env.get('torch')}, {env.get('cpu')}"
    return "\n".join(lines) + tail + "\n"


def find_draft(choice: str, spec_name: str, version: str, model: str, tokenizer) -> tuple[BoundDraft | None, str]:
    """auto: the on-policy draft for this model, else the references draft; none; or a path."""
    from storage.drafts import draft_path, read_draft
    from tasc.decode.draft import check_compatible

    if choice == "none":
        return None, "none"
    if choice != "auto":
        return BoundDraft.from_corpus(read_draft(choice), tokenizer), choice
    for src in ("on-policy", "references"):
        p = draft_path(spec_name, version, src, model if src != "references" else None)
        if p.exists():
            d = read_draft(p)
            check_compatible(d, version)
            return BoundDraft.from_corpus(d, tokenizer), str(p)
    return None, "none found (context n-grams only); build one with `tasc draft SPEC`"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spec", default="snips")
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--n", type=int, default=32, help="test prompts")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--split", default="test")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--draft", default="auto", help="auto | none | a draft .parquet path")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default: the spec's")
    ap.add_argument("--warmup", type=int, default=1, help="warm-up groups")
    ap.add_argument("--json", default=None, help="also write the report here")
    args = ap.parse_args()
    from storage import corpus as store
    from storage.settings import configure

    configure()
    import torch

    from tasc.data.spec import load_spec
    from tasc.eval.harness import environment, spread_sample
    from tasc.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    spec = load_spec(args.spec)
    path = store.latest_corpus(spec.name)
    rows = spread_sample(store.read_corpus(path, split=args.split), args.n)
    if rows.empty:
        raise SystemExit(f"the {args.split} split of {spec.name} is empty")
    lm = load_model(args.model, dtype=args.dtype, kernels="auto")
    draft, draft_src = find_draft(args.draft, spec.name, path.name, args.model, lm.tokenizer)
    cost = engine.measure_verify_cost(lm.model)
    # Every prompt computed in full, in the sequential runs and in the batches alike: with the
    # prefix cache (tasc.accel.prefix) the second method on a prompt would find it cached.
    cfg = DecodeConfig(max_new_tokens=args.max_new_tokens or spec.generation.max_new_tokens,
                       stop=spec.generation.stop, prefix_cache=False)
    records = rows.to_dict("records")  # corpus rows: their system and messages count too
    report = compare(lm, records, args.batch, draft, cfg, cost, spec.system_prompt,
                     spec.chat_template, args.warmup, spec.metric, records)
    report.update(spec=spec.name, model=args.model, corpus_version=path.name, split=args.split, draft=draft_src,
                  environment=environment(lm.weights, lm.device, lm.kernels),
                  verify_cost={f"V{k}": float(cost[k]) for k in (2, 4, 8, 16) if k < len(cost)})
    text = json.dumps(report, indent=2, default=str)
    print(text)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
    print(markdown_table(report))


if __name__ == "__main__":
    main()
