"""Data-parallel fine-tuning for real: ``tasc finetune`` under torchrun, two CPU processes
on gloo, trains the same weights as one process at twice the per-process batch."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
STEPS = 4


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return {k: v.numpy() for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def _losses(run_dir: Path) -> list[float]:
    state = json.loads((run_dir / "checkpoints" / f"step-{STEPS:06d}" / "state.json").read_text())
    return [h["loss"] for h in state["history"]]


@pytest.mark.slow  # torchrun with two processes, and one more
def test_two_ranks_match_one_process_at_twice_the_batch(tiny_model_dir, tmp_path):
    from storage.corpus import read_corpus
    from tasc.data.ingest import ingest
    from tasc.data.spec import load_spec
    from tasc.train.io import ResumeError
    from tasc.train.launch import launch, run_job, torchrun_command

    spec = load_spec("prompt-completion")
    corpus = tmp_path / "corpus.parquet"
    ingest(spec).corpus.to_parquet(corpus)
    train, val = (read_corpus(corpus, split=s) for s in ("train", "validation"))

    # 2 ranks x 1 sequence x 2 accumulated micro-batches (the second one all-reduces)...
    ddp = tmp_path / "ddp"
    cmd = torchrun_command(2, "prompt-completion", str(tiny_model_dir), ddp, corpus, max_steps=STEPS, device="cpu",
                           batch_size=1, grad_accum=2)
    assert cmd[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    lines: list[str] = []
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    res = launch(cmd, ddp, echo=lines.append, env={**env, "PYTHONPATH": str(ROOT)})
    # ...against 1 process x 2 sequences x 2 micro-batches: the same examples in each step.
    one = run_job(spec, train, val, str(tiny_model_dir), tmp_path / "one", max_steps=STEPS, device="cpu",
                  batch_size=2, grad_accum=2)

    assert res["world_size"] == 2 and one["world_size"] == 1 and res["steps"] == one["steps"] == STEPS
    a, b, base = _weights(ddp / "final"), _weights(tmp_path / "one" / "final"), _weights(Path(tiny_model_dir))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=2e-6, err_msg=k)  # observed: ~1e-7
    assert max(float(np.abs(b[k] - base[k]).max()) for k in b) > 1e-3  # training moved the weights
    np.testing.assert_allclose(_losses(ddp), _losses(tmp_path / "one"), rtol=1e-5)
    assert res["val_loss"] == pytest.approx(one["val_loss"], rel=1e-5)

    # Rank 0 alone wrote: one checkpoint set, one final folder, one result, one JSON printed.
    assert sorted(p.name for p in ddp.iterdir()) == ["checkpoints", "final", "result.json"]
    assert [p.name for p in (ddp / "checkpoints").iterdir()] == [f"step-{STEPS:06d}"]
    state = json.loads((ddp / "checkpoints" / f"step-{STEPS:06d}" / "state.json").read_text())
    assert state["world_size"] == 2 and "world_size" not in json.loads(
        (tmp_path / "one" / "checkpoints" / f"step-{STEPS:06d}" / "state.json").read_text())
    assert sum('"world_size": 2' in line for line in lines) == 1

    # The global batch is part of the run: one process does not resume a two-process folder.
    with pytest.raises(ResumeError, match="2 process"):
        run_job(spec, train, val, str(tiny_model_dir), ddp, max_steps=STEPS + 2, device="cpu", batch_size=1,
                grad_accum=2)


def test_procs_default_to_the_visible_cuda_devices():
    import torch

    from tasc.train.launch import resolve_procs

    assert resolve_procs(3) == 3
    assert resolve_procs(None) == resolve_procs(0) == max(1, torch.cuda.device_count())
