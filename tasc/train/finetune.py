"""Fine-tuning a causal LM on prompt/completion rows, the loss on completion tokens only.

A row's prompt is rendered with the tokenizer's chat template and a generation prompt (or
used as plain text), the completion and EOS follow, and labels are -100 over the prompt.
AdamW with linear warm-up then linear decay to zero, gradient accumulation and clipping;
bf16 autocast on CUDA, fp32 on CPU. Batches come from a seeded permutation per epoch indexed
by the step, so a resumed run sees the same batches as an uninterrupted one.

Checkpoints (``out_dir/checkpoints/step-NNNNNN``) hold the model, tokenizer, optimizer,
scheduler, RNG state, step, history and a hash of the config and data; they are written to a
temporary folder and renamed, so a killed run leaves only complete ones. Calling
:func:`finetune` again with the same ``out_dir`` resumes from the newest one; a changed
config or data set fails with :class:`ResumeError`. The fields in ``RESUMABLE``
(``max_steps``, evaluation and save cadence, device, threads) may change on resume, so a
finished run can be extended. A NaN/inf loss, gradient or weight stops training with
:class:`DivergedError`, naming the last good checkpoint, which is kept. Under ``torchrun`` or
``accelerate launch`` (``WORLD_SIZE`` > 1) training is data-parallel, each rank taking its share
of every step's batch; see :mod:`tasc.train.distributed`.
"""

from __future__ import annotations

import contextlib
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from tasc import progress_bar
from tasc.models import pick_device
from tasc.train import distributed
from tasc.train.config import FinetuneConfig
from tasc.train.io import (
    Example,
    collate,
    data_hash,
    encode_rows,
    finite_params,
    latest_checkpoint,
    micro_batch,
    prune_checkpoints,
    resume,
    save_checkpoint,
    write_final,
)
from tasc.train.io import ResumeError as ResumeError
from tasc.train.loss import completion_loss, evaluate
from tasc.train.setup import lr_lambda as _lr_lambda
from tasc.train.setup import torch_threads as _torch_threads
from tasc.train.setup import wrap_lora as _wrap_lora


class DivergedError(RuntimeError):
    """The loss or gradient became NaN/inf; ``checkpoint`` is the last good one (or None)."""

    def __init__(self, message: str, step: int, checkpoint: Path | None):
        super().__init__(message)
        self.step, self.checkpoint = step, checkpoint


@dataclass
class FinetuneResult:
    steps: int
    train_loss: float | None  # mean over the last logged steps of this run (or of the history)
    val_loss: float | None
    checkpoint_dir: Path  # the final model folder (model + tokenizer), loadable with load_model
    history: list[dict[str, Any]] = field(default_factory=list)
    resumed_from: int = 0  # step of the checkpoint this run started from
    tokens_per_s: float | None = None


# ---------------------------------------------------------------------------- training


def _train_step(model, examples, step: int, config: FinetuneConfig, pad_id: int, device: str, autocast):
    """Forward/backward over ``grad_accum`` micro-batches, the loss normalised by all their
    completion tokens. Returns (mean loss per token, input tokens seen)."""
    import torch

    batches = [collate(micro_batch(examples, step * config.grad_accum + j, config.batch_size, config.seed), pad_id)
               for j in range(config.grad_accum)]
    n_target = sum(int((b["labels"] != -100).sum()) for b in batches)
    total = 0.0
    for b in batches:
        loss, _ = completion_loss(model, {k: v.to(device) for k, v in b.items()}, autocast)
        if not torch.isfinite(loss):
            return float(loss.detach()), 0
        (loss / n_target).backward()
        total += loss.item()
    return total / n_target, sum(int(b["attention_mask"].sum()) for b in batches)


def _diverged(step: int, what: str, good: Path | None) -> DivergedError:
    where = f"the last good checkpoint is {good}" if good else "no checkpoint had been saved yet"
    return DivergedError(f"training diverged at step {step}: {what}; {where}", step, good)


