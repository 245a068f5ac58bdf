"""On-policy corpus: what the model itself says for the task's prompts.

The draft must predict the model's outputs, not the references, so the best draft corpus
is the model's own greedy generations over the train prompts. On a GPU generation is
batched (left padding) for throughput; small numeric differences from batch-1 decoding do
not matter for a draft. On a CPU, batching buys little (a multi-row step costs about as
much more as it yields), so requests run one by one through the speculative engine with a
draft of the reference completions, which is lossless and faster than plain greedy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from tasc import progress_bar
from tasc.data.prompts import Row, encode_prompts, render_prompt, uses_chat_template
from tasc.decode.draft import BoundDraft
from tasc.decode.engine import DecodeConfig, decode, eos_ids, measure_verify_cost
from tasc.decode.proposer import Proposer


@torch.inference_mode()
def harvest(lm, rows: Sequence[Row], max_new_tokens: int, system_prompt: str | None = None,
            chat_template: bool = True, batch_size: int = 8,
            progress: Callable[[int, int], None] | None = None, draft: BoundDraft | None = None) -> list[str]:
    """Greedy outputs of ``lm`` for each row (a corpus row, whose ``system`` and ``messages``
    are honoured, or a plain prompt), in order. ``draft`` speeds up CPU decoding."""
    if str(lm.device) == "cpu":
        return _harvest_speculative(lm, rows, max_new_tokens, system_prompt, chat_template, progress, draft)
    tok = lm.tokenizer
    side = tok.padding_side
    tok.padding_side = "left"
    stops = sorted(eos_ids(lm.model, tok))
    outs: list[str] = []
    add_special = not uses_chat_template(tok, chat_template)  # as in encode_prompts
    try:
        with progress_bar(len(rows), desc="harvest", unit="prompt") as bar:
            for i in range(0, len(rows), batch_size):
                texts = [render_prompt(tok, r, system_prompt, chat_template)
                         for r in rows[i : i + batch_size]]
                enc = tok(texts, return_tensors="pt", padding=True,
                          add_special_tokens=add_special).to(lm.model.device)
                gen = lm.model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens,
                                        eos_token_id=stops, pad_token_id=tok.pad_token_id)
                outs += tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
                bar.update(len(texts))
                if progress:
                    progress(min(i + batch_size, len(rows)), len(rows))
    finally:
        tok.padding_side = side
    return outs


def _harvest_speculative(lm, rows, max_new_tokens, system_prompt, chat_template, progress, draft) -> list[str]:
    cost = measure_verify_cost(lm.model, reps=2)
    cfg = DecodeConfig(max_new_tokens=max_new_tokens)
    outs = []
    # The bar moves every prompt; the callback (a log line) every 8, to keep the log short.
    with progress_bar(len(rows), desc="harvest", unit="prompt") as bar:
        for i, ids in enumerate(encode_prompts(lm.tokenizer, rows, system_prompt, chat_template)):
            outs.append(decode(lm.model, lm.tokenizer, ids, Proposer(draft, cost=cost), cfg).text)
            bar.update()
            if progress and ((i + 1) % 8 == 0 or i + 1 == len(rows)):
                progress(i + 1, len(rows))
    return outs
