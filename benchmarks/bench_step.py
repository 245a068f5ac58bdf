"""Micro-benchmark of one decode or verify step on the CPU: transformers' forward against the
lean decoder forward (tasc.accel.lean_decoder), and the path engine.decode takes (lean forward plus
the exact argmax head), side by side and interleaved, after a prefill of ``--context`` tokens.

Prints, for each step length T, the median and fastest time of each path, the ratio of
transformers' time to the lean forward's, and V(T) of the engine path (its T-token step over
its one-token step); reports on the way the largest difference between the lean hidden states
and transformers' (same linear kernels; the lean steps attend row by row, transformers with SDPA).

    python -m benchmarks.bench_step [--dtype float32|gguf|q8_0|q4_1] [--context 210] [--reps 15] [--json out.json]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from benchmarks import save_report
from tasc.models import DEFAULT_MODEL

LENGTHS = (1, 2, 4, 8, 12, 17)


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--context", type=int, default=210, help="tokens in the cache before each step")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--json", default=None, help="also write the report here")
    ap.add_argument("--dtype", default="float32", help="weights: float32, gguf, q8_0, q4_0, q4_1 or auto")
    args = ap.parse_args()
    from transformers import DynamicCache

    from tasc.models import load_model

    lm = load_model(args.model, dtype=args.dtype, device="cpu", kernels="auto")
    model, lean = lm.model, lm.backend.lean
    if lean is None:
        raise SystemExit(f"no lean decoder for this model or CPU (kernels: {lm.kernels})")
    rng = np.random.default_rng(0)
    vocab = model.get_input_embeddings().weight.shape[0]
    prompt = rng.integers(0, vocab, args.context).tolist()
    cache = DynamicCache(config=model.config)
    model.base_model(input_ids=torch.tensor([prompt]), cache=cache, use_cache=True)
    steps = lm.backend.start()  # the step object engine.decode runs
    steps.argmax(prompt, keep=1)
    steps.crop(1)  # the same cached context for all three paths
    lean_cache = lean.new_cache()
    lean.forward(prompt, lean_cache)

    times: dict[str, dict[int, list[float]]] = {k: {t: [] for t in LENGTHS} for k in ("transformers", "lean", "engine")}
    diff = 0.0
    for _ in range(args.reps + 1):  # the first round warms up and is dropped
        for t in LENGTHS:
            ids = rng.integers(0, vocab, t).tolist()
            t0 = time.perf_counter()
            ref = model.base_model(input_ids=torch.tensor([ids]), cache=cache, use_cache=True).last_hidden_state[0]
            times["transformers"][t].append(time.perf_counter() - t0)
            cache.crop(-t)
            t0 = time.perf_counter()
            got = lean.forward(ids, lean_cache)
            times["lean"][t].append(time.perf_counter() - t0)
            lean_cache.crop(-t)
            diff = max(diff, float((ref - got).abs().max()))
            t0 = time.perf_counter()
            steps.argmax(ids, keep=t)
            times["engine"][t].append(time.perf_counter() - t0)
            steps.crop(t)

    def stat(path: str, t: int) -> tuple[float, float]:
        v = np.array(times[path][t][1:]) * 1e3
        return float(np.median(v)), float(v.min())

    rows = []
    base = stat("engine", 1)[1]
    for t in LENGTHS:
        (tm, tf), (lm_, lf), (em, ef) = stat("transformers", t), stat("lean", t), stat("engine", t)
        rows.append({"T": t, "transformers_ms": tm, "transformers_min_ms": tf, "lean_ms": lm_, "lean_min_ms": lf,
                     "engine_ms": em, "engine_min_ms": ef, "transformers_over_lean": tm / lm_, "V": ef / base})
    report = {"model": args.model, "kernels": lm.kernels, "context": args.context, "reps": args.reps,
              "threads": torch.get_num_threads(), "weights": lm.weights, "max_abs_diff": diff, "steps": rows}
    print(f"{lm.kernels}; {args.context} cached tokens; {torch.get_num_threads()} threads; median (fastest) of "
          f"{args.reps}; largest |lean - transformers| in the hidden states: {diff:.2e}")
    print("| T | transformers ms | lean ms | transformers / lean | engine (lean + argmax head) ms | V(T) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['T']} | {r['transformers_ms']:.1f} ({r['transformers_min_ms']:.1f}) | {r['lean_ms']:.1f} "
              f"({r['lean_min_ms']:.1f}) | {r['transformers_over_lean']:.2f} | {r['engine_ms']:.1f} "
              f"({r['engine_min_ms']:.1f}) | {r['V']:.2f} |")
    save_report(report, args.json)


if __name__ == "__main__":
    main()
