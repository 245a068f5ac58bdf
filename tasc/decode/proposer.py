"""Draft proposals for speculative decoding: task n-grams mixed with context n-grams,
gated by confidence and by what a verify step costs.

``Proposer.propose(context)`` returns ``(tokens int64 (k,), probs float64 (k,))``; an empty
pair means "no draft: take a plain one-token step". Three gates decide k:

1. confidence: drafting stops once the estimated probability that the whole chunk is
   accepted falls below ``min_prob`` (as SuffixDecoding does), and at ``max_len``;
2. cost: with ``cost[k]`` = time of a k-token forward / time of a one-token forward, k is
   chosen to maximise expected tokens per unit of time, (1 + sum_i prod_{j<=i} p_j) /
   cost[k + 1]; no draft is proposed unless that beats a plain step. On CPUs a multi-token
   verify costs noticeably more than one token, so a weak draft would be a net loss;
3. calibration: the realised acceptance feeds back into a running factor on the estimates,
   one per source (task corpus, context, folded context), so an over-confident source is trusted less as
   decoding goes on and a reliable one (a passage the answer copies from) more. The factors
   are shared by all requests of one ``generate`` call or benchmark method (``trust=``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tasc.accel import draft_kernels
from tasc.decode.draft import CONTEXT_LEVELS, SEP, BoundDraft, walk_continuations

_EMPTY = (np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float64))


@dataclass
class ProposerConfig:
    max_len: int = 16  # longest draft
    min_prob: float = 0.15  # stop when P(all accepted so far) drops below this
    use_context: bool = True  # mix in n-grams of the prompt and the text generated so far
    use_corpus: bool = True
    context_prior: float = 0.5  # shrinkage for context-match estimates (few rows)
    # Shortest context suffix matched (tasc.decode.draft.CONTEXT_LEVELS down to this). A one-token match still drafts:
    # after the first token of a span the answer copies from the prompt, only that token
    # matches, and the walk's agreement estimate keeps weak one-token drafts short.
    context_min_n: int = 1
    # Scale that shrinkage by n / span, where span is how far back the most recent occurrence
    # matches the context's end (n..64 tokens): a long match means the text is being copied.
    context_span: bool = True
    corpus_prior: float = 1.0
    # Match context words with and without their leading space as one (the bound draft's
    # match_keys, tasc.decode.draft.space_fold_keys): outputs copy prompt words right after a quote
    # or at their start, where the tokenizer spells them without the space.
    context_fold_spaces: bool = True


def expected_tokens(probs: np.ndarray) -> np.ndarray:
    """float64 (k+1,): expected tokens produced by verifying the first i draft tokens, i = 0..k
    (the model's own next token is always gained, hence the leading 1)."""
    return 1.0 + np.concatenate([[0.0], np.cumsum(np.cumprod(probs))])


def best_length(probs: np.ndarray, cost: np.ndarray) -> int:
    """The draft length maximising expected tokens per unit of verify cost.

    probs float64 (k,); cost float64 (K+1,) with cost[m] the relative cost of an m-token
    forward (cost[1] == 1). Returns 0 when no draft beats a plain step."""
    return _best_length(np.cumprod(probs), cost)


def _best_length(chain: np.ndarray, cost: np.ndarray) -> int:
    """best_length from chain = cumprod(probs), which propose has at hand already."""
    k = min(len(chain), len(cost) - 2)
    if k <= 0:
        return 0
    gain = np.empty(k + 1)  # expected tokens of verifying the first i draft tokens, i = 0..k
    gain[0] = 1.0
    np.cumsum(chain[:k], out=gain[1:])
    gain[1:] += 1.0
    return int(np.argmax(gain / cost[1 : k + 2]))  # index 0 is the plain step (gain 1 / cost[1] == 1)


def new_trust() -> dict[str, float]:
    """Fresh calibration factors, one per draft source (1.0: take the estimates as they are)."""
    return {"corpus": 1.0, "context": 1.0, "fold": 1.0}


class Proposer:
    """Thin stateful wrapper over the draft kernels: one per generation request."""

    def __init__(self, draft: BoundDraft | None, config: ProposerConfig | None = None, cost: Sequence[float] | None = None,
                 trust: dict[str, float] | None = None):
        """trust: the calibration factors per source, shared by the proposers of one run
        (:func:`new_trust`) so that what one request learns about the task's drafts (say,
        that answers copy the passage) carries to the next; None starts afresh."""
        self.draft = draft
        self.config = config or ProposerConfig()
        n = self.config.max_len + 2
        self.cost = np.asarray(cost if cost is not None else np.ones(n), dtype=np.float64)
        if len(self.cost) < n:  # extrapolate linearly past the calibrated lengths
            last, slope = self.cost[-1], max(self.cost[-1] - self.cost[-2], 0.0) if len(self.cost) > 2 else 0.0
            extra = last + slope * np.arange(1, n - len(self.cost) + 1)
            self.cost = np.concatenate([self.cost, extra])
        # Running calibration factors on the probability estimates, one per source.
        self.trust = trust if trust is not None else new_trust()
        self._source = "corpus"  # the source of the last proposal
        # Context n-gram index, kept incrementally: the context only grows during a request.
        self._ctx: list[int] = []  # the context's ids and their match keys (context_fold_spaces)
        self._keys: list[int] = []
        self._fold = draft.match_keys if draft is not None and self.config.context_fold_spaces else None
        self._levels = np.array([n for n in CONTEXT_LEVELS if n >= self.config.context_min_n], dtype=np.int32)
        self._ctx_index: dict[int, dict[tuple, list[int]]] = {int(n): {} for n in self._levels}
        self._fold_index: dict[int, dict[tuple, list[int]]] = {int(n): {} for n in self._levels}
        self._span = 0  # match length of the last context lookup (see ProposerConfig.context_span)
        self._scratch = draft_kernels.Scratch(self.config.max_len)  # the compiled path's buffers
        self.proposed = 0
        self.accepted = 0

    def propose(self, context: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """context: int64 (L,) the prompt and the tokens generated so far."""
        cfg = self.config
        best = _EMPTY
        best_value = 0.0
        use_corpus = cfg.use_corpus and self.draft is not None and self.draft.num_tokens
        context = np.ascontiguousarray(context, dtype=np.int64)
        sources = []
        if use_corpus:
            sources.append(("corpus", self.draft.propose(context, cfg.max_len, cfg.corpus_prior, self._scratch)))
        if cfg.use_context:
            sources.append(self._context_draft(context))
        chain = None  # cumulative product of the chosen probs: P(first i all accepted)
        for name, (toks, probs) in sources:
            if not len(toks):
                continue
            probs = np.minimum(probs * self.trust[name], 0.99)
            cum = np.cumprod(probs)
            value = 1.0 + float(cum.sum())  # expected tokens of the whole chunk
            if value > best_value:
                best, best_value, chain, self._source = (toks, probs), value, cum, name
        toks, probs = best
        if chain is None:
            return _EMPTY
        keep = int(np.searchsorted(-chain, -cfg.min_prob, side="right"))
        k = _best_length(chain[:keep], self.cost)
        return toks[:k], probs[:k]

    def _match_keys(self, context: np.ndarray) -> np.ndarray:
        """int64 (L,): the folded match keys of ``context`` (self._fold is set)."""
        fold = self._fold
        if len(context) and int(context.max()) >= len(fold):  # ids past the tokenizer: kept as they are
            self._fold = fold = np.concatenate([fold, np.arange(len(fold), int(context.max()) + 1)])
        return fold[context]

    def _context_draft(self, context: np.ndarray) -> tuple[str, tuple[np.ndarray, np.ndarray]]:
        """(source, (tokens, probs)): the walk over the context rows, the ids matched as they are
        ("context") and, only when those match nothing, as their folded keys ("fold"). Compiled,
        one scan of the whole context per pass; else the incremental index of _context_rows
        (the same rows)."""
        cfg = self.config
        if draft_kernels.library() is None:
            name, rows, n = self._context_rows(context)
            prior = cfg.context_prior * (n / self._span if cfg.context_span and self._span else 1.0)
            return name, walk_continuations(rows, cfg.max_len, prior=prior)
        name, k = "context", 0
        for source in ("context", "fold") if self._fold is not None else ("context",):
            keys = context if source == "context" else self._match_keys(context)  # folded only when needed
            k, self._span = draft_kernels.context_draft(context, keys, self._levels, 16, cfg.context_prior,
                                                        cfg.context_span, self._scratch)
            if k:  # k == 0 only when no row matched (every row starts with a real token)
                name = source
                break
        return name, self._scratch.result(k)

    def _context_rows(self, context: np.ndarray) -> tuple[str, np.ndarray, int]:
        """Prompt-lookup rows: what followed earlier occurrences of the context's own suffix,
        most recent first (at most 16), from the longest matching level, from n-gram indexes
        kept incrementally (the context only grows during a request). Ids are matched as they
        are ("context"); only when nothing matches, as their folded keys ("fold", when the
        draft has them). Returns (source, rows int64 (R, max_len), n matched). The path without
        the C kernels; ``tasc_context_draft`` in kernels/draft.c is the compiled one (same rows,
        tested against tasc.decode.draft.context_continuations)."""
        start = len(self._ctx)
        new = context[start:]
        self._ctx.extend(new.tolist())
        passes = [("context", self._ctx, self._ctx_index)]
        if self._fold is not None:  # both indexes take every new position, whichever pass answers
            self._keys.extend(self._match_keys(new).tolist())
            passes.append(("fold", self._keys, self._fold_index))
        for _, seq, indexes in passes:
            for n, index in indexes.items():
                for i in range(max(start, n - 1), len(seq)):
                    index.setdefault(tuple(seq[i - n + 1 : i + 1]), []).append(i)
        for name, seq, indexes in passes:
            rows, n = self._lookup(seq, indexes)
            if n:
                return name, rows, n
        return "context", rows, 0

    def _lookup(self, seq: list[int], indexes: dict[int, dict[tuple, list[int]]]) -> tuple[np.ndarray, int]:
        """The rows (of self._ctx) after the most recent occurrences of seq's suffix."""
        L, width = len(seq), self.config.max_len
        for n, index in indexes.items():
            if L <= n:
                continue
            ends = index.get(tuple(seq[L - n :]), ())
            prev = [e for e in ends[-17:] if e < L - 1][::-1][:16]  # the suffix itself is excluded
            if prev:
                e, j = prev[0], n  # how far the most recent occurrence matches the end
                while j < 64 and e - j >= 0 and seq[e - j] == seq[L - 1 - j]:
                    j += 1
                self._span = j
                rows = [self._ctx[e + 1 : e + 1 + width] for e in prev]
                out = np.full((len(rows), width), SEP, dtype=np.int64)
                for r, row in enumerate(rows):
                    out[r, : len(row)] = row
                return out, n
        self._span = 0
        return np.empty((0, width), dtype=np.int64), 0

    def update(self, probs: np.ndarray, n_accepted: int) -> None:
        """Feed back one verify step: the estimates that were used and how many were accepted."""
        if not len(probs):
            return
        expected = expected_tokens(probs)[-1] - 1.0
        self.proposed += len(probs)
        self.accepted += n_accepted
        ratio = (n_accepted + 0.5) / (expected + 0.5)
        t = self.trust[self._source]
        self.trust[self._source] = float(np.clip(0.8 * t + 0.2 * t * ratio, 0.3, 1.5))
