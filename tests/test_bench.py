"""The benchmark harness end to end on the tiny model: greedy, transformers' prompt lookup
and TASC-spec over a few prompts, with a real metric, the report, its table and its chart."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tasc.decode.draft import BoundDraft, build_draft_corpus
from tasc.decode.engine import DecodeConfig, generate
from tasc.eval.harness import markdown_table, plot_report, ratio, run_benchmark
from tasc.eval.methods import build_methods, verify_cost_summary

PROMPTS = ["What is the weather in Paris?", "Play some jazz music", "Write a function to add two numbers."]
NAMES = ["greedy", "pld", "tasc-spec"]
KEYS = ("chars_per_s", "tokens_per_s", "latency_ms_p50", "latency_ms_p95", "forward_passes", "metric",
        "identical_to_greedy")


@pytest.fixture(scope="module")
def report(tiny_model_dir):
    from tasc.models import load_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    # Its own model instance: the pld runner hooks a pass counter into the model.
    try:
        lm = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
        cfg = DecodeConfig(max_new_tokens=24)
        on_policy = [o.text for o in generate(lm.model, lm.tokenizer, PROMPTS, method="greedy", config=cfg)]
        draft = BoundDraft.from_corpus(build_draft_corpus(on_policy=on_policy), lm.tokenizer)
        cost = np.concatenate([[0.0], 1.0 + 0.01 * np.arange(17)])
        methods = build_methods(NAMES, lm, cfg, None, True, {"main": draft}, cost)
        rows = [{"prompt": p, "completion": t} for p, t in zip(PROMPTS, on_policy, strict=True)]
        calls = []
        rep = run_benchmark(methods, rows, "chrf", ids=["a", "b", "c"], warmup=1,
                            progress=lambda i, n: calls.append((i, n)))
    finally:
        torch.set_num_threads(threads)
    assert calls == [(1, 3), (2, 3), (3, 3)]
    return rep


def test_report_keys(report):
    assert report["metric_name"] == "chrf" and report["samples"] == 3
    assert list(report["methods"]) == NAMES
    for name in NAMES:
        entry = report["methods"][name]
        for key in KEYS:
            assert key in entry, (name, key)
        assert entry["samples"] == 3
        assert entry["chars_per_s"] > 0 and entry["tokens_per_s"] > 0
        assert 0 < entry["latency_ms_p50"] <= entry["latency_ms_p95"]
        # the prompt's pass, timed by tasc's engine (transformers' generate does not say)
        first = entry["first_token_ms_p50"]
        assert first is None if name == "pld" else 0 < first <= entry["latency_ms_p50"]
        assert entry["forward_passes"] > 0
        assert 0.0 <= entry["metric"] <= 1.0
        assert name in report["speedup_vs_greedy"]
    assert set(report["speedup_vs_greedy"]) == set(NAMES)
    assert [s["id"] for s in report["per_sample"]] == ["a", "b", "c"]


def test_greedy_is_the_reference(report):
    m = report["methods"]
    assert report["speedup_vs_greedy"]["greedy"] == pytest.approx(1.0)
    assert m["greedy"]["identical_to_greedy"] == 1.0
    assert m["greedy"]["metric"] == pytest.approx(1.0)  # rows hold greedy's own outputs
    assert m["greedy"]["forward_passes"] == 3 * 24  # never stops early on the tiny model
    assert m["greedy"]["acceptance_rate"] is None
    assert ratio(report, "tasc-spec", "greedy") == pytest.approx(report["speedup_vs_greedy"]["tasc-spec"])


def test_tasc_spec_is_lossless_and_saves_passes(report):
    m = report["methods"]
    assert m["tasc-spec"]["identical_to_greedy"] == 1.0
    assert m["tasc-spec"]["differing_ids"] == []
    assert m["tasc-spec"]["metric"] == pytest.approx(m["greedy"]["metric"])
    assert m["tasc-spec"]["forward_passes"] < m["greedy"]["forward_passes"]
    assert 0.0 < m["tasc-spec"]["acceptance_rate"] <= 1.0
    for sample in report["per_sample"]:
        assert sample["tasc-spec"]["text"] == sample["greedy"]["text"]
    # pld runs transformers' generate: same number of output tokens, counted passes.
    assert m["pld"]["output_tokens"] == m["greedy"]["output_tokens"]


def test_markdown_table_one_row_per_method(report):
    table = markdown_table(report)
    lines = [ln for ln in table.splitlines() if ln.startswith("| ")]
    assert lines[0].startswith("| method |")
    body = lines[1:]
    assert [ln.split("|")[1].strip() for ln in body] == NAMES
    assert all(ln.count("|") == lines[0].count("|") for ln in body)
    assert "3 samples; metric: chrf" in table


def test_plot_report_writes_png(report, tmp_path):
    path = plot_report(report, str(tmp_path / "bench.png"))
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 1000


def test_verify_cost_summary():
    cost = np.linspace(0.0, 3.4, 18)
    assert set(verify_cost_summary(cost)) == {"V2", "V4", "V8", "V16"}
    assert verify_cost_summary(cost)["V8"] == pytest.approx(cost[8])
    assert "V16" not in verify_cost_summary(cost[:10])


def test_method_options_set_proposer_fields():
    from tasc.eval.methods import _method_options

    assert _method_options("tasc-spec") == ("tasc-spec", None)
    base, pc = _method_options("tasc-spec@context_prior=0.1@max_len=24@use_corpus=false")
    assert base == "tasc-spec" and pc.context_prior == 0.1 and pc.max_len == 24 and pc.use_corpus is False
    with pytest.raises(ValueError, match="not field=value"):
        _method_options("tasc-spec@no_such=1")


def test_method_name_rules():
    from tasc.eval.methods import base_method, needs_draft, needs_ft_draft, parse_methods, registered_method

    assert parse_methods(" greedy, pld,,tasc-spec@max_len=24 ") == ["greedy", "pld", "tasc-spec@max_len=24"]
    assert base_method("tasc-ft+spec@max_len=24") == "tasc-ft+spec"
    drafted = {m for m in ("greedy", "pld", "context-only", "ft-only", "tasc-ft", "tasc-spec", "tasc-spec-ref",
                           "tasc-ft+spec", "tasc-spec@max_len=24", "tasc-ft+spec@max_len=24") if needs_draft(m)}
    assert drafted == {"tasc-spec", "tasc-spec-ref", "tasc-ft+spec", "tasc-spec@max_len=24", "tasc-ft+spec@max_len=24"}
    assert [m for m in ("tasc-spec", "tasc-ft", "tasc-ft+spec", "tasc-ft+spec@max_len=24") if needs_ft_draft(m)] == [
        "tasc-ft+spec", "tasc-ft+spec@max_len=24"]
    assert (registered_method(False), registered_method(True)) == ("tasc-spec", "tasc-ft+spec")
