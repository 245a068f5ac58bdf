"""Decoding with a KV cache: plain greedy, and speculative decoding with an n-gram draft.

``generate(model, tokenizer, prompts, draft=..., method=...)`` is the one API that the
benchmark, the CLI and the registry model call. Greedy speculative decoding is lossless:
it emits exactly the tokens plain greedy decoding emits with the same kernels and dtype,
since every emitted token is the model's own argmax given the accepted prefix. With a
temperature, drafts are accepted by the rule that preserves the model's distribution
(a draft token d is kept with probability p(d); on rejection the token is drawn from p
with d removed).
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from tasc.decode.draft import BoundDraft
from tasc.decode.proposer import Proposer, ProposerConfig, new_trust

METHODS = ("greedy", "tasc-spec")


@dataclass
class DecodeConfig:
    max_new_tokens: int = 128
    stop: tuple[str, ...] = ()
    temperature: float = 0.0  # 0 = greedy
    seed: int = 0


@dataclass
class RequestStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    chars: int = 0
    forward_passes: int = 0
    drafted: int = 0  # draft tokens sent to verification
    accepted: int = 0  # draft tokens accepted
    draft_steps: int = 0  # verify steps that carried a draft
    latency_s: float = 0.0
    propose_s: float = 0.0  # time spent building drafts

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Output:
    text: str
    token_ids: list[int]
    stats: RequestStats = field(default_factory=RequestStats)


def render_prompt(tokenizer, prompt: str, system_prompt: str | None = None, chat_template: bool = True) -> str:
    """The exact text fed to the model: the chat template with a generation prompt, or the raw prompt."""
    if not chat_template or not getattr(tokenizer, "chat_template", None):
        return prompt
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": prompt}
    ]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    for src in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(src, int):
            ids.add(src)
        elif src:
            ids.update(int(i) for i in src)
    return ids


class _Forward:
    """One call site for the model's forward that counts passes and hides the cache kwarg name.

    Runs tasc.accel.lean_decoder where speed_up attached one (same hidden states bitwise, a cache of
    preallocated buffers), else the model's own forward with a DynamicCache."""

    def __init__(self, model):
        self.model = model
        self.passes = 0
        # tasc.accel.argmax_head.ArgmaxHead / tasc.accel.lean_decoder.LeanDecoder where
        # load_model(kernels="auto") attached them.
        self.head = getattr(model, "_tasc_argmax_head", None)
        self.lean = getattr(model, "_tasc_lean", None)
        if self.lean is not None:
            self.lean.refresh()  # weights may have changed since the last request
            self.cache = self.lean.new_cache()
            return
        from transformers import DynamicCache

        self.cache = DynamicCache(config=model.config)
        params = inspect.signature(model.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        if self.head is not None:
            params = inspect.signature(model.base_model.forward).parameters
            self.base_cache_kw = "cache" if "cache" in params else "past_key_values"

    @torch.inference_mode()
    def __call__(self, ids: Sequence[int], keep: int) -> torch.Tensor:
        """ids: the new tokens; returns float logits (keep, V) of the last ``keep`` positions."""
        self.passes += 1
        if self.lean is not None:
            hidden = self.lean.forward(list(ids), self.cache)
            return self.model.get_output_embeddings()(hidden[-keep:]).float()
        x = torch.as_tensor([list(ids)], dtype=torch.long, device=self.model.device)
        kw = {self.cache_kw: self.cache}
        out = self.model(input_ids=x, use_cache=True, logits_to_keep=keep, **kw)
        return out.logits[0, -keep:].float()

    @torch.inference_mode()
    def predict(self, ids: Sequence[int], keep: int) -> list[int]:
        """ids: the new tokens; returns the greedy next token after each of the last ``keep``.

        With an exact argmax head, the decoder stack runs without the LM head and the head
        picks the argmax from its int8 screen (the same ids as the argmax of the logits)."""
        if self.head is None or keep > self.head.max_rows:
            return self(ids, keep).argmax(dim=-1).tolist()
        self.passes += 1
        if self.lean is not None:
            hidden = self.lean.forward(list(ids), self.cache)[-keep:]
        else:
            x = torch.as_tensor([list(ids)], dtype=torch.long, device=self.model.device)
            out = self.model.base_model(input_ids=x, use_cache=True, **{self.base_cache_kw: self.cache})
            hidden = out.last_hidden_state[0, -keep:]
        return self.head(hidden.numpy()).tolist()

    def crop(self, n_remove: int) -> None:
        if n_remove > 0:
            self.cache.crop(-n_remove)


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


@torch.inference_mode()
def decode(model, tokenizer, prompt_ids: list[int], proposer: Proposer | None, cfg: DecodeConfig) -> Output:
    """Decode one request. proposer=None gives plain greedy (or plain sampling)."""
    t0 = time.perf_counter()
    stats = RequestStats(prompt_tokens=len(prompt_ids))
    stops, gen = eos_ids(model, tokenizer), None
    if cfg.temperature > 0:
        gen = torch.Generator().manual_seed(cfg.seed)
    fwd = _Forward(model)
    greedy = cfg.temperature <= 0

    def verify(ids: list[int], draft: np.ndarray) -> tuple[int, int]:
        if greedy:  # argmax only: the exact argmax head can skip most of the logits
            return accept_greedy(fwd.predict(ids, keep=len(draft) + 1), draft)
        return verify_draft(fwd(ids, keep=len(draft) + 1), draft, cfg.temperature, gen)

    # Step 0: prefill the prompt; only the last position's logits are needed.
    _, tok = verify(prompt_ids, np.empty(0, dtype=np.int64))
    out: list[int] = [tok]
    ctx = np.empty(len(prompt_ids) + cfg.max_new_tokens + 64, dtype=np.int64)
    ctx[: len(prompt_ids)] = prompt_ids
    ctx[len(prompt_ids)] = tok
    n_ctx = len(prompt_ids) + 1
    while True:
        # Step 1: stop at EOS, the token budget or a stop string (checked on the new tokens only).
        if out[-1] in stops:
            out.pop()
            break
        if len(out) >= cfg.max_new_tokens:
            out = out[: cfg.max_new_tokens]
            break
        if cfg.stop and first_stop(tokenizer, out, len(out) - 1, cfg.stop) is not None:
            break
        # Step 2: propose a draft (possibly empty) from the task and context n-grams.
        draft = probs = np.empty(0, dtype=np.int64)
        if proposer is not None:
            tp = time.perf_counter()
            draft, probs = proposer.propose(ctx[:n_ctx])
            draft = draft[: max(cfg.max_new_tokens - len(out) - 1, 0)]
            probs = probs[: len(draft)]
            stats.propose_s += time.perf_counter() - tp
        # Steps 3-4: one forward pass over [last token, draft...] verifies the whole draft;
        # accept the longest agreeing prefix plus the model's own next token.
        n_acc, tok = verify([out[-1], *draft.tolist()], draft)
        new = [*draft[:n_acc].tolist(), tok]
        # Step 5: roll the KV cache back over the rejected draft tokens.
        fwd.crop(len(draft) - n_acc)
        if len(draft):
            stats.draft_steps += 1
            stats.drafted += len(draft)
            stats.accepted += n_acc
            proposer.update(probs, n_acc)
        # Step 6: emit; an EOS inside the accepted run ends the request right there.
        for t in new:
            out.append(t)
            if t in stops or len(out) >= cfg.max_new_tokens:
                break
        if cfg.stop:
            hit = first_stop(tokenizer, out, len(out) - len(new), cfg.stop)
            if hit is not None:
                out = out[:hit]
                break
        ctx[n_ctx : n_ctx + len(new)] = new
        n_ctx += len(new)
    text = tokenizer.decode(out, skip_special_tokens=True)
    if cfg.stop:
        text = cut_at_stop(text, cfg.stop)
    stats.new_tokens = len(out)
    stats.chars = len(text)
    stats.forward_passes = fwd.passes
    stats.latency_s = time.perf_counter() - t0
    return Output(text=text, token_ids=out, stats=stats)


def encode_prompts(tokenizer, prompts: Sequence[str], system_prompt: str | None, chat_template: bool) -> list[list[int]]:
    texts = [render_prompt(tokenizer, p, system_prompt, chat_template) for p in prompts]
    # The chat template already holds any special tokens the model expects.
    add_special = not (chat_template and getattr(tokenizer, "chat_template", None))
    return tokenizer(texts, add_special_tokens=add_special)["input_ids"]


def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    draft: BoundDraft | None = None,
    method: str = "tasc-spec",
    config: DecodeConfig | None = None,
    system_prompt: str | None = None,
    chat_template: bool = True,
    proposer_config: ProposerConfig | None = None,
    cost: Sequence[float] | None = None,
) -> list[Output]:
    """Generate one completion per prompt.

    method "greedy" decodes plainly; "tasc-spec" drafts from ``draft`` (task n-grams; may be
    None for context n-grams only) and verifies. ``cost`` is the verify-cost table from
    ``measure_verify_cost`` (default: measured on first use is the caller's job; without it,
    every length is assumed to cost one step, which favours long drafts)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    cfg = config or DecodeConfig()
    results, trust = [], new_trust()  # the prompts' proposers share their calibration
    for ids in encode_prompts(tokenizer, prompts, system_prompt, chat_template):
        proposer = Proposer(draft, proposer_config, cost, trust) if method == "tasc-spec" else None
        results.append(decode(model, tokenizer, ids, proposer, cfg))
    return results


@torch.inference_mode()
def measure_verify_cost(model, max_len: int = 17, context: int = 160, reps: int = 9) -> np.ndarray:
    """Relative cost of an m-token forward pass, cost[m] = time(m) / time(1), m = 0..max_len.

    float64 (max_len + 1,); cost[0] = 0. Measured after a prefill of ``context`` tokens, with
    the fastest of ``reps`` runs per length (interference only ever adds time), interleaved so
    drift hits all lengths alike. A k-token pass is capped at the cost of k one-token passes,
    so one stalled measurement cannot switch drafting off."""
    fwd = _Forward(model)
    vocab = model.get_input_embeddings().weight.shape[0]
    rng = np.random.default_rng(0)
    fwd(rng.integers(0, vocab, context).tolist(), keep=1)
    lengths = sorted({1, 2, 3, 4, 6, 8, 12, max_len} & set(range(1, max_len + 1)))
    times: dict[int, list[float]] = {m: [] for m in lengths}
    for _ in range(reps + 1):
        for m in lengths:
            ids = rng.integers(0, vocab, m).tolist()
            t = time.perf_counter()
            fwd.predict(ids, keep=m)  # the greedy path decode takes
            times[m].append(time.perf_counter() - t)
            fwd.crop(m)
    best = np.array([np.min(times[m][1:]) for m in lengths])
    cost = np.interp(np.arange(max_len + 1), lengths, best / best[0])
    cost = np.minimum(np.maximum.accumulate(cost), np.arange(max_len + 1, dtype=np.float64))
    cost[0] = 0.0
    cost[1] = 1.0
    return cost
