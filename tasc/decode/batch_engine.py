"""Batched decoding: B requests share one forward pass per step.

``decode_batch`` is ``engine.decode`` for several requests at once (plain greedy, or
speculative with a draft per row); ``generate_batch`` is ``engine.generate`` with batching.

On the default CPU path (quantised weights, the fused step: tasc.accel.fused) greedy batches
need none of what follows: each request keeps its own KV cache and runs engine.decode's own
steps (``engine.Request``), and one pass carries the rows of every unfinished request
(``tasc.accel.backend.argmax_together``). Every row there is computed on its own, so each
request's tokens are bitwise its single-request tokens, and the rows share each weight read.
The rest of this module is the path for transformers' forward (other dtypes, a GPU, sampling):

Its cache layout: one ``DynamicCache`` of shape (B, heads, C, head_dim) whose C slots are not
all real tokens; a 2D ``mask`` (B, C) says which are. Prompts are left-padded (mask 0), and
each verify step appends N = 1 + k_max slots to every row: the row's last emitted token, its
own draft of k_b tokens, then k_max - k_b pad slots (mask 0). After verification row b keeps
its first 1 + a_b slots of the step (a_b = accepted draft tokens); the rejected and pad
slots are set to 0 in the mask and stay in the cache as holes. The step's trailing slots
that no row kept, N - max_b(1 + a_b), are cropped, so holes per step are bounded by how far
the best row got ahead; rows that finish are dropped from the cache's batch dimension.

Why this is exact (not only approximately right): transformers builds the attention mask
as causal-by-slot AND the 2D mask. Within a step a row's real tokens sit in its first
slots in order, so slot order equals token order; holes and pads are hidden from every
later query by the 2D mask, and from the real queries of their own step by causality
(they come after them). So every real query attends to exactly the keys of its row's
earlier real tokens. Position ids are passed per row (= the token's index in that row's
own sequence), so RoPE sees the positions an unpadded run sees. Each row's logits are
therefore the single-request logits up to float rounding (other matmul shapes; a masked
key adds an exact 0), and each emitted token is the argmax given the accepted prefix; a
greedy row can part from an unbatched run only where its top two logits tie within that
rounding (seen once in fp32 on the tiny test model: a gap of 2e-6).

The alternative, cropping every row to the shortest accepted length and re-feeding the
surplus, needs no holes but recomputes accepted tokens; holes only cost attention width.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from tasc.accel.backend import Backend, argmax_together
from tasc.data.prompts import Row, encode_prompts
from tasc.decode.draft import BoundDraft
from tasc.decode.engine import (
    METHODS,
    DecodeConfig,
    Output,
    Request,
    RequestStats,
    accept_greedy,
    cut_at_stop,
    eos_ids,
    first_stop,
    paused_gc,
    verify_draft,
)
from tasc.decode.proposer import Proposer, ProposerConfig, new_trust

_NO_DRAFT = (np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float64))


class _BatchForward:
    """The shared cache, its slot mask and the per-pass calls of the model."""

    def __init__(self, model):
        from transformers import DynamicCache

        self.model = model
        self.cache = DynamicCache(config=model.config)
        if any(getattr(self.cache, "is_sliding", ())) or any(getattr(self.cache, "is_linear", ())):
            # A sliding window counts cache slots, and holes are slots: the window would
            # silently cover fewer real tokens than in an unbatched run.
            raise NotImplementedError("batched decoding supports full-attention models only "
                                      "(this model has sliding-window or linear-attention layers)")
        params = inspect.signature(model.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        self.mask = torch.zeros((0, 0), dtype=torch.long, device=model.device)
        self.passes = 0

    def __call__(self, ids: torch.Tensor, step_mask: torch.Tensor, pos: torch.Tensor, keep: int) -> torch.Tensor:
        """One pass. ids, step_mask, pos: int64 (B, N) new tokens, their mask bits and
        per-row positions; returns float32 logits (B, keep, V) of the last ``keep`` slots."""
        mask = torch.cat([self.mask, step_mask], dim=1) if self.mask.numel() else step_mask
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                         logits_to_keep=keep, **{self.cache_kw: self.cache})
        self.mask = mask
        self.passes += 1
        return out.logits[:, -keep:].float()

    def keep_slots(self, n_new: int, valid: torch.Tensor) -> None:
        """After a pass over n_new slots: row b keeps its first valid[b] (int64 (B,)); the
        rest become holes; the trailing slots no row kept are cropped from the cache."""
        cols = torch.arange(n_new, device=self.mask.device)
        self.mask[:, -n_new:] *= (cols[None, :] < valid[:, None]).long()
        surplus = n_new - int(valid.max())
        if surplus > 0:
            self.cache.crop(-surplus)
            self.mask = self.mask[:, :-surplus]

    def select(self, rows: list[int]) -> None:
        """Keep only these batch rows (finished requests leave the batch)."""
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.mask.device)
        self.cache.batch_select_indices(idx)
        self.mask = self.mask[idx]


@dataclass
class _Row:
    """One request's state: its tokens, draft source and stats (as in engine.decode)."""

    prompt_len: int
    proposer: Proposer | None
    gen: torch.Generator | None
    ctx: np.ndarray  # int64: prompt, then the tokens emitted so far (n_ctx of them)
    n_ctx: int
    out: list[int] = field(default_factory=list)
    stats: RequestStats = field(default_factory=RequestStats)
    draft: np.ndarray = field(default_factory=lambda: _NO_DRAFT[0])
    probs: np.ndarray = field(default_factory=lambda: _NO_DRAFT[1])
    stopped: bool = False  # a stop string ended the request in step 6

    def finished(self, stops: set[int], cfg: DecodeConfig, tokenizer) -> bool:
        """engine.decode's step 1: EOS (dropped), the token budget, a stop string."""
        if self.stopped:
            return True
        if self.out[-1] in stops:
            self.out.pop()
            return True
        if len(self.out) >= cfg.max_new_tokens:
            self.out = self.out[: cfg.max_new_tokens]
            return True
        return bool(cfg.stop) and first_stop(tokenizer, self.out, len(self.out) - 1, cfg.stop) is not None

    def emit(self, new: list[int], stops: set[int], cfg: DecodeConfig, tokenizer) -> bool:
        """engine.decode's step 6; True when a stop string ended the request."""
        for t in new:
            self.out.append(t)
            if t in stops or len(self.out) >= cfg.max_new_tokens:
                break
        if cfg.stop:
            hit = first_stop(tokenizer, self.out, len(self.out) - len(new), cfg.stop)
            if hit is not None:
                self.out = self.out[:hit]
                return True
        self.ctx[self.n_ctx : self.n_ctx + len(new)] = new
        self.n_ctx += len(new)
        return False


