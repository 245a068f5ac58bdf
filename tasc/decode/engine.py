"""Decoding with a KV cache: plain greedy, and speculative decoding with an n-gram draft.

``generate(model, tokenizer, prompts, draft=..., method=...)`` is the one API that the
benchmark, the CLI and the registry model call. Greedy speculative decoding is lossless:
it emits exactly the tokens plain greedy decoding emits with the same kernels and dtype,
since every emitted token is the model's own argmax given the accepted prefix. With a
temperature, drafts are accepted by the rule that preserves the model's distribution
(a draft token d is kept with probability p(d); on rejection the token is drawn from p
with d removed).

The forward passes go through a tasc.accel.backend step object (prefill, k-token step, argmax,
crop), so this module holds the algorithm only; which kernels run is the backend's business.
Every entry point takes the backend (``LoadedModel.backend``) or a plain torch model.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from tasc.accel.backend import Backend, Steps
from tasc.data.prompts import Row, encode_prompts
from tasc.decode.draft import BoundDraft
from tasc.decode.proposer import Proposer, ProposerConfig, new_trust

METHODS = ("greedy", "tasc-spec")
_NO_DRAFT = np.empty(0, dtype=np.int64)


@dataclass
class DecodeConfig:
    max_new_tokens: int = 128
    stop: tuple[str, ...] = ()
    temperature: float = 0.0  # 0 = greedy
    seed: int = 0
    # A prompt starts from the stored KV rows of the longest prefix it shares with a recent
    # prompt, where that is lossless (tasc.accel.prefix); benchmarks turn it off to time prefills.
    prefix_cache: bool = True

    def __post_init__(self):
        # decode() sizes its buffers by max_new_tokens: a huge or negative one must not get that far.
        n = self.max_new_tokens
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"max_new_tokens must be a whole number >= 1; got {n!r}")


@dataclass
class RequestStats:
    prompt_tokens: int = 0
    reused_prompt_tokens: int = 0  # prompt tokens whose KV rows came from an earlier prompt
    new_tokens: int = 0
    chars: int = 0
    forward_passes: int = 0
    drafted: int = 0  # draft tokens sent to verification
    accepted: int = 0  # draft tokens accepted
    draft_steps: int = 0  # verify steps that carried a draft
    latency_s: float = 0.0
    first_token_s: float = 0.0  # the prompt's pass: time to the first token (0: not known)
    propose_s: float = 0.0  # time spent building drafts

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Output:
    text: str
    token_ids: list[int]
    stats: RequestStats = field(default_factory=RequestStats)


def eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    for src in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(src, int):
            ids.add(src)
        elif src:
            ids.update(int(i) for i in src)
    return ids


def first_stop(tokenizer, ids: list[int], start: int, stop: tuple[str, ...]) -> int | None:
    """Smallest t > start such that ids[:t] decodes to a text containing a stop string."""
    for t in range(start + 1, len(ids) + 1):
        text = tokenizer.decode(ids[:t], skip_special_tokens=True)
        if any(s in text for s in stop):
            return t
    return None


def cut_at_stop(text: str, stop: tuple[str, ...]) -> str:
    cuts = [text.index(s) for s in stop if s in text]
    return text[: min(cuts)] if cuts else text


def accept_greedy(pred: Sequence[int], draft: np.ndarray) -> tuple[int, int]:
    """pred: the model's greedy token after the last token and after each draft token (k+1);
    returns (n_accepted, next token): the agreeing prefix and the model's own token after it."""
    n, k = 0, len(draft)
    while n < k and pred[n] == int(draft[n]):
        n += 1
    return n, int(pred[n])


def verify_draft(logits: torch.Tensor, draft: np.ndarray, temperature: float, gen: torch.Generator | None) -> tuple[int, int]:
    """Accept a prefix of ``draft`` against logits (k+1, V); returns (n_accepted, next token)."""
    k = len(draft)
    if temperature <= 0:
        return accept_greedy(logits.argmax(dim=-1).tolist(), draft)
    probs = torch.softmax(logits / temperature, dim=-1)
    for i in range(k):
        d = int(draft[i])
        if torch.rand((), generator=gen).item() < probs[i, d].item():
            continue
        residual = probs[i].clone()
        residual[d] = 0.0
        return i, int(torch.multinomial(residual / residual.sum(), 1, generator=gen).item())
    return k, int(torch.multinomial(probs[k], 1, generator=gen).item())


def verify_step(steps: Steps, ids: list[int], draft: np.ndarray, temperature: float,
                gen: torch.Generator | None) -> tuple[int, int]:
    """One forward pass over ``ids`` (the last token then ``draft``, or the prompt with an empty
    draft) and the verdict on the draft: (n_accepted, next token). Greedy needs only the argmax,
    which the exact argmax head gives without computing most of the logits."""
    keep = len(draft) + 1
    if temperature <= 0:
        return accept_greedy(steps.argmax(ids, keep), draft)
    return verify_draft(steps.step(ids, keep), draft, temperature, gen)


