"""Fine-tuning settings: :class:`FinetuneConfig` and the presets for a shared CPU and one GPU.

The config's :meth:`FinetuneConfig.hash` keys checkpoints: a resumed run must have the same
hash (only the fields in ``tasc.train.io.RESUMABLE`` may change on resume).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace

from tasc.train.io import RESUMABLE

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class FinetuneConfig:
    lr: float = 2e-4
    warmup_steps: int = 10
    max_steps: int = 200
    batch_size: int = 8
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    max_seq_len: int = 256
    eval_every: int = 50
    max_eval_rows: int = 128
    save_every: int = 50
    keep_checkpoints: int = 2
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = LORA_TARGETS
    cpu_threads: int = 0  # torch threads while training on CPU; 0 leaves torch's setting
    # New vocabulary rows start from an average of other rows and must learn to win the
    # argmax against their own first piece: they get their own learning rate and, for the
    # first ``embed_warmup_steps``, are the only weights that train (the rest of the model
    # then starts from a head that already knows the new tokens).
    new_token_lr: float | None = None  # None: the same as lr
    embed_warmup_steps: int = 0

    def hash(self) -> str:
        """Hash of every field that changes the trained weights (not those in RESUMABLE)."""
        d = {k: v for k, v in asdict(self).items() if k not in RESUMABLE}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def cpu_config(**overrides) -> FinetuneConfig:
    """Sized for a round of about 20 minutes on 2 shared CPU cores with a 135M model: LoRA on
    the attention and MLP projections plus the new embedding rows, batches of 4 sequences of
    at most 256 tokens, one torch thread (with a busy second core, two threads wait on each
    other at every barrier and run several times slower than one). Step times: docs/performance.md."""
    base = FinetuneConfig(lr=1e-3, warmup_steps=5, max_steps=60, batch_size=4, grad_accum=1,
                          max_seq_len=256, eval_every=30, max_eval_rows=32, save_every=20,
                          device="cpu", lora=True, cpu_threads=1, new_token_lr=3e-3, embed_warmup_steps=10)
    return replace(base, **overrides)


def gpu_config(**overrides) -> FinetuneConfig:
    """One GPU: full fine-tuning (bf16 autocast), larger batches and more steps."""
    base = FinetuneConfig(lr=1e-4, warmup_steps=30, max_steps=600, batch_size=16, grad_accum=1,
                          max_seq_len=512, eval_every=100, max_eval_rows=256, save_every=100,
                          device="cuda", lora=False, new_token_lr=2e-3, embed_warmup_steps=100)
    return replace(base, **overrides)
