"""Resident memory of tasc and llama.cpp serving the shipped GGUF: each in a process of its own
loads the model and greedily decodes the same prompts.

    python -m benchmarks.bench_memory [--model M] [--dtype auto float32] [--new-tokens 96] [--llama-cpp DIR] [--json out.json]

For tasc the table gives the load's seconds (after the imports) and splits the resident set
after load and after decoding into anonymous pages (the process's own) and file pages (mapped
files, the page cache: shared, and the first pages the kernel takes back under pressure), and
gives the peak (VmHWM). The row "python, torch, transformers, tasc" is the same process with the
code imported and no model loaded. llama.cpp's figure is the peak of ``llama-completion`` (the
child's ru_maxrss) with the context the side-by-side benchmark gives it (``-c 4096``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from benchmarks import save_report
from benchmarks.bench_threads import PROMPTS


def _status() -> dict[str, float]:
    """This process's VmRSS, RssAnon, RssFile and VmHWM in MB."""
    keys = ("VmRSS", "RssAnon", "RssFile", "VmHWM")
    with open("/proc/self/status") as f:
        rows = [line.split() for line in f if line.split(":")[0] in keys]
    return {r[0].rstrip(":"): int(r[1]) / 1024 for r in rows}


def child(model: str, dtype: str, new_tokens: int) -> dict:
    """Load (dtype "none": only the imports) and decode in this process; its memory figures."""
    import torch  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401  (the shipped model's code)

    from tasc.decode.engine import DecodeConfig, generate
    from tasc.models import load_model

    out = {"imports": _status()}
    if dtype == "none":
        return out
    start = time.perf_counter()
    lm = load_model(model, dtype=dtype, kernels="auto")
    out["load_s"] = time.perf_counter() - start
    out["weights"], out["kernels"], out["loaded"] = lm.weights, lm.kernels, _status()
    generate(lm.backend, lm.tokenizer, PROMPTS, method="greedy", config=DecodeConfig(max_new_tokens=new_tokens))
    out["decoded"] = _status()
    return out


def llama_peak_mb(bin_dir, gguf, prompt: str, new_tokens: int) -> float:
    """llama-completion's peak resident set decoding ``prompt`` (MB)."""
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write(prompt)
    try:
        proc = subprocess.Popen([str(bin_dir / "llama-completion"), "-m", str(gguf), "-f", f.name, "-n",
                                 str(new_tokens), "-t", "1", "-tb", "1", "--temp", "0", "-c", "4096", "-no-cnv",
                                 "--no-display-prompt", "--simple-io", "--no-warmup"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)
        if status:
            raise RuntimeError(f"llama-completion exited with status {status}")
        return usage.ru_maxrss / 1024
    finally:
        os.unlink(f.name)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="short name, folder or hub id (default: the shipped model)")
    ap.add_argument("--dtype", nargs="+", default=["auto", "float32"])
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--llama-cpp", default=None, help="llama.cpp's bin/ folder (default: skip it when not built)")
    ap.add_argument("--json", default=None, help="also write the report here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    from tasc.models import DEFAULT_MODEL

    model = args.model or DEFAULT_MODEL
    if args.child:
        print(json.dumps(child(model, args.child, args.new_tokens)))
        return {}

    def run_child(dtype: str) -> dict:
        done = subprocess.run([sys.executable, "-m", "benchmarks.bench_memory", "--child", dtype, "--model", model,
                               "--new-tokens", str(args.new_tokens)], capture_output=True, text=True, check=True)
        return json.loads(done.stdout.strip().splitlines()[-1])

    from tasc.data.prompts import render_prompt
    from tasc.eval.harness import cpu_name
    from tasc.eval.llamacpp import LlamaCppError, find_binaries

    report = {"cpu": cpu_name(), "model": model, "imports": run_child("none")["imports"],
              "tasc": {d: run_child(d) for d in args.dtype}}
    from tasc.models import gguf_file, load_tokenizer, resolve_model

    try:
        bin_dir = find_binaries(args.llama_cpp)
    except LlamaCppError as e:
        print(f"llama.cpp skipped: {e}", file=sys.stderr)
    else:
        prompt = render_prompt(load_tokenizer(resolve_model(DEFAULT_MODEL)), PROMPTS[0])
        report["llama.cpp"] = {"peak": llama_peak_mb(bin_dir, gguf_file(DEFAULT_MODEL), prompt, args.new_tokens)}

    print(f"CPU: {report['cpu']}")
    print("| process | weights | load s | after load MB (anon + file) | after decoding MB (anon + file) | peak MB |\n"
          "|---|---|---|---|---|---|")
    imp = report["imports"]
    print(f"| python, torch, transformers, tasc | - | - | {imp['VmRSS']:.0f} ({imp['RssAnon']:.0f} + {imp['RssFile']:.0f}) "
          f"| - | {imp['VmHWM']:.0f} |")
    for dtype, r in report["tasc"].items():
        a, b = r["loaded"], r["decoded"]
        print(f"| tasc {model} --dtype {dtype} | {r['weights']} | {r['load_s']:.1f} "
              f"| {a['VmRSS']:.0f} ({a['RssAnon']:.0f} + {a['RssFile']:.0f}) "
              f"| {b['VmRSS']:.0f} ({b['RssAnon']:.0f} + {b['RssFile']:.0f}) | {b['VmHWM']:.0f} |")
    if "llama.cpp" in report:
        print(f"| llama.cpp (-c 4096), the shipped GGUF | gguf | - | - | - | {report['llama.cpp']['peak']:.0f} |")
    save_report(report, args.json)
    return report


if __name__ == "__main__":
    main()
