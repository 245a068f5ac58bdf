"""The fine-tuning objective: cross-entropy on completion tokens only (labels -100 elsewhere)."""

from __future__ import annotations

from tasc.train.io import Example, collate


def completion_loss(model, batch, autocast):
    """(sum of token losses, number of completion tokens) for one (B, T) batch. Logits are
    computed only from the first completion position on, which skips most of the (V, H)
    head on long prompts."""
    import torch.nn.functional as F

    labels = batch["labels"]
    has = (labels != -100).any(0).nonzero()
    start = max(1, int(has[0])) if has.numel() else labels.shape[1] - 1
    keep = labels.shape[1] - start + 1
    with autocast:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep)
    logits = out.logits[:, :-1].float()
    target = labels[:, labels.shape[1] - keep + 1 :]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100,
                           reduction="sum")
    return loss, int((target != -100).sum())


def evaluate(model, examples: list[Example], batch_size: int, pad_id: int, device: str, autocast) -> float | None:
    """Mean loss per completion token over ``examples`` (None without any)."""
    import torch

    if not examples:
        return None
    model.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in collate(examples[i : i + batch_size], pad_id).items()}
            loss, k = completion_loss(model, batch, autocast)
            total, n = total + float(loss), n + k
    model.train()
    return total / max(n, 1)