def _finish(row: _Row, tokenizer, cfg: DecodeConfig, t0: float) -> Output:
    text = tokenizer.decode(row.out, skip_special_tokens=True)
    if cfg.stop:
        text = cut_at_stop(text, cfg.stop)
    row.stats.new_tokens = len(row.out)
    row.stats.chars = len(text)
    row.stats.latency_s = time.perf_counter() - t0
    return Output(text=text, token_ids=row.out, stats=row.stats)


@torch.inference_mode()
def decode_batch(model, tokenizer, prompt_ids: Sequence[Sequence[int]],
                 proposers: Sequence[Proposer | None] | None, cfg: DecodeConfig) -> list[Output]:
    """Decode B requests together; row b's tokens are engine.decode's for the same prompt.

    prompt_ids: B lists of int token ids (each non-empty; any lengths). proposers: one
    Proposer (or None: no drafting) per row, or None for plain batched greedy/sampling.
    With a temperature each row samples from its own generator seeded with ``cfg.seed``, as
    engine.decode does. Returns B Outputs in input order. Per row, ``forward_passes`` counts
    the batched passes it took part in and ``latency_s`` runs from the batch's start to the
    row's end (rows run concurrently, so latencies do not add up to wall time)."""
    t0 = time.perf_counter()
    B = len(prompt_ids)
    proposers = list(proposers) if proposers is not None else [None] * B
    if len(proposers) != B:
        raise ValueError(f"{len(proposers)} proposers for {B} prompts")
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("every prompt needs at least one token")
    if B == 0:
        return []
    backend = Backend.for_model(model)
    if cfg.temperature <= 0 and backend.lean is not None and backend.lean.fused is not None and backend.head is not None:
        with paused_gc():
            return _decode_together(backend, tokenizer, prompt_ids, proposers, cfg, t0)
    stops, dev = eos_ids(model, tokenizer), model.device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    fwd = _BatchForward(model)
    rows = []
    for p_ids, prop in zip(prompt_ids, proposers, strict=True):
        ctx = np.empty(len(p_ids) + cfg.max_new_tokens + 64, dtype=np.int64)
        ctx[: len(p_ids)] = p_ids
        gen = torch.Generator().manual_seed(cfg.seed) if cfg.temperature > 0 else None
        rows.append(_Row(len(p_ids), prop, gen, ctx, len(p_ids), stats=RequestStats(prompt_tokens=len(p_ids))))
    # Step 0: prefill the left-padded prompts; every row's last slot is its last prompt token.
    L = max(r.prompt_len for r in rows)
    ids = torch.full((B, L), pad, dtype=torch.long)
    m = torch.zeros((B, L), dtype=torch.long)
    pos = torch.zeros((B, L), dtype=torch.long)
    for b, (p, r) in enumerate(zip(prompt_ids, rows, strict=True)):
        ids[b, L - r.prompt_len :] = torch.as_tensor(list(p))
        m[b, L - r.prompt_len :] = 1
        pos[b, L - r.prompt_len :] = torch.arange(r.prompt_len)
    logits = fwd(ids.to(dev), m.to(dev), pos.to(dev), keep=1)
    for b, r in enumerate(rows):
        r.stats.forward_passes += 1
        r.stats.first_token_s = time.perf_counter() - t0
        _, tok = verify_draft(logits[b], _NO_DRAFT[0], cfg.temperature, r.gen)
        r.out.append(tok)
        r.ctx[r.n_ctx] = tok
        r.n_ctx += 1
    results: list[Output | None] = [None] * B
    active = list(range(B))  # request index of each cache row
    while True:
        # Step 1: finished rows (EOS, budget, stop string) leave the batch and the cache.
        still = [i for i in active if not rows[i].finished(stops, cfg, tokenizer)]
        for i in set(active) - set(still):
            results[i] = _finish(rows[i], tokenizer, cfg, t0)
        if not still:
            break
        if len(still) < len(active):
            fwd.select([active.index(i) for i in still])
            active = still
        act = [rows[i] for i in active]
        # Step 2: each row proposes its own draft (possibly empty), capped by its budget.
        for r in act:
            r.draft, r.probs = _NO_DRAFT
            if r.proposer is not None:
                tp = time.perf_counter()
                d, p = r.proposer.propose(r.ctx[: r.n_ctx])
                r.draft = d[: max(cfg.max_new_tokens - len(r.out) - 1, 0)]
                r.probs = p[: len(r.draft)]
                r.stats.propose_s += time.perf_counter() - tp
        # Step 3: one pass over (B, 1 + k_max): last token + draft, right-padded with masked
        # slots; positions continue each row's own sequence (n_ctx - 1 is the last token's).
        n = 1 + max(len(r.draft) for r in act)
        ids = torch.full((len(act), n), pad, dtype=torch.long)
        m = torch.zeros((len(act), n), dtype=torch.long)
        for b, r in enumerate(act):
            ids[b, : 1 + len(r.draft)] = torch.as_tensor([r.out[-1], *r.draft.tolist()])
            m[b, : 1 + len(r.draft)] = 1
        pos = torch.as_tensor([r.n_ctx - 1 for r in act])[:, None] + torch.arange(n)[None, :]
        logits = fwd(ids.to(dev), m.to(dev), pos.to(dev), keep=n)
        # Step 4: per row, accept the longest agreeing prefix plus the model's next token.
        verdicts = []
        for b, r in enumerate(act):
            r.stats.forward_passes += 1
            verdicts.append(verify_draft(logits[b, : 1 + len(r.draft)], r.draft, cfg.temperature, r.gen))
        # Step 5: row b keeps its last token and a_b accepted drafts (1 + a_b slots); its
        # rejected and pad slots become masked holes; slots no row kept are cropped.
        fwd.keep_slots(n, torch.as_tensor([1 + a for a, _ in verdicts], device=dev))
        # Step 6: feed back, then emit; an EOS inside the accepted run ends the request there
        # (step 1 drops it); a stop string ends it at the token that completes it.
        for r, (a, tok) in zip(act, verdicts, strict=True):
            if len(r.draft):
                r.stats.draft_steps += 1
                r.stats.drafted += len(r.draft)
                r.stats.accepted += a
                r.proposer.update(r.probs, a)
            r.stopped = r.emit([*r.draft[:a].tolist(), tok], stops, cfg, tokenizer)
    return results  # type: ignore[return-value]


