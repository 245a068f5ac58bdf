"""One fine-tuning job of a task spec, in this process or launched over several devices.

:func:`run_job` fine-tunes a model on a spec's train rows (validation rows for the loss) into
``out_dir`` with the device's preset (:func:`tasc.ft.rounds.make_config`: LoRA on CPU, full
fine-tuning on a GPU), resumes from the newest checkpoint there, and writes
``out_dir/result.json`` (rank 0). ``tasc finetune`` runs it; under ``torchrun`` or
``accelerate launch`` every process does, each training its share (:mod:`tasc.train.distributed`).

:func:`torchrun_command` is the command line that runs ``tasc finetune`` in N processes on
this machine (``python -m torch.distributed.run --standalone --nproc_per_node N -m tasc.cli
finetune ...``), :func:`launch` runs it and returns rank 0's result, and
:func:`resolve_procs` says how many processes a job gets (one per visible CUDA device unless
told otherwise).
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from tasc.train import distributed

RESULT_FILE = "result.json"


def run_job(spec, train, val, model: str, out_dir: str | Path, max_steps: int | None = None, device: str = "auto",
            batch_size: int | None = None, grad_accum: int | None = None, progress: bool = False) -> dict[str, Any]:
    """Fine-tune ``model`` (a folder, short name or hub id) on ``train``/``val`` rows of the
    ``spec`` (a TaskSpec) into ``out_dir``; ``batch_size`` (per process) and ``grad_accum``
    override the preset's. Returns, on every rank: model_dir (the final folder), steps,
    resumed_from, train_loss, val_loss, tokens_per_s, world_size, run_dir."""
    from tasc.ft.rounds import make_config
    from tasc.models import load_model, pick_device, resolve_model
    from tasc.train.finetune import finetune

    config = make_config(finetune=True, max_steps=max_steps, device=device).finetune
    config = replace(config, batch_size=batch_size or config.batch_size, grad_accum=grad_accum or config.grad_accum)
    world, _ = distributed.join(pick_device(config.device))
    try:
        # Rank 0 converts or downloads a named model first; the others then find it cached.
        distributed.on_main(world, resolve_model, model)
        # Loaded on the CPU: finetune moves it to this rank's device.
        lm = load_model(model, dtype="float32", device="cpu")
        res = finetune(lm.model, lm.tokenizer, train, val, config, out_dir, spec.chat_template, spec.system_prompt,
                       progress=progress)
    finally:
        distributed.leave(world)
    out = {"model_dir": str(res.checkpoint_dir), "steps": res.steps, "resumed_from": res.resumed_from,
           "train_loss": res.train_loss, "val_loss": res.val_loss, "tokens_per_s": res.tokens_per_s,
           "world_size": world.size, "run_dir": str(out_dir)}
    if world.main:
        tmp = Path(out_dir) / f".{RESULT_FILE}.{os.getpid()}"
        tmp.write_text(json.dumps(out, indent=1))
        os.replace(tmp, Path(out_dir) / RESULT_FILE)
    return out


def resolve_procs(requested: int | None = None) -> int:
    """Processes for a job: ``requested`` when > 0, else the number of visible CUDA devices
    (``CUDA_VISIBLE_DEVICES`` narrows it), at least 1."""
    if requested and requested > 0:
        return requested
    import torch

    return max(1, torch.cuda.device_count() if torch.cuda.is_available() else 0)


def torchrun_command(procs: int, spec: str, model: str, out_dir: str | Path, corpus: str | Path,
                     max_steps: int | None = None, device: str = "auto", batch_size: int | None = None,
                     grad_accum: int | None = None) -> list[str]:
    """``tasc finetune`` in ``procs`` processes on this machine. ``--standalone`` gives the
    rendezvous a free local port, so concurrent jobs do not collide."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
           "-m", "tasc.cli", "finetune", spec, "--model", str(model), "--out", str(out_dir), "--corpus", str(corpus),
           "--device", device, "--no-progress"]
    for flag, value in (("--max-steps", max_steps), ("--batch-size", batch_size), ("--grad-accum", grad_accum)):
        cmd += [flag, str(value)] if value else []
    return cmd


def launch(cmd: list[str], out_dir: str | Path, echo=print, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run a launcher command line, echoing its output line by line; returns the job's
    ``result.json``. A failed job raises RuntimeError with the end of its output."""
    tail: collections.deque[str] = collections.deque(maxlen=40)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
        for line in proc.stdout:
            tail.append(line.rstrip())
            echo(line.rstrip())
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:8])} ... exited with status {proc.returncode}:\n" + "\n".join(tail))
    return json.loads((Path(out_dir) / RESULT_FILE).read_text())
