"""Benchmark harness: methods side by side in one process, interleaved per sample.

A method is a name plus a ``Runner``: a callable that takes a corpus row (rendered by
tasc.data.prompts, so a chat row's ``system`` and earlier ``messages`` count) and returns an
``engine.Output``. Every method sees the same rows in the same process, with the same
dtype, threads and kernels; the order of methods rotates from sample to sample so that
drift (thermal, other load) hits all of them alike. After a warm-up, each sample runs once
per method.

Speed is compared in output characters per second, not tokens: an expanded vocabulary
changes token counts, characters stay comparable. Report keys (stable)::

    methods.<name>.{chars_per_s, tokens_per_s, latency_ms_p50, latency_ms_p95,
                    first_token_ms_p50, forward_passes, forward_passes_per_100_chars, acceptance_rate,
                    mean_accepted_length, metric, identical_to_greedy, differing_ids,
                    propose_share, peak_rss_mb}
    speedup_vs_greedy.<name>
"""

from __future__ import annotations

import platform
import resource
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from tasc import progress_bar
from tasc.data.prompts import Row
from tasc.decode.engine import Output, RequestStats
from tasc.eval.metrics import score_many

Runner = Callable[[Row], Output]


@dataclass
class Method:
    name: str
    run: Runner
    note: str = ""


def cpu_name() -> str:
    """The CPU's model name (every figure names its machine)."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(dtype: str, device: str, kernels: str = "torch") -> dict:
    import torch

    cpu = cpu_name()
    return {
        "dtype": dtype,
        "device": device,
        "kernels": kernels,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu": cpu,
        "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") else None,
        "python": platform.python_version(),
    }


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def summarise(outputs: Sequence[Output], scores: Sequence[float], greedy: Sequence[Output] | None, ids: Sequence[str]) -> dict:
    """Aggregate one method's outputs into the report's per-method entry."""
    st: list[RequestStats] = [o.stats for o in outputs]
    total_s = sum(s.latency_s for s in st) or 1e-9
    chars = sum(s.chars for s in st)
    tokens = sum(s.new_tokens for s in st)
    passes = sum(s.forward_passes for s in st)
    drafted = sum(s.drafted for s in st)
    accepted = sum(s.accepted for s in st)
    steps = sum(s.draft_steps for s in st)
    lat = np.array([s.latency_s for s in st]) * 1000.0
    first = np.array([s.first_token_s for s in st if s.first_token_s > 0]) * 1000.0
    entry = {
        "samples": len(st),
        "chars_per_s": chars / total_s,
        "tokens_per_s": tokens / total_s,
        "latency_ms_p50": float(np.percentile(lat, 50)) if len(lat) else 0.0,
        "latency_ms_p95": float(np.percentile(lat, 95)) if len(lat) else 0.0,
        # the prompt's pass; None where the method does not report it (transformers' generate)
        "first_token_ms_p50": float(np.percentile(first, 50)) if len(first) == len(st) and len(st) else None,
        "forward_passes": passes,
        "forward_passes_per_100_chars": 100.0 * passes / max(chars, 1),
        "output_chars": chars,
        "output_tokens": tokens,
        "tokens_per_completion": tokens / max(len(st), 1),
        "acceptance_rate": accepted / drafted if drafted else None,
        "mean_accepted_length": accepted / steps if steps else None,
        "propose_share": sum(s.propose_s for s in st) / total_s,
        "metric": float(np.mean(scores)) if len(scores) else None,
        "peak_rss_mb": _peak_rss_mb(),
    }
    if greedy is not None:
        same = [a.text == b.text for a, b in zip(outputs, greedy, strict=False)]
        entry["identical_to_greedy"] = float(np.mean(same)) if same else None
        entry["differing_ids"] = [i for i, s in zip(ids, same, strict=False) if not s][:50]
    return entry


def spread_sample(frame, limit: int | None):
    """The first ``limit`` rows in id order: ids are content hashes, so this is a fixed
    pseudo-random subset spread over the whole split (files are often sorted by class), and
    a smaller subset is always part of a larger one. frame: DataFrame with an ``id`` column."""
    ordered = frame.sort_values("id", kind="stable")
    return ordered if not limit else ordered.iloc[:limit]


def run_benchmark(
    methods: Sequence[Method],
    rows: Sequence[Mapping],
    metric: str,
    ids: Sequence[str] | None = None,
    warmup: int = 2,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Run every method on every row, interleaved, and build the report dict.

    rows: corpus rows, the methods' input (``prompt``, optional ``system`` and ``messages``)
    and the task metric's reference (``completion`` and extras). The first method named
    "greedy", if any, is the reference for ``identical_to_greedy`` and the ratios."""
    rows = list(rows)
    ids = list(ids) if ids is not None else [str(i) for i in range(len(rows))]
    outs: dict[str, list[Output]] = {m.name: [None] * len(rows) for m in methods}  # type: ignore[list-item]
    # One bar over every request, warm-up ones included (they take as long as the others).
    with progress_bar(len(methods) * (len(rows[:warmup]) + len(rows)), desc="benchmark", unit="req") as bar:
        for row in rows[:warmup]:
            for m in methods:
                bar.set_postfix_str(f"warm-up {m.name}")
                m.run(row)
                bar.update()
        for i, row in enumerate(rows):
            k = i % len(methods)
            for m in list(methods[k:]) + list(methods[:k]):  # rotate the order per sample
                bar.set_postfix_str(m.name)
                outs[m.name][i] = m.run(row)
                bar.update()
            if progress:
                progress(i + 1, len(rows))
    greedy = outs.get("greedy")
    report: dict = {"metric_name": metric, "samples": len(rows), "methods": {}, "speedup_vs_greedy": {}}
    for m in methods:
        texts = [o.text for o in outs[m.name]]
        scores = score_many(metric, texts, rows)
        report["methods"][m.name] = summarise(outs[m.name], scores, greedy, ids)
        report["methods"][m.name]["note"] = m.note
    if greedy is not None:
        base = report["methods"]["greedy"]["chars_per_s"]
        for name, entry in report["methods"].items():
            report["speedup_vs_greedy"][name] = entry["chars_per_s"] / base if base else None
    report["per_sample"] = [
        {"id": ids[i], **{m.name: {"text": outs[m.name][i].text, **outs[m.name][i].stats.to_dict()} for m in methods}}
        for i in range(len(rows))
    ]
    return report


