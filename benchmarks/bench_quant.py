"""Micro-benchmark of the quantised linear kernels (tasc.accel.quant) on SmolLM2's weights.

Times one layer's linears and all 30 layers' (q/k/v fused, o, gate/up fused, down: the four
products of a decoder layer) at M = 1, 2, 4, 8, 12, 17 rows, with the weights as the shipped
GGUF stores them (Q4_1), requantised to Q8_0, and dequantised to fp32 in the packed fp32 kernel
(tasc.accel.packed), on 1 and 2 threads; the other SIMD variants of the kernel that run here on
all layers and one thread; and the tied Q8_0 LM head's argmax. The quantised layers are timed
twice: just after the same product (the weights in cache as far as they fit) and after flushing
the caches (streamed from memory). Each time is the fastest of ``--reps`` rounds, the cases in a
new random order every round (other jobs on the machine then slow all cases alike). GB/s is the
weight bytes over that time. Prints the CPU and the chosen kernel variant.

    python -m benchmarks.bench_quant [--reps 30] [--threads 1 2] [--isa vnni]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

ROWS = (1, 2, 4, 8, 12, 17)
SCOPES = ("layer", "model", "cold")


def load_layers(path: Path):
    """Per layer the four products' Q4_1 weights (q/k/v and gate/up fused), and the LM head."""
    import gguf

    from tasc.accel.quant import QuantWeight

    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    n_layers = int(reader.fields["llama.block_count"].parts[-1][0])
    layers = []
    for i in range(n_layers):
        w = {name: QuantWeight.from_gguf(tensors[f"blk.{i}.{name}.weight"])
             for name in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")}
        layers.append([QuantWeight.concat([w["attn_q"], w["attn_k"], w["attn_v"]]), w["attn_output"],
                       QuantWeight.concat([w["ffn_gate"], w["ffn_up"]]), w["ffn_down"]])
    return layers, QuantWeight.from_gguf(tensors["token_embd.weight"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--isa", default=None, help="force a kernel variant (default: the probed best)")
    args = ap.parse_args()
    from tasc.accel import packed, quant, variants
    from tasc.eval.harness import cpu_name
    from tasc.models import DEFAULT_MODEL, gguf_file

    chosen = variants.isa(args.isa)
    others = [name for name in variants.ISAS if name not in (chosen, "ref") and variants.probe(name)]
    print(f"CPU: {cpu_name()}; quantised kernel variant: {chosen} (others timed: {', '.join(others) or 'none'})")
    q41, head = load_layers(gguf_file(DEFAULT_MODEL))
    q80 = [[quant.QuantWeight.quantize(w.dequantize(), "Q8_0") for w in layer] for layer in q41]
    f32 = [[(packed.pack(w.dequantize()), w.n, w.k) for w in layer] for layer in q41]
    rng = np.random.default_rng(0)
    xs = {k: rng.standard_normal((max(ROWS), k)).astype(np.float32) for k in (576, 1536)}

    flush = np.zeros(192 << 20, dtype=np.float32)  # 768 MB: more than the caches

    def quantised(layers, isa):
        def run(m: int, threads: int, scope: str) -> None:
            for layer in layers[:1] if scope == "layer" else layers:
                for w in layer:
                    w.matmul(xs[w.k][:m], threads, isa)
        return run, [sum(w.nbytes for w in layer) for layer in layers]

    def fp32(m: int, threads: int, scope: str) -> None:
        for layer in f32[:1] if scope == "layer" else f32:
            for wp, n, k in layer:
                packed.small_gemm(xs[k][:m], wp, n, threads)

    kinds = {"Q4_1": quantised(q41, chosen), "Q8_0": quantised(q80, chosen),
             "fp32": (fp32, [sum(n * k * 4 for _, n, k in layer) for layer in f32])}
    cases = [(kind, scope, m, t) for kind in kinds for scope in SCOPES for m in ROWS for t in args.threads
             if kind != "fp32" or scope != "cold"]  # fp32: never in cache, "model" is cold already
    for name in others:  # the other SIMD variants: all layers, one thread
        kinds[f"Q4_1:{name}"] = quantised(q41, name)
        cases += [(f"Q4_1:{name}", scope, m, 1) for scope in SCOPES[1:] for m in ROWS]
    kinds["head"] = (lambda m, threads, scope: head.argmax(xs[576][:m], threads, chosen), [head.nbytes])
    cases += [("head", "argmax", m, t) for m in ROWS for t in args.threads]
    for run, _ in kinds.values():
        run(1, 1, "model")  # packs the weights
    best = dict.fromkeys(cases, float("inf"))
    for _ in range(args.reps):
        for i in rng.permutation(len(cases)):  # a new order every round: no case always follows another
            kind, scope, m, t = case = cases[i]
            if scope == "cold":
                flush[::16] += 1.0  # every cache line of the buffer
            else:
                kinds[kind][0](m, t, scope)  # the same product just before: the weights in cache
            t0 = time.perf_counter()
            kinds[kind][0](m, t, scope)
            best[case] = min(best[case], time.perf_counter() - t0)

    print(f"\nfastest of {args.reps}; ms (GB/s of weights); layer = layer 0 alone, just run (in cache); "
          "model = the 30 layers, just run (in cache as far as they fit); cold = the 30 layers after the "
          "caches are flushed; head = argmax of the tied Q8_0 LM head, just run")
    header = "".join(f"{f'M={m}':>16}" for m in ROWS)
    print(f"{'weights':<13}{'scope':<7}{'thr':>4}{header}{'M=8/M=1':>10}")
    for kind, scope, _, t in dict.fromkeys((c[0], c[1], 0, c[3]) for c in cases):
        size = kinds[kind][1][0] if scope == "layer" else sum(kinds[kind][1])
        cells = "".join(f"{best[kind, scope, m, t] * 1e3:8.3f} ({size / best[kind, scope, m, t] / 1e9:4.1f})"
                        for m in ROWS)
        print(f"{kind:<13}{scope:<7}{t:>4}{cells}{best[kind, scope, 8, t] / best[kind, scope, 1, t]:10.2f}")
    print("\nbytes, all layers: " + ", ".join(f"{k} {sum(kinds[k][1]) / 1e6:.1f} MB" for k in ("Q4_1", "Q8_0", "fp32"))
          + f"; head {head.nbytes / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
