"""The ``tasc`` command line.

The CLI is the one entry point that reaches outward: each command sets up the
project-local state (storage.settings) and runs the matching Prefect flow, so a command
line run is tracked in MLflow exactly like a scheduled one. Imports happen inside the
commands to keep ``tasc --help`` fast.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer

from tasc.data.spec import BAD_ROW_POLICIES
from tasc.models import DEFAULT_MODEL

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="tasc: make a small language model faster on one narrow task.")

MODEL = typer.Option(DEFAULT_MODEL, "--model", "-m", help="short name, local folder or Hugging Face id")
DTYPE = typer.Option("auto", "--dtype", help="auto | float32 | bfloat16 | float16 | gguf | q8_0 | q4_0 | q4_1 "
                     "(auto on a CPU: the GGUF file's own blocks, else q8_0; lossless speculative decoding. "
                     "bfloat16 is not lossless)")
FORCE = typer.Option(False, "--force", help="rebuild this stage's outputs even when stored ones are current "
                     "(damaged ones are rebuilt anyway)")


def _setup(quiet_flows: bool = True) -> Path:
    """Settings and the state folder (returned); with ``quiet_flows``, Prefect's console logs
    without tracebacks, for the commands that run flows and end with the error's message (see
    main). The commands that run no flow skip Prefect's import; ``serve`` keeps the tracebacks
    (its console is a service's log)."""
    from storage.settings import configure

    home = configure()
    if quiet_flows and not _traceback_asked():
        from flows.console import hide_tracebacks

        hide_tracebacks()
    return home


def _traceback_asked() -> bool:
    return os.environ.get("TASC_TRACEBACK", "0") not in ("0", "", "false", "no")


def _echo_json(obj) -> None:
    typer.echo(json.dumps(obj, indent=2, default=str))


def _check_policy(value: str | None) -> str | None:
    # Checked while parsing, before the state folder or any stored corpus is looked at.
    if value is not None and value not in BAD_ROW_POLICIES:
        raise typer.BadParameter(f"{value!r} is not a bad-row policy; use one of {', '.join(BAD_ROW_POLICIES)}")
    return value


@app.command()
def ingest(spec: str = typer.Argument(..., help="spec name or YAML path"),
           policy: str | None = typer.Option(None, metavar="|".join(BAD_ROW_POLICIES), callback=_check_policy,
                                             help="bad rows: fail or skip (default: the spec's on_bad_rows)"),
           force: bool = FORCE):
    """Read the spec's sources into a versioned Parquet corpus (a no-op when nothing changed)."""
    _setup()
    from flows.stages import ingest_flow

    corpus = ingest_flow(spec, policy, force=force)
    m = corpus["manifest"]
    typer.echo(f"corpus: {corpus['path']}\nrows: {m['rows']}  rejected: {m['rejected']}  "
               f"duplicates removed: {m.get('duplicates_removed', 0)}"
               + ("  (unchanged, reused)" if corpus.get("reused") else ""))
    if m["rejected"]:
        typer.echo(f"rejected rows with reasons: {Path(corpus['path']) / 'rejected.parquet'}")


@app.command()
def ngrams(spec: str, model: str = MODEL, max_n: int = typer.Option(8, help="longest n-gram"),
           min_count: int = typer.Option(2, help="drop rarer n-grams"), force: bool = FORCE):
    """Count completion n-grams (text level and token level) into Parquet tables."""
    _setup()
    from flows.stages import ngrams_flow

    _echo_json(ngrams_flow(spec, model, max_n, min_count, force=force))


@app.command()
def harvest(spec: str, model: str = MODEL, limit: int | None = typer.Option(400, help="train prompts to run"),
            dtype: str = DTYPE, force: bool = FORCE):
    """Write the on-policy corpus: the model's own outputs for the train prompts."""
    _setup()
    from flows.stages import ingest_flow
    from tasks.draft import harvest_outputs

    corpus = ingest_flow(spec)
    typer.echo(harvest_outputs(spec, corpus, model, limit, dtype, force=force))


@app.command()
def draft(spec: str, model: str = MODEL,
          source: str = typer.Option("auto", help="references | on-policy | both | auto"),
          harvest_limit: int | None = typer.Option(400, help="train prompts to harvest when on-policy is needed"),
          force: bool = FORCE):
    """Build the text draft for TASC-spec (--force: harvest and build again)."""
    _setup()
    from flows.stages import draft_flow

    if source == "references":
        harvest_limit = 0
    _echo_json(draft_flow(spec, model, source, harvest_limit, force=force))


@app.command()
def bench(spec: str, model: str = MODEL,
          methods: str = typer.Option("greedy,pld,tasc-spec", help="comma-separated: greedy, pld, tasc-spec, "
                                      "tasc-spec-ref, context-only, ft-only, tasc-ft, tasc-ft+spec, llama.cpp, "
                                      "llama.cpp-lookup"),
          limit: int | None = typer.Option(20, help="test prompts"), dtype: str = DTYPE,
          report: str | None = typer.Option(None, help="also write the JSON report here"),
          harvest_limit: int | None = typer.Option(400, help="train prompts for the on-policy draft"),
          ft_model: str | None = typer.Option(None, help="TASC-ft model folder (methods tasc-ft, tasc-ft+spec)"),
          ft_only_model: str | None = typer.Option(None, help="fine-tune-only model folder (method ft-only)"),
          threads: int | None = typer.Option(None, help="CPU threads for every method (default: torch's)")):
    """Benchmark methods side by side (interleaved, one process) and print the table."""
    _setup()
    from flows.stages import bench_flow

    extra = {k: v for k, v in (("tasc-ft", ft_model), ("ft-only", ft_only_model)) if v}
    summary = bench_flow(spec, model, methods, limit, dtype, report, harvest_limit=harvest_limit,
                         extra_models=extra or None, threads=threads)
    typer.echo(Path(summary["paths"]["markdown"]).read_text())
    typer.echo(f"report: {summary['paths']['json']}\nchart: {summary['paths']['chart']}")


@app.command()
def vocab(spec: str = typer.Argument(..., help="spec name or YAML path"), model: str = MODEL,
          rounds: int = typer.Option(3, help="vocabulary-expansion rounds (fewer when they plateau)"),
          finetune: bool = typer.Option(True, help="fine-tune after each expansion (--no-finetune: only expand)"),
          max_steps: int | None = typer.Option(None, help="fine-tuning steps per round (default: the device config)"),
          tokens: int = typer.Option(12, help="new tokens per round at most"),  # tasc.ft.select.TOKENS_PER_ROUND
          min_count: int = typer.Option(5, help="occurrences a token needs, and tokens it must save"),
          eval_prompts: int = typer.Option(8, help="validation prompts to generate for the task metric (0: none)"),
          ft_only: bool = typer.Option(True, help="also train the fine-tune-only baseline (with fine-tuning)"),
          register: bool = typer.Option(True, help="with fine-tuning: benchmark and register the chosen model"),
          report: str | None = typer.Option(None, help="also write the JSON report here")):
    """TASC-ft: add task tokens to the vocabulary in rounds (fine-tuning each), print a table."""
    _setup()
    from flows.vocab import vocab_flow

    out = vocab_flow(spec, model, rounds, finetune, max_steps, tokens, min_count, eval_prompts, ft_only, report,
                     register_best=register)
    typer.echo("| round | added tokens | tokens/completion | token reduction | round-trip | val loss | metric |\n"
               "|---|---|---|---|---|---|---|")
    b = out["base"]
    typer.echo(f"| 0 (base) | 0 | {b['tokens_per_completion']:.2f} | 0.000 | yes | {_num(b.get('val_loss'))} | "
               f"{_num(b['metric'])} |")
    for r in out["rounds"]:
        typer.echo(f"| {r['round']} | {r['added_tokens']} | {r['tokens_per_completion']:.2f} | "
                   f"{r['token_reduction']:.3f} | {'yes' if r['round_trip_exact'] else 'NO'} | "
                   f"{_num(r['val_loss'])} | {_num(r['metric'])} |")
    if out.get("ft_only"):
        typer.echo(f"ft-only: val loss {_num(out['ft_only']['val_loss'])}, model {out['ft_only']['model_dir']}")
    if out.get("registered"):
        typer.echo(f"registered version {out['registered']['version']} (challenger)")
    typer.echo(f"chosen: {out['chosen']}\nreport: {out['report']}")


@app.command()
def finetune(spec: str = typer.Argument(..., help="spec name or YAML path"), model: str = MODEL,
             out: Path = typer.Option(..., "--out", help="output folder (checkpoints/, final/, result.json); "
                                      "resumed when it holds checkpoints of the same run"),
             corpus: str | None = typer.Option(None, help="corpus folder or corpus.parquet (default: the spec's "
                                               "latest ingested corpus)"),
             max_steps: int | None = typer.Option(None, help="training steps (default: the device preset's)"),
             device: str = typer.Option("auto", help="auto | cpu | cuda; the preset follows (LoRA on CPU, full "
                                        "fine-tuning on a GPU)"),
             batch_size: int | None = typer.Option(None, help="sequences per micro-batch and process (default: "
                                                   "the preset's)"),
             grad_accum: int | None = typer.Option(None, help="micro-batches per step (default: the preset's)"),
             progress: bool = typer.Option(True, help="show a progress bar (rank 0)")):
    """Fine-tune MODEL on the spec's train split into OUT (resumable), the core alone: no
    Prefect, no MLflow. Several processes, data-parallel: `torchrun --nproc_per_node N -m
    tasc.cli finetune ...` or `accelerate launch -m tasc.cli finetune ...`."""
    _setup(quiet_flows=False)
    from storage import corpus as store
    from tasc.data.spec import load_spec
    from tasc.train.distributed import from_env
    from tasc.train.launch import run_job

    s = load_spec(spec)
    path = corpus or store.latest_corpus(s.name)
    train, val = (store.read_corpus(path, split=split) for split in ("train", "validation"))
    res = run_job(s, train, val, model, out, max_steps, device, batch_size, grad_accum, progress)
    if from_env().main:
        _echo_json(res)


def _num(x) -> str:
    return "-" if x is None else f"{x:.4f}"


@app.command()
def generate(spec: str = typer.Argument(..., help="spec name/path, or a draft .parquet file"),
             prompt: str = typer.Argument(...), model: str = MODEL, dtype: str = DTYPE,
             method: str = typer.Option("tasc-spec", help="greedy | tasc-spec"),
             max_new_tokens: int = typer.Option(128)):
    """Generate for one prompt, for a quick look (prints the text and decoding stats)."""
    _setup(quiet_flows=False)
    from storage.drafts import read_draft
    from tasc.data.spec import load_spec
    from tasc.decode.draft import BoundDraft
    from tasc.decode.engine import DecodeConfig
    from tasc.decode.engine import generate as run
    from tasc.models import load_model

    task = None if spec.endswith(".parquet") else load_spec(spec)  # a wrong name fails before the model loads
    lm = load_model(model, dtype=dtype, kernels="auto")
    system, chat, stop, bound = None, True, (), None
    if task is None:
        bound = BoundDraft.from_corpus(read_draft(spec), lm.tokenizer)
    else:
        from storage import corpus as store
        from storage.drafts import draft_path

        s = task
        system, chat, stop = s.system_prompt, s.chat_template, s.generation.stop
        version = store.latest_corpus(s.name).name
        for src in ("on-policy", "references"):
            p = draft_path(s.name, version, src, model if src != "references" else None)
            if p.exists():
                bound = BoundDraft.from_corpus(read_draft(p), lm.tokenizer)
                break
    out = run(lm.model, lm.tokenizer, [prompt], bound, method, DecodeConfig(max_new_tokens, stop), system, chat)[0]
    typer.echo(out.text)
    typer.echo(json.dumps(out.stats.to_dict()), err=True)


@app.command()
def pipeline(spec: str = typer.Argument("snips"), model: str = MODEL,
             limit: int = typer.Option(8, help="test prompts to benchmark"),
             harvest_limit: int = typer.Option(32, help="train prompts for the on-policy draft"),
             methods: str = typer.Option("greedy,pld,tasc-spec,tasc-spec-ref"), dtype: str = DTYPE,
             vocab_rounds: int = typer.Option(0, help="TASC-ft vocabulary rounds (0: TASC-spec on the base model)"),
             round_steps: int | None = typer.Option(None, help="fine-tuning steps per round (default: the device "
                                                    "config; 0: expansion only)"),
             finetune_steps: int = typer.Option(0, help="fine-tuning steps of the chosen round's model (resumable)"),
             finetune_deployment: str | None = typer.Option(None, help="run that fine-tuning on this Prefect "
                                                            "deployment, e.g. tasc-finetune-remote/gpu"),
             task_runner: str | None = typer.Option(None, help="thread | dask (default: TASC_TASK_RUNNER)"),
             ngram_shards: int | None = typer.Option(None, help="count the n-grams in this many shard tasks"),
             register: bool = typer.Option(True, help="register in MLflow and run the promotion rule"),
             force: bool = typer.Option(False, help="rerun even when data and config are unchanged")):
    """Run the end-to-end pipeline (ingest -> n-grams -> [TASC-ft rounds -> fine-tune] -> draft ->
    benchmark -> register) on the local defaults; a re-run after a failure resumes."""
    home = _setup()
    from flows.pipeline import PipelineParams
    from flows.pipeline import pipeline as run
    from storage.tracking import run_url

    out = run(PipelineParams(spec=spec, model=model, limit=limit, harvest_limit=harvest_limit, methods=methods,
                             dtype=dtype, vocab_rounds=vocab_rounds, round_steps=round_steps,
                             finetune_max_steps=finetune_steps, finetune_deployment=finetune_deployment,
                             task_runner=task_runner, ngram_shards=ngram_shards,
                             register_model=register, force=force))
    if out.get("skipped"):
        typer.echo(f"unchanged since MLflow run {out['previous_run_id']}; nothing to do (--force reruns)")
        return
    b = out["bench"]
    typer.echo("\n" + Path(b["paths"]["markdown"]).read_text())
    typer.echo(f"state folder: {home}\ncorpus: {out['corpus']['path']}\nn-gram tables: {out['ngrams']['text']}, "
               f"{out['ngrams']['token']}\ndraft: {out['drafts']['main']}\nreport: {b['paths']['json']}\n"
               f"chart: {b['paths']['chart']}\nMLflow: {run_url(out['mlflow_run_id'])}")
    if out.get("tasc_ft"):
        ft = out["tasc_ft"].get("finetune")
        typer.echo(f"TASC-ft model: {out['model']}" + (f" ({ft['steps']} fine-tuning steps, resumed from step "
                                                      f"{ft['resumed_from']})" if ft else ""))
    if out.get("promotion"):
        p = out["promotion"]
        typer.echo(f"registry: version {p['version']} {'promoted to champion' if p['promoted'] else 'stays challenger'}"
                   f" ({p['reason']})")


@app.command()
def promote(task: str = typer.Argument(..., help="task name, e.g. snips"),
            version: str = typer.Argument(..., help="registered version to judge"),
            min_speedup: float = typer.Option(1.05), max_metric_drop: float = typer.Option(0.01),
            metric_floor: float = typer.Option(0.0, help="lowest metric a first champion needs (0: no floor)")):
    """Run the promotion rule on a registered version (moves 'champion' if it wins)."""
    _setup(quiet_flows=False)
    from storage.registry import promote as run
    from tasc.eval.promotion import PromotionPolicy

    d = run(task, version, PromotionPolicy(min_speedup, max_metric_drop, metric_floor))
    typer.echo(f"{'promoted' if d.promote else 'not promoted'}: {d.reason}")


@app.command()
def rollback(task: str = typer.Argument(..., help="task name, e.g. snips")):
    """Make the previous champion the champion again."""
    _setup(quiet_flows=False)
    from storage.registry import registered_name
    from storage.registry import rollback as run

    typer.echo(f"{registered_name(task)}@champion -> version {run(task)}")


@app.command()
def serve(cron: str | None = typer.Option("0 3 * * *", help="retraining schedule (cron)"),
          spec: str = typer.Option("snips")):
    """Serve the pipeline from this process (flow.serve): a schedule plus UI-triggered runs."""
    _setup(quiet_flows=False)
    from flows.serve import serve_pipeline

    serve_pipeline(spec, cron)


def main() -> None:
    """The ``tasc`` command: a failure ends with the error's message, no traceback (the errors
    of tasc say file, line, field and what to do; Prefect's logs of the failed run keep to
    their one line too); ``TASC_TRACEBACK=1`` shows the tracebacks."""
    import sys

    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - every failure ends the same way for a person at a terminal
        if _traceback_asked():
            raise
        # The whole message: tasc's errors put the file, line and field, and what to do, on the
        # lines after the first.
        message = str(e).strip() or type(e).__name__
        print(f"error: {message}\n(TASC_TRACEBACK=1 shows the traceback)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
