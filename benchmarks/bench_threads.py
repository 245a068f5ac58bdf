"""Decode speed at 1 and 2 threads, on a quiet machine and beside a busy neighbour process,
for tasc greedy and llama.cpp greedy on the shipped GGUF.

    python -m benchmarks.bench_threads [--new-tokens 96] [--reps 3] [--llama-cpp DIR] [--json out.json]

tasc's rate is new tokens over request latency (prefill included); llama.cpp's is what it
reports for decoding (``--ignore-eos``, the same first prompt). The neighbour is a second
Python process spinning on one core for the whole measurement.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from benchmarks import save_report

PROMPTS = ["Play the new album by Daft Punk", "Book a table for two at an Italian place tonight",
           "What's the weather in Oslo tomorrow?", "Add this song to my workout playlist"]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--llama-cpp", default=None, help="llama.cpp's bin/ folder")
    ap.add_argument("--json", default=None, help="also write the report here")
    args = ap.parse_args(argv)
    from tasc.data.prompts import render_prompt
    from tasc.decode.engine import DecodeConfig, generate
    from tasc.eval.llamacpp import find_binaries
    from tasc.models import DEFAULT_MODEL, gguf_file, load_model

    lm = load_model(kernels="auto")
    cfg = DecodeConfig(max_new_tokens=args.new_tokens, prefix_cache=False)  # the same prompts every rep
    binary, gguf = find_binaries(args.llama_cpp) / "llama-completion", gguf_file(DEFAULT_MODEL)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write(render_prompt(lm.tokenizer, PROMPTS[0]))

    def tasc_rate(threads: int) -> float:
        torch.set_num_threads(threads)
        outs = generate(lm.backend, lm.tokenizer, PROMPTS, method="greedy", config=cfg)
        return sum(o.stats.new_tokens for o in outs) / sum(o.stats.latency_s for o in outs)

    def llama_rate(threads: int) -> float:
        done = subprocess.run([str(binary), "-m", str(gguf), "-f", f.name, "-n", str(args.new_tokens), "-t",
                               str(threads), "-tb", str(threads), "--temp", "0", "-no-cnv", "--no-display-prompt",
                               "--simple-io", "--ignore-eos"], capture_output=True, text=True, check=True)
        m = re.search(r"\beval time =\s*([\d.]+) ms /\s*(\d+) runs", done.stderr.replace("prompt eval time", "-"))
        return int(m.group(2)) / float(m.group(1)) * 1e3

    tasc_rate(1)  # warm-up: kernels built, caches filled
    report = {"weights": lm.weights, "kernels": lm.kernels}
    for busy in (False, True):
        phase = "busy neighbour" if busy else "quiet"
        spin = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
        time.sleep(0.5)
        try:
            runs: dict[str, list[float]] = {}
            for _ in range(args.reps):  # interleaved, so that a drift of the machine hits both counts alike
                for threads in (1, 2):
                    runs.setdefault(f"tasc t{threads}", []).append(tasc_rate(threads))
                    runs.setdefault(f"llama.cpp t{threads}", []).append(llama_rate(threads))
            row = {k: statistics.median(v) for k, v in runs.items()}
            row["tasc t2 / t1"] = row["tasc t2"] / row["tasc t1"]
            row["llama.cpp t2 / t1"] = row["llama.cpp t2"] / row["llama.cpp t1"]
        finally:
            if spin:
                spin.kill()
        report[phase], report[f"{phase}: every run"] = row, runs
        print(f"{phase}: " + ", ".join(f"{k} {v:.2f}" if "/" in k else f"{k} {v:.1f} tok/s" for k, v in row.items()))
    save_report(report, args.json)
    return report


if __name__ == "__main__":
    main()