@torch.inference_mode()
def decode(model, tokenizer, prompt_ids: list[int], proposer: Proposer | None, cfg: DecodeConfig) -> Output:
    """Decode one request: propose a draft, verify it in one forward pass, keep the agreeing
    prefix and the model's own next token. proposer=None gives plain greedy (or plain sampling).

    model: a tasc.accel.backend.Backend (``LoadedModel.backend``) or a torch model, whose
    backend ``Backend.for_model`` finds."""
    with paused_gc():
        request = Request(Backend.for_model(model), tokenizer, prompt_ids, proposer, cfg)
        while (ids := request.next_pass()) is not None:
            # Steps 3-4: one forward pass over [last token, draft...] verifies the whole draft.
            request.take(*verify_step(request.steps, ids, request.draft, cfg.temperature, request.gen))
        return request.finish()


@contextmanager
def paused_gc():
    """Python's cyclic garbage collector off for the block: a decode loop allocates small
    acyclic objects at every step, and the collections they trigger walk the model's objects
    (a few percent of a step); reference counting still frees them."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class Request:
    """One request between its forward passes: :meth:`next_pass` (steps 1-2) says what the next
    pass feeds, :meth:`take` (steps 5-6) applies its verdict. :func:`decode` drives one request;
    tasc.decode.batch_engine drives several through shared passes, with the same steps."""

    def __init__(self, backend: Backend, tokenizer, prompt_ids: list[int], proposer: Proposer | None,
                 cfg: DecodeConfig):
        self.t0 = time.perf_counter()
        self.tokenizer, self.proposer, self.cfg = tokenizer, proposer, cfg
        self.prompt_ids = prompt_ids
        self.steps = backend.start(cfg.prefix_cache)
        self.stats = RequestStats(prompt_tokens=len(prompt_ids))
        self.stops = eos_ids(backend.model, tokenizer)
        self.gen = torch.Generator().manual_seed(cfg.seed) if cfg.temperature > 0 else None
        self.out: list[int] = []
        self.draft, self.probs = _NO_DRAFT, _NO_DRAFT
        self.ctx = np.empty(len(prompt_ids) + cfg.max_new_tokens + 64, dtype=np.int64)
        self.ctx[: len(prompt_ids)] = prompt_ids
        self.n_ctx = len(prompt_ids)
        self.done = False

    def next_pass(self) -> list[int] | None:
        """The ids of the next forward pass (the prompt first; then the last token and a draft,
        whose verdict covers ``len(self.draft) + 1`` positions), or None once the request ends."""
        cfg, out = self.cfg, self.out
        self.draft = self.probs = _NO_DRAFT
        if self.done:
            return None
        if not out:  # Step 0: prefill the prompt; only the last position's prediction is needed.
            return self.prompt_ids
        # Step 1: stop at EOS, the token budget or a stop string (checked on the new tokens only).
        if out[-1] in self.stops:
            out.pop()
            self.done = True
        elif len(out) >= cfg.max_new_tokens:
            del out[cfg.max_new_tokens:]
            self.done = True
        elif cfg.stop and first_stop(self.tokenizer, out, len(out) - 1, cfg.stop) is not None:
            self.done = True
        if self.done:
            return None
        # Step 2: propose a draft (possibly empty) from the task and context n-grams.
        if self.proposer is not None:
            tp = time.perf_counter()
            draft, probs = self.proposer.propose(self.ctx[: self.n_ctx])
            self.draft = draft[: max(cfg.max_new_tokens - len(out) - 1, 0)]
            self.probs = probs[: len(self.draft)]
            self.stats.propose_s += time.perf_counter() - tp
        return [out[-1], *self.draft.tolist()]

    def take(self, n_acc: int, tok: int) -> None:
        """The pass's verdict: ``n_acc`` draft tokens accepted, then the model's own ``tok``."""
        cfg, out, draft = self.cfg, self.out, self.draft
        new = [*draft[:n_acc].tolist(), tok]
        if not out:
            self.stats.first_token_s = time.perf_counter() - self.t0
        else:
            # Step 5: roll the KV cache back over the rejected draft tokens.
            self.steps.crop(len(draft) - n_acc)
            if len(draft):
                self.stats.draft_steps += 1
                self.stats.drafted += len(draft)
                self.stats.accepted += n_acc
                self.proposer.update(self.probs, n_acc)
        # Step 6: emit; an EOS inside the accepted run ends the request right there.
        start = len(out)
        for t in new:
            out.append(t)
            if t in self.stops or len(out) >= cfg.max_new_tokens:
                break
        if cfg.stop and start:
            hit = first_stop(self.tokenizer, out, start, cfg.stop)
            if hit is not None:
                del out[hit:]
                self.done = True
                return
        self.ctx[self.n_ctx : self.n_ctx + len(new)] = new
        self.n_ctx += len(new)

    def finish(self) -> Output:
        self.stats.forward_passes = self.steps.passes
        self.stats.reused_prompt_tokens = self.steps.reused
        return _finish(self.tokenizer, self.out, self.stats, self.cfg, self.t0)


def _finish(tokenizer, out: list[int], stats: RequestStats, cfg: DecodeConfig, t0: float) -> Output:
    text = tokenizer.decode(out, skip_special_tokens=True)
    if cfg.stop:
        text = cut_at_stop(text, cfg.stop)
    stats.new_tokens = len(out)
    stats.chars = len(text)
    stats.latency_s = time.perf_counter() - t0
    return Output(text=text, token_ids=out, stats=stats)


def context_length(model) -> int | None:
    """The most tokens (prompt and new ones) the model's positions cover, from its config;
    None when the config does not say. ``model``: a Backend or a torch model."""
    config = getattr(Backend.for_model(model).model, "config", None)
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_fits(prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, context: int | None) -> None:
    """Every prompt plus ``max_new_tokens`` fits the model's ``context`` (None: no limit known).

    Past it the positions are ones the model never saw, and the time and memory grow with the
    prompt; a ValueError naming the prompt's index and the limit says what to shorten."""
    if context is None:
        return
    if max_new_tokens >= context:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's context of "
                         f"{context} tokens; ask for at most {context - 1}")
    for i, ids in enumerate(prompt_ids):
        if len(ids) + max_new_tokens > context:
            raise ValueError(f"prompt {i} is {len(ids)} tokens; with max_new_tokens={max_new_tokens} that exceeds the "
                             f"model's context of {context} tokens: shorten it to at most "
                             f"{context - max_new_tokens} tokens or lower max_new_tokens")


