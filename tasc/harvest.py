"""On-policy corpus: what the model itself says for the task's prompts.

The draft must predict the model's outputs, not the references, so the best draft corpus
is the model's own greedy generations over the train prompts. Generation is batched
(left padding) for throughput; small numeric differences from batch-1 decoding do not
matter for a draft.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from tasc.engine import eos_ids, render_prompt


@torch.inference_mode()
def harvest(lm, prompts: Sequence[str], max_new_tokens: int, system_prompt: str | None = None,
            chat_template: bool = True, batch_size: int = 8,
            progress: Callable[[int, int], None] | None = None) -> list[str]:
    """Greedy outputs of ``lm`` for each prompt, in order."""
    tok = lm.tokenizer
    side = tok.padding_side
    tok.padding_side = "left"
    stops = sorted(eos_ids(lm.model, tok))
    outs: list[str] = []
    add_special = not (chat_template and getattr(tok, "chat_template", None))
    try:
        for i in range(0, len(prompts), batch_size):
            texts = [render_prompt(tok, p, system_prompt, chat_template) for p in prompts[i : i + batch_size]]
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=add_special).to(lm.model.device)
            gen = lm.model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=stops,
                                    pad_token_id=tok.pad_token_id)
            outs += tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            if progress:
                progress(min(i + batch_size, len(prompts)), len(prompts))
    finally:
        tok.padding_side = side
    return outs