@dataclass
class _Training:
    """What one run carries from step to step."""

    model: Any
    tokenizer: Any
    config: FinetuneConfig
    device: str
    out_dir: Path
    meta: dict[str, Any]
    params: list = field(default_factory=list)
    opt: Any = None
    sched: Any = None
    good: Path | None = None  # last checkpoint written or resumed from
    world: distributed.World = field(default_factory=distributed.World)
    ddp: Any = None  # the model that trains: DistributedDataParallel over ranks, else the model
    full_emb: Any = None  # full fine-tuning with new rows: the embedding matrix they live in
    old_rows: Any = None  # bool (V,): rows of full_emb that were there before expansion

    def prepare(self, new_token_ids: list[int] | None) -> dict[str, Any]:
        """fp32 weights on the device, LoRA if asked, AdamW + schedule; resume if possible.
        Returns the resumed state (step, history)."""
        import torch

        cfg = self.config
        self.model = self.model.float().to(self.device).train()
        ids = new_token_ids
        if ids is None:
            ids = sorted(i for i, t in self.tokenizer.added_tokens_decoder.items() if not t.special)
        if cfg.lora:
            self.model = _wrap_lora(self.model, cfg, ids)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        new = self._new_row_params(ids)
        main = [p for p in self.params if all(p is not q for q in new)]
        groups = [{"params": main, "lr": cfg.lr}]
        lambdas = [_lr_lambda(cfg) if new else _lr_lambda(replace(cfg, embed_warmup_steps=0))]
        if new:
            groups.append({"params": new, "lr": cfg.new_token_lr or cfg.lr})
            lambdas.append(_lr_lambda(cfg, new_rows=True))
        self.opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambdas)
        self.good = distributed.agree(latest_checkpoint(self.out_dir), self.world)  # rank 0 picks
        distributed.check_world(self.good, self.world)
        self.ddp = distributed.wrap(self.model, self.world, self.device)
        if self.good is None:
            return {"step": 0, "history": []}
        return resume(self.good, self.model, self.opt, self.sched, self.meta)

    def _new_row_params(self, ids: list[int]) -> list:
        """The parameters that carry the new rows: peft's trainable-token deltas with LoRA; in
        full fine-tuning the whole embedding matrix, whose OLD rows then get the main learning
        rate by rescaling their update (``old_rows``)."""
        import torch

        if not ids:
            return []
        if self.config.lora:
            return [p for n, p in self.model.named_parameters() if "trainable_tokens_delta" in n and p.requires_grad]
        emb = self.model.get_input_embeddings().weight
        self.old_rows = torch.ones(emb.shape[0], dtype=torch.bool, device=emb.device)
        self.old_rows[torch.as_tensor(ids, device=emb.device)] = False
        self.full_emb = emb
        return [emb]

    def update(self, step: int) -> None:
        """Clip, check and apply the accumulated gradients of step ``step`` (1-based)."""
        import torch

        warming = len(self.opt.param_groups) > 1 and step <= self.config.embed_warmup_steps
        if warming:  # only the new rows learn: no gradient means AdamW leaves a weight alone
            for p in self.opt.param_groups[0]["params"]:
                p.grad = None
            if self.full_emb is not None and self.full_emb.grad is not None:
                self.full_emb.grad[self.old_rows] = 0.0
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        if not torch.isfinite(norm):
            raise _diverged(step, f"gradient norm is {float(norm)}", self.good)
        before = self.full_emb.detach()[self.old_rows].clone() if self.full_emb is not None and not warming else None
        self.opt.step()
        if before is not None:  # per-row learning rate: old rows move at the main group's rate
            scale = self.opt.param_groups[0]["lr"] / max(self.opt.param_groups[1]["lr"], 1e-30)
            with torch.no_grad():
                w = self.full_emb
                w[self.old_rows] = before + (w[self.old_rows] - before) * scale
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)

    def save(self, step: int, history: list[dict[str, Any]]) -> None:
        if not finite_params(self.model):
            raise _diverged(step, "weights are no longer finite", self.good)
        self.good = distributed.on_main(self.world, self._write, step, history) or (
            self.out_dir / "checkpoints" / f"step-{step:06d}")

    def _write(self, step: int, history: list[dict[str, Any]]) -> Path:
        path = save_checkpoint(self.out_dir, step, self.model, self.tokenizer, self.opt, self.sched,
                               {**self.meta, "history": history})
        prune_checkpoints(self.out_dir, self.config.keep_checkpoints)
        return path