def generate(
    model,
    tokenizer,
    prompts: Sequence[Row],
    draft: BoundDraft | None = None,
    method: str = "tasc-spec",
    config: DecodeConfig | None = None,
    system_prompt: str | None = None,
    chat_template: bool = True,
    proposer_config: ProposerConfig | None = None,
    cost: Sequence[float] | None = None,
) -> list[Output]:
    """Generate one completion per prompt: a plain string or a corpus row, whose ``system``
    and ``messages`` columns are honoured (tasc.data.prompts).

    method "greedy" decodes plainly; "tasc-spec" drafts from ``draft`` (task n-grams; may be
    None for context n-grams only) and verifies. ``cost`` is the verify-cost table from
    ``measure_verify_cost`` (default: measured on first use is the caller's job; without it,
    every length is assumed to cost one step, which favours long drafts)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    cfg = config or DecodeConfig()
    backend = Backend.for_model(model)
    encoded = encode_prompts(tokenizer, prompts, system_prompt, chat_template)
    check_fits(encoded, cfg.max_new_tokens, context_length(backend))  # all of them, before any work
    results, trust = [], new_trust()  # the prompts' proposers share their calibration
    for ids in encoded:
        proposer = Proposer(draft, proposer_config, cost, trust) if method == "tasc-spec" else None
        results.append(decode(backend, tokenizer, ids, proposer, cfg))
    return results


@torch.inference_mode()
def measure_verify_cost(model, max_len: int = 17, context: int = 160, reps: int = 9) -> np.ndarray:
    """Relative cost of an m-token forward pass, cost[m] = time(m) / time(1), m = 0..max_len.

    float64 (max_len + 1,); cost[0] = 0. Measured after a prefill of ``context`` tokens, with
    the fastest of ``reps`` runs per length (interference only ever adds time), interleaved so
    drift hits all lengths alike. A k-token pass is capped at the cost of k one-token passes,
    so one stalled measurement cannot switch drafting off."""
    backend = Backend.for_model(model)
    steps = backend.start(reuse_prefix=False)
    vocab = backend.model.get_input_embeddings().weight.shape[0]
    rng = np.random.default_rng(0)
    steps.prefill(rng.integers(0, vocab, context).tolist())
    lengths = sorted({1, 2, 3, 4, 6, 8, 12, max_len} & set(range(1, max_len + 1)))
    times: dict[int, list[float]] = {m: [] for m in lengths}
    for _ in range(reps + 1):
        for m in lengths:
            ids = rng.integers(0, vocab, m).tolist()
            t = time.perf_counter()
            steps.argmax(ids, keep=m)  # the greedy path decode takes
            times[m].append(time.perf_counter() - t)
            steps.crop(m)
    best = np.array([np.min(times[m][1:]) for m in lengths])
    cost = np.interp(np.arange(max_len + 1), lengths, best / best[0])
    cost = np.minimum(np.maximum.accumulate(cost), np.arange(max_len + 1, dtype=np.float64))
    cost[0] = 0.0
    cost[1] = 1.0
    return cost