def _decode_together(backend: Backend, tokenizer, prompt_ids: Sequence[Sequence[int]],
                     proposers: Sequence[Proposer | None], cfg: DecodeConfig, t0: float) -> list[Output]:
    """decode_batch on the fused step: each request keeps its own KV cache and runs
    engine.decode's own steps (engine.Request); one forward pass a round carries every
    unfinished request's rows (tasc.accel.backend.argmax_together), which share each weight
    read. So each request's tokens are bitwise engine.decode's, with no holes, pads or masks."""
    requests = [Request(backend, tokenizer, list(ids), p, cfg) for ids, p in zip(prompt_ids, proposers, strict=True)]
    for r in requests:
        r.t0 = t0  # latency runs from the batch's start
    outputs: list[Output | None] = [None] * len(requests)
    active = list(range(len(requests)))
    while active:
        batch = []
        for b in active:
            ids = requests[b].next_pass()
            if ids is None:
                outputs[b] = requests[b].finish()
            else:
                batch.append((b, ids))
        active = [b for b, _ in batch]
        if batch:
            preds = argmax_together([(requests[b].steps, ids, len(requests[b].draft) + 1) for b, ids in batch])
            for (b, _), pred in zip(batch, preds, strict=True):
                requests[b].take(*accept_greedy(pred, requests[b].draft))
    return outputs  # type: ignore[return-value]


def generate_batch(
    model,
    tokenizer,
    prompts: Sequence[Row],
    draft: BoundDraft | None = None,
    method: str = "tasc-spec",
    config: DecodeConfig | None = None,
    batch_size: int = 4,
    system_prompt: str | None = None,
    chat_template: bool = True,
    proposer_config: ProposerConfig | None = None,
    cost: Sequence[float] | None = None,
) -> list[Output]:
    """engine.generate in batches of ``batch_size``: one Output per prompt, in input order.

    Prompts are grouped by token length (sorted, stable) so that a batch pads little; each
    request gets its own Proposer for "tasc-spec", none for "greedy"."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}")
    cfg = config or DecodeConfig()
    ids = encode_prompts(tokenizer, prompts, system_prompt, chat_template)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    results: list[Output | None] = [None] * len(ids)
    trust = new_trust()  # all proposers of this call share their calibration
    for s in range(0, len(order), batch_size):
        group = order[s : s + batch_size]
        props = [Proposer(draft, proposer_config, cost, trust) for _ in group] if method == "tasc-spec" else None
        for i, out in zip(group, decode_batch(model, tokenizer, [ids[i] for i in group], props, cfg), strict=True):
            results[i] = out
    return results  # type: ignore[return-value]