def finetune(model, tokenizer, train_rows, val_rows, config: FinetuneConfig | None = None,
             out_dir: str | Path = "finetune", chat_template: bool = True, system_prompt: str | None = None,
             progress: bool = True, new_token_ids: list[int] | None = None) -> FinetuneResult:
    """Train ``model`` (in place) on rows with ``prompt`` and ``completion`` (DataFrame or
    dicts; optional ``system`` and ``messages`` columns), resuming from ``out_dir`` if it holds
    checkpoints of the same run (pass the same starting model: the checkpoint is loaded into
    it). With ``config.lora``, LoRA is merged back at the end and ``new_token_ids`` (default:
    the tokenizer's non-special added tokens) are trained in full."""
    import torch

    config, out_dir = config or FinetuneConfig(), Path(out_dir)
    device = pick_device(config.device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("config.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    world, device = distributed.join(device)  # no-op without a launcher (torchrun, accelerate)
    train = encode_rows(tokenizer, train_rows, chat_template, system_prompt, config.max_seq_len)
    val = encode_rows(tokenizer, val_rows, chat_template, system_prompt, config.max_seq_len)
    if not train:
        raise ValueError("finetune needs at least one training row")
    meta = {"config": asdict(config), "config_hash": config.hash(), "data_hash": data_hash(train + val),
            "vocab_size": len(tokenizer)}
    if world.active:  # a single process writes the state it always did
        meta["world_size"] = world.size
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)
    run = _Training(model, tokenizer, config, device, out_dir, meta, world=world)
    with _torch_threads(config.cpu_threads if device == "cpu" else 0):
        state = run.prepare(new_token_ids)
        history, rate = _loop(run, train, val[: config.max_eval_rows], state, progress)
        _, final = distributed.on_main(world, write_final, run.model, tokenizer, out_dir, config.lora) or (
            None, out_dir / "final")
    distributed.leave(world)
    recent = [h["loss"] for h in history[-10:]]
    val_losses = [h["val_loss"] for h in history if h.get("val_loss") is not None]
    return FinetuneResult(len(history), float(np.mean(recent)) if recent else None,
                          val_losses[-1] if val_losses else None, final, history, state["step"], rate)


def _loop(run: _Training, train: list[Example], val: list[Example], state: dict[str, Any], progress: bool):
    """Steps from the resumed one to ``max_steps``: train, log, evaluate, save. Returns the
    history (all steps, resumed ones included) and this run's input tokens per second."""
    import torch

    cfg, step, history = run.config, state["step"], list(state["history"])
    cuda = run.device.startswith("cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    pad = run.tokenizer.pad_token_id if run.tokenizer.pad_token_id is not None else run.tokenizer.eos_token_id
    # progress=True shows the bar where the terminal allows (tasc.progress_bar); rank 0 only.
    with progress_bar(cfg.max_steps, desc="finetune", unit="step", show=progress and run.world.main,
                      initial=step) as bar:
        seen, t0 = 0, time.perf_counter()
        while step < cfg.max_steps:
            if run.world.active:
                loss, tokens = distributed.train_step(run.ddp, train, step, cfg, pad, run.device, autocast,
                                                      run.world)
            else:
                loss, tokens = _train_step(run.model, train, step, cfg, pad, run.device, autocast)
            if not np.isfinite(loss):
                raise _diverged(step + 1, f"loss is {loss}", run.good)
            run.update(step + 1)
            step, seen, elapsed = step + 1, seen + tokens, time.perf_counter() - t0
            lrs = run.sched.get_last_lr()
            entry = {"step": step, "loss": loss, "lr": lrs[0], "tokens_per_s": seen / max(elapsed, 1e-9),
                     "elapsed_s": elapsed}
            if len(lrs) > 1:
                entry["lr_new_rows"] = lrs[1]
            if step % cfg.eval_every == 0 or step == cfg.max_steps:
                entry["val_loss"] = evaluate(run.model, val, cfg.batch_size, pad, run.device, autocast)
            history.append(entry)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{entry['tokens_per_s']:.0f}")
            if step % cfg.save_every == 0 or step == cfg.max_steps:
                run.save(step, history)
    return history, (seen / max(time.perf_counter() - t0, 1e-9) if seen else None)
