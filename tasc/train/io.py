"""What goes in and out of :mod:`tasc.train.finetune`: training examples and checkpoints.

Rows become :class:`Example` id sequences (prompt rendered with the chat template, completion
and EOS after it); batches are drawn from a seeded permutation per epoch indexed by the
micro-batch number, so a resumed run sees the batches an uninterrupted one would.

A checkpoint folder ``out_dir/checkpoints/step-NNNNNN`` holds the model (``save_pretrained``:
full weights, or the adapter for a peft model), the tokenizer, ``trainer_state.pt``
(optimizer, scheduler, RNG states) and ``state.json`` (step, history, config and its hash,
data hash). It is written to ``step-NNNNNN.tmp`` and renamed, and ``state.json`` is what
marks it complete, so a killed run never leaves a half checkpoint that resume would pick.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tasc.data.prompts import as_rows, encode_prompts

# Fields of FinetuneConfig that may change when a run is resumed (extending it).
RESUMABLE = ("max_steps", "eval_every", "save_every", "keep_checkpoints", "max_eval_rows", "device", "cpu_threads")


class ResumeError(RuntimeError):
    """``out_dir`` holds checkpoints of a run with another config, data set or model."""


@dataclass(frozen=True)
class Example:
    ids: tuple[int, ...]
    n_prompt: int  # labels are -100 on ids[:n_prompt]


def encode_rows(tokenizer, rows, chat_template: bool, system_prompt: str | None, max_seq_len: int) -> list[Example]:
    """Examples of at most ``max_seq_len`` ids: the prompt is cut from the left first, then
    the completion from the right (the completion keeps at least one token)."""
    records = as_rows(rows)
    # The prompt ids are exactly what generation feeds the model (tasc.data.prompts).
    p_ids = encode_prompts(tokenizer, records, system_prompt, chat_template)
    c_ids = tokenizer([r["completion"] for r in records], add_special_tokens=False)["input_ids"] if records else []
    out = []
    for p, c in zip(p_ids, c_ids, strict=True):
        c = (c + [tokenizer.eos_token_id])[: max_seq_len - 1]
        p = p[max(0, len(p) - (max_seq_len - len(c))) :] or [tokenizer.eos_token_id]
        out.append(Example(tuple(p + c), len(p)))
    return out


def data_hash(examples: list[Example]) -> str:
    h = hashlib.sha256()
    for ex in examples:
        h.update(np.asarray(ex.ids, np.int64).tobytes() + ex.n_prompt.to_bytes(4, "little"))
    return h.hexdigest()[:16]


def collate(examples: list[Example], pad_id: int):
    """Right-padded tensors: input_ids, attention_mask, labels, all (B, T) int64."""
    import torch

    t = max(len(ex.ids) for ex in examples)
    ids = torch.full((len(examples), t), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for b, ex in enumerate(examples):
        n = len(ex.ids)
        ids[b, :n] = torch.tensor(ex.ids)
        mask[b, :n] = 1
        labels[b, ex.n_prompt : n] = ids[b, ex.n_prompt : n]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@functools.lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def micro_batch(examples: list[Example], index: int, batch_size: int, seed: int) -> list[Example]:
    """Micro-batch ``index`` of an endless stream of seeded per-epoch permutations."""
    n = len(examples)
    picks = (divmod(k, n) for k in range(index * batch_size, (index + 1) * batch_size))
    return [examples[int(_epoch_order(n, seed, e)[p])] for e, p in picks]


# ---------------------------------------------------------------------------- checkpoints


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete checkpoint folder (one with state.json) under ``out_dir``."""
    done = sorted((out_dir / "checkpoints").glob("step-*/state.json"))
    return done[-1].parent if done else None


def _rng_state() -> dict[str, Any]:
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def finite_params(model) -> bool:
    import torch

    return all(bool(torch.isfinite(p).all()) for p in model.parameters() if p.requires_grad)


def save_checkpoint(out_dir: Path, step: int, model, tokenizer, opt, sched, meta: dict[str, Any]) -> Path:
    """Write ``checkpoints/step-NNNNNN`` atomically (temp folder, then rename)."""
    import torch

    final = out_dir / "checkpoints" / f"step-{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # A peft checkpoint keeps the resized embedding too, so it does not depend on the caller
    # re-creating the same expanded starting model.
    model.save_pretrained(tmp, **({"save_embedding_layers": True} if hasattr(model, "peft_config") else {}))
    tokenizer.save_pretrained(tmp)
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": _rng_state()},
               tmp / "trainer_state.pt")
    (tmp / "state.json").write_text(json.dumps({**meta, "step": step}, indent=1, default=str))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def prune_checkpoints(out_dir: Path, keep: int) -> None:
    done = sorted((out_dir / "checkpoints").glob("step-*/state.json"))
    for old in done[: max(0, len(done) - max(1, keep))]:
        shutil.rmtree(old.parent, ignore_errors=True)


def _load_weights(model, ckpt: Path) -> None:
    from safetensors.torch import load_file

    files = sorted(ckpt.glob("*.safetensors"))
    state = {k: v for f in files for k, v in load_file(str(f)).items()}
    if hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, state)
        return
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatch: another vocabulary or architecture
        raise ResumeError(f"{ckpt} does not fit this model: {e}") from e
    tied = {k for k in missing if k.endswith("lm_head.weight")} if model.config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ResumeError(f"{ckpt} does not fit this model: missing {sorted(missing)[:5]}, unexpected {unexpected[:5]}")


def resume(ckpt: Path, model, opt, sched, meta: dict[str, Any]) -> dict[str, Any]:
    """Load a checkpoint into model, optimizer, scheduler and RNGs; returns its state.json."""
    import torch

    state = json.loads((ckpt / "state.json").read_text())
    if state["config_hash"] != meta["config_hash"]:
        changed = {k: (state["config"].get(k), v) for k, v in meta["config"].items()
                   if k not in RESUMABLE and state["config"].get(k) != v}
        raise ResumeError(
            f"{ckpt.parent.parent} holds a run with another config; changed (old, new): {changed}. "
            "Use a new output folder, or the old config (only max_steps, eval_every, save_every, "
            "keep_checkpoints, max_eval_rows and device may change on resume)."
        )
    if state["data_hash"] != meta["data_hash"]:
        raise ResumeError(f"{ckpt.parent.parent} holds a run on other training/validation data")
    _load_weights(model, ckpt)
    trainer = torch.load(ckpt / "trainer_state.pt", weights_only=False)
    opt.load_state_dict(trainer["optimizer"])
    sched.load_state_dict(trainer["scheduler"])
    _set_rng_state(trainer["rng"])
    return state


def write_final(model, tokenizer, out_dir: Path, lora: bool):
    """Save the trained model (LoRA merged in) and tokenizer to ``out_dir/final``."""
    if lora:
        model = model.merge_and_unload()
    final = out_dir / "final"
    tmp = out_dir / "final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return model, final