def ratio(report: dict, a: str, b: str) -> float | None:
    """chars/s of method a over method b."""
    ma, mb = report["methods"].get(a), report["methods"].get(b)
    if not ma or not mb or not mb["chars_per_s"]:
        return None
    return ma["chars_per_s"] / mb["chars_per_s"]


def _fmt(v, fmt: str = ".2f") -> str:
    return "-" if v is None else format(v, fmt)


def markdown_table(report: dict) -> str:
    """A readable table of the report, one row per method."""
    head = (
        "| method | chars/s | x greedy | tokens/s | p50 ms | p95 ms | first token ms | passes/100 chars "
        "| accept rate | mean accepted | metric | identical |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for name, e in report["methods"].items():
        lines.append(
            f"| {name} | {e['chars_per_s']:.1f} | {_fmt(report['speedup_vs_greedy'].get(name))} | "
            f"{e['tokens_per_s']:.1f} | {e['latency_ms_p50']:.0f} | {e['latency_ms_p95']:.0f} | "
            f"{_fmt(e.get('first_token_ms_p50'), '.0f')} | "
            f"{e['forward_passes_per_100_chars']:.1f} | {_fmt(e['acceptance_rate'])} | "
            f"{_fmt(e['mean_accepted_length'])} | {_fmt(e['metric'], '.3f')} | {_fmt(e.get('identical_to_greedy'))} |"
        )
    env = report.get("environment", {})
    extra = f"\n\n{report['samples']} samples; metric: {report['metric_name']}"
    if env:
        extra += f"; dtype {env.get('dtype')}, {env.get('threads')} threads, kernels {env.get('kernels', 'torch')}, torch {env.get('torch')}, {env.get('cpu')}"
    if report.get("verify_cost"):
        extra += f"; verify cost V(8) = {report['verify_cost'].get('V8', 0):.2f}"
    return head + "\n".join(lines) + extra + "\n"


def plot_report(report: dict, path: str) -> str:
    """A PNG bar chart: chars/s per method with the ratio to greedy on each bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["methods"])
    vals = [report["methods"][n]["chars_per_s"] for n in names]
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2, 3.6))
    bars = ax.bar(names, vals, color=["#888888" if n == "greedy" else "#2b7bba" for n in names])
    for b, n in zip(bars, names, strict=False):
        r = report["speedup_vs_greedy"].get(n)
        label = f"{r:.2f}x" if r else ""
        ax.text(b.get_x() + b.get_width() / 2, b.get_height(), label, ha="center", va="bottom")
    ax.set_ylabel("output characters / s")
    ax.set_title(f"{report.get('spec', '')} ({report['samples']} samples)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
