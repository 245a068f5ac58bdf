"""TASC-ft rounds on the tiny model: expansion without and with fine-tuning, the ft-only
baseline, the vocab flow with nested MLflow runs, TASC-spec on an expanded vocabulary and
the ``tasc vocab`` command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tasc.ft.rounds import RoundsConfig, finetune_only, run_round
from tasc.ft.select import SelectionConfig
from tasc.models import load_model, load_tokenizer
from tasc.train.config import FinetuneConfig
from tests.test_vocab import snips_completions

TASC = str(Path(sys.executable).parent / "tasc")
SMALL_FT = FinetuneConfig(max_steps=3, batch_size=2, warmup_steps=1, eval_every=3, save_every=3, max_eval_rows=4,
                          max_seq_len=96, device="cpu", cpu_threads=1)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def rows() -> tuple[list[dict], list[dict]]:
    out = []
    for c in snips_completions(60):
        obj = json.loads(c)
        out.append({"prompt": f"Parse: {' '.join(map(str, obj['slots'].values()))}", "completion": c})
    return out[:48], out[48:]


def config(finetune: FinetuneConfig | None = None, tokens: int = 20) -> RoundsConfig:
    return RoundsConfig(rounds=1, selection=SelectionConfig(tokens_per_round=tokens, min_count=3), finetune=finetune)


@pytest.fixture(scope="module")
def expanded(tiny_model_dir, rows, tmp_path_factory):
    lm = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    base = load_tokenizer(str(tiny_model_dir))
    return run_round(lm.model, base, lm.tokenizer, *rows, config(), tmp_path_factory.mktemp("round-1"))


def test_round_without_finetune_saves_tokens_and_round_trips(expanded, tiny_tokenizer):
    assert expanded.added_tokens > 0
    assert expanded.token_reduction > 0
    assert expanded.round_trip_exact and expanded.round_trip_failures == 0
    assert expanded.tokens_per_completion < expanded.tokens_per_completion_base
    assert expanded.val_loss is not None and np.isfinite(expanded.val_loss)
    assert expanded.added_params > 0 and 0 < expanded.added_params_pct < 100
    assert len(expanded.tokenizer) == len(tiny_tokenizer) + expanded.added_tokens
    s = expanded.summary()
    json.dumps(s)
    assert s["tokens"] == expanded.selection.tokens and s["finetune_steps"] == 0


def test_round_with_finetune_saves_a_loadable_model(expanded, tiny_model_dir, rows, tmp_path):
    lm = load_model(str(expanded.model_dir), dtype="float32", device="cpu")
    res = run_round(lm.model, load_tokenizer(str(tiny_model_dir)), lm.tokenizer, *rows, config(SMALL_FT, 10), tmp_path)
    assert res.finetune_steps == 3 and res.val_loss is not None
    assert res.token_reduction >= expanded.token_reduction and res.round_trip_exact
    again = load_model(str(res.model_dir), dtype="float32", device="cpu")
    assert again.model.get_input_embeddings().weight.shape[0] == len(again.tokenizer) == len(res.tokenizer)
    assert again.tokenizer.get_vocab() == res.tokenizer.get_vocab()


def test_ft_only_keeps_the_vocabulary(tiny_model_dir, tiny_tokenizer, rows, tmp_path):
    lm = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    before = lm.model.get_input_embeddings().weight.shape[0]
    out = finetune_only(lm.model, lm.tokenizer, *rows, SMALL_FT, tmp_path)
    assert out["steps"] == 3 and out["vocab_size"] == len(tiny_tokenizer)
    again = load_model(out["model_dir"], dtype="float32", device="cpu")
    assert len(again.tokenizer) == len(tiny_tokenizer)
    assert again.model.get_input_embeddings().weight.shape[0] == before


def test_tasc_ft_spec_is_lossless_on_the_expanded_tokenizer(expanded, rows):
    from tasc.decode.draft import BoundDraft, build_draft_corpus
    from tasc.decode.engine import DecodeConfig
    from tasc.eval.methods import build_methods

    lm = load_model(str(expanded.model_dir), dtype="float32", device="cpu")
    train, val = rows
    draft = build_draft_corpus([r["completion"] for r in train])
    bound = {"tasc-ft": BoundDraft.from_corpus(draft, lm.tokenizer)}
    cost = np.concatenate([[0.0], 1.0 + 0.01 * np.arange(17)])
    cfg = DecodeConfig(max_new_tokens=24)
    methods = {m.name: m for m in build_methods(["tasc-ft", "tasc-ft+spec"], None, cfg, None, True, bound, cost,
                                                {"tasc-ft": lm})}
    for r in val[:4]:
        greedy, spec = methods["tasc-ft"].run(r["prompt"]), methods["tasc-ft+spec"].run(r["prompt"])
        assert spec.token_ids == greedy.token_ids and spec.text == greedy.text
    with pytest.raises(ValueError, match="ft-only"):
        build_methods(["ft-only"], None, cfg, None, True, bound, cost, {"tasc-ft": lm})


@pytest.mark.slow
def test_vocab_flow_logs_nested_rounds_and_writes_the_report(prefect_harness, tiny_model_dir, tmp_path):
    from flows.vocab import vocab_flow
    from storage.tracking import client

    report = tmp_path / "vocab.json"
    out = vocab_flow("prompt-completion", str(tiny_model_dir), rounds=2, finetune=False, tokens_per_round=10,
                     min_count=2, eval_prompts=2, min_token_gain=0.0, report=str(report))
    doc = json.loads(report.read_text())
    assert out["report"] == str(report) and len(doc["rounds"]) == len(out["rounds"]) >= 1
    for r in doc["rounds"]:
        assert {"added_tokens", "token_reduction", "round_trip_exact", "val_loss", "metric"} <= set(r)
        assert r["round_trip_exact"] is True
    assert Path(out["chosen"]).is_dir() and (Path(out["chosen"]) / "tokenizer.json").exists()
    c = client()
    parent = c.get_run(out["mlflow_run_id"])
    children = c.search_runs([parent.info.experiment_id],
                             filter_string=f"tags.mlflow.parentRunId = '{out['mlflow_run_id']}'")
    assert len(children) == len(doc["rounds"])
    child = children[0]
    assert {"token_reduction", "val_loss", "added_tokens"} <= set(child.data.metrics)
    arts = {a.path for a in c.list_artifacts(child.info.run_id, "round")}
    assert {"round/selection.parquet", "round/round.json"} <= arts
    assert any(a.path.endswith("tokenizer.json") for a in c.list_artifacts(child.info.run_id, "tokenizer"))


@pytest.mark.slow
def test_vocab_command_writes_the_report(tiny_model_dir, tmp_path):
    report = tmp_path / "out.json"
    res = subprocess.run([TASC, "vocab", "prompt-completion", "--model", str(tiny_model_dir), "--rounds", "1",
                          "--no-finetune", "--min-count", "2", "--eval-prompts", "0", "--report", str(report)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert report.exists() and len(json.loads(report.read_text())["rounds"]) == 1
    assert "| round |" in res.stdout and "chosen:" in res.stdout


@pytest.mark.slow
def test_bench_flow_runs_the_tasc_ft_methods(prefect_harness, tiny_model_dir, expanded):
    from flows.stages import bench_flow, draft_flow, ingest_flow

    corpus = ingest_flow("prompt-completion")
    drafts = draft_flow("prompt-completion", str(tiny_model_dir), "references", 0, corpus=corpus)
    out = bench_flow("prompt-completion", str(tiny_model_dir), "greedy,tasc-ft,tasc-ft+spec", limit=2,
                     dtype="float32", drafts=drafts, corpus=corpus,
                     extra_models={"tasc-ft": str(expanded.model_dir)})
    methods = out["methods"]
    assert {"greedy", "tasc-ft", "tasc-ft+spec"} <= set(methods)
    assert methods["tasc-ft+spec"]["tokens_per_completion"] == methods["tasc-ft"]["tokens_per_completion"]
    report = json.loads(Path(out["paths"]["json"]).read_text())
    assert report["extra_models"] == {"tasc-ft": str(expanded.model_dir)}
    # tasc-ft+spec drafts from the TASC-ft model's own outputs, bound to its tokenizer.
    assert set(report["drafts"]) == {"main", "references", "tasc-ft"}
    assert report["drafts"]["tasc-ft"]["tokens"] > 0


def test_help_lists_vocab():
    from typer.testing import CliRunner

    from tasc.cli import app

    res = CliRunner().invoke(app, ["--help"])
    assert res.exit_code == 0 and "vocab" in res.output
    res = CliRunner().invoke(app, ["bench", "--help"])
    assert "--ft-model" in res.output and "--ft-only-model" in res.output


@pytest.mark.slow
def test_finetuned_vocab_flow_trains_ft_only_and_registers(prefect_harness, tiny_model_dir):
    from flows.vocab import vocab_flow
    from storage.registry import alias_version

    out = vocab_flow("prompt-completion", str(tiny_model_dir), rounds=1, finetune=True, max_steps=2,
                     tokens_per_round=5, min_count=2, eval_prompts=0, register_limit=2)
    assert out["rounds"][0]["finetune_steps"] == 2
    assert out["ft_only"]["steps"] == 2 and Path(out["ft_only"]["model_dir"]).is_dir()
    reg = out["registered"]
    assert reg and alias_version("prompt-completion", "challenger") == reg["version"]
    doc = json.loads(Path(out["report"]).read_text())
    assert doc["registered"]["version"] == reg["version"] and doc["chosen"] == out["chosen"]
    # Other selection settings, same training: the ft-only baseline resumes its finished run (no new
    # checkpoint), it is not trained again.
    base = Path(out["ft_only"]["model_dir"]).parent

    def checkpoints():
        return {p.relative_to(base): p.stat().st_mtime_ns for p in (base / "finetune" / "checkpoints").rglob("*") if p.is_file()}

    before = ((base / "origin.json").read_text(), checkpoints())
    assert before[1]
    again = vocab_flow("prompt-completion", str(tiny_model_dir), rounds=1, finetune=True, max_steps=2,
                       tokens_per_round=6, min_count=2, eval_prompts=0, register_best=False)
    assert ((base / "origin.json").read_text(), checkpoints()) == before
    assert again["ft_only"]["steps"] == 2


def test_tokens_per_round_default_is_one_number_everywhere():
    """The CLI, the flows and the selection config share the measured default."""
    import inspect

    from flows.pipeline import PipelineParams
    from flows.vocab import vocab_flow
    from tasc.cli import vocab
    from tasc.ft.rounds import make_config
    from tasc.ft.select import TOKENS_PER_ROUND

    assert SelectionConfig().tokens_per_round == TOKENS_PER_ROUND
    assert make_config().selection.tokens_per_round == TOKENS_PER_ROUND
    assert inspect.signature(vocab_flow.fn).parameters["tokens_per_round"].default == TOKENS_PER_ROUND
    assert PipelineParams(spec="snips").tasc_ft.tokens_per_round == TOKENS_PER_ROUND
    assert inspect.signature(vocab).parameters["tokens"].default.default == TOKENS_PER_ROUND


def test_choose_round_keeps_the_last_round_within_the_metric_drop():
    from tasc.ft.rounds import choose_round

    base = {"metric": 0.80}
    rounds = [{"round": 1, "metric": 0.80}, {"round": 2, "metric": 0.795}, {"round": 3, "metric": 0.70}]
    assert choose_round(base, rounds, 0.01)["round"] == 2
    assert choose_round(base, rounds[2:], 0.01) is None
    # Without a measured metric every round counts as within.
    assert choose_round({"metric": None}, rounds, 0.01)["round"] == 3
    assert choose_round(base, [{"round": 1, "metric": None}], 0.01)["round"] == 1
