"""How :mod:`tasc.train.finetune` sets a run up: the learning-rate schedules, LoRA wrapping and the
torch thread count while training on CPU."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tasc.train.config import FinetuneConfig


def lr_lambda(config: FinetuneConfig, new_rows: bool = False):
    """Warm-up then linear decay. The main schedule starts after the embedding warm-up (zero
    before it); the new rows' schedule spans the whole run."""
    total, warm = config.max_steps, max(1, config.warmup_steps)
    start = 0 if new_rows else min(config.embed_warmup_steps, total)

    def factor(step: int) -> float:
        if step < start:
            return 0.0
        if step - start < warm:
            return (step - start + 1) / warm
        return max(0.0, (total - step) / max(1, total - start - warm))

    return factor


def wrap_lora(model, config: FinetuneConfig, token_ids: list[int]):
    """LoRA on the projections named in ``lora_targets``; the rows ``token_ids`` of the
    input embedding (and the tied head) are trained in full through peft's trainable tokens."""
    from peft import LoraConfig, get_peft_model

    names = {n.rsplit(".", 1)[-1]: m for n, m in model.named_modules()}
    emb = next(n for n, m in names.items() if m is model.get_input_embeddings())
    lc = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                    target_modules=[t for t in config.lora_targets if t in names], task_type="CAUSAL_LM",
                    trainable_token_indices={emb: list(token_ids)} if token_ids else None)
    return get_peft_model(model, lc)


@contextlib.contextmanager
def torch_threads(n: int):
    """``n`` > 0: torch uses ``n`` intra-op threads inside the block (0 leaves the setting)."""
    import torch

    old = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
