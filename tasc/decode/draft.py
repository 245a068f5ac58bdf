"""The TASC-spec draft: an n-gram model of the task's outputs, stored as text.

Two forms:

* ``DraftCorpus`` is what is stored: the output texts themselves (train completions,
  on-policy generations, or both), with a schema version and the hash of the corpus it
  came from. Text is vocabulary-agnostic: one stored draft serves the base tokenizer, an
  expanded one, or another model family.
* ``BoundDraft`` is that text bound to one tokenizer: every text is tokenised whole (so
  boundaries, leading spaces and byte-level pieces come out exactly as the model emits
  them), followed by the EOS id, and indexed for lookup.

Index contract (``BoundDraft``):

* ``tokens`` int32 (T,): all texts' ids, each text followed by EOS then ``SEP`` (-1).
* for each context length n in ``levels``: ``keys[n]`` uint32 (K_n,) sorted, and
  ``order[n]`` int32 (K_n,): the end positions i of every n-gram ``tokens[i-n+1 .. i]``
  that lies inside one text, sorted by (hash, position). A hash hit is verified against the
  real tokens, so collisions cost time, never correctness.
* memory: 4 + 8 * len(levels) bytes per corpus token (28 with the default levels 1, 2, 4).

A proposal is a pair ``(tokens int64 (k,), probs float64 (k,))``: the draft tokens and the
conditional probability estimated for each; an empty pair means "no draft".
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from tasc.accel import draft_kernels

DRAFT_SCHEMA_VERSION = "1"
SEP = -1
DEFAULT_LEVELS = (1, 2, 4)
CONTEXT_LEVELS = (4, 3, 2, 1)  # context suffix lengths tried for prompt lookup, longest first
_MULT = np.uint64(0x9E3779B97F4A7C15)
_MIX = np.uint64(0xBF58476D1CE4E5B9)


class DraftError(ValueError):
    """A draft that cannot be used with the corpus or code at hand."""


@dataclass(frozen=True)
class DraftCorpus:
    """The stored, vocabulary-agnostic draft: output texts plus provenance."""

    texts: tuple[str, ...]
    source: str  # "references" | "on-policy" | "both"
    corpus_hash: str  # the corpus version the texts came from
    schema_version: str = DRAFT_SCHEMA_VERSION
    meta: dict = field(default_factory=dict)

    def content_hash(self) -> str:
        h = hashlib.sha256()
        for t in self.texts:
            h.update(t.encode("utf-8", "surrogatepass"))
            h.update(b"\0")
        return h.hexdigest()[:16]


def build_draft_corpus(
    references: Sequence[str] = (), on_policy: Sequence[str] = (), corpus_hash: str = "", meta: dict | None = None
) -> DraftCorpus:
    """Combine reference completions and on-policy generations into a stored draft.

    Repeats are kept on purpose: how often an output recurs is what the counts measure."""
    refs = [t for t in references if t]
    gens = [t for t in on_policy if t]
    source = "both" if refs and gens else ("on-policy" if gens else "references")
    return DraftCorpus(texts=tuple(refs + gens), source=source, corpus_hash=corpus_hash, meta=dict(meta or {}))


def check_compatible(draft: DraftCorpus, corpus_hash: str | None) -> None:
    """Fail clearly on a draft of another schema version or built for another corpus."""
    if draft.schema_version != DRAFT_SCHEMA_VERSION:
        raise DraftError(
            f"draft schema version {draft.schema_version!r} is not supported (this tasc reads "
            f"{DRAFT_SCHEMA_VERSION!r}); rebuild it with `tasc draft SPEC`"
        )
    if corpus_hash and draft.corpus_hash and draft.corpus_hash != corpus_hash:
        raise DraftError(
            f"draft was built for corpus {draft.corpus_hash}, not {corpus_hash}; rebuild it with `tasc draft SPEC`"
        )


def hash_windows(tokens: np.ndarray, n: int) -> np.ndarray:
    """uint32 (T-n+1,) hashes of every n-token window of ``tokens`` (int32/int64 (T,)).

    Position j hashes ``tokens[j .. j+n-1]``. The same function hashes a query pattern, so
    index and lookup always agree."""
    t = tokens.astype(np.int64).astype(np.uint64)
    m = len(t) - n + 1
    if m <= 0:
        return np.empty(0, dtype=np.uint32)
    h = np.zeros(m, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(n):
            h = (h ^ t[j : j + m]) * _MULT
        h ^= h >> np.uint64(31)
        h *= _MIX
    return (h >> np.uint64(32)).astype(np.uint32)


_M64 = (1 << 64) - 1


def hash_pattern(pattern: Sequence[int]) -> int:
    """The uint32 hash of one window, as ``hash_windows`` computes it, in plain Python
    (numpy call overhead dominates on a handful of tokens)."""
    h = 0
    mult, mix = int(_MULT), int(_MIX)
    for t in pattern:
        h = ((h ^ (int(t) & _M64)) * mult) & _M64
    h ^= h >> 31
    h = (h * mix) & _M64
    return h >> 32


def walk_continuations(cont: np.ndarray, max_len: int, prior: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Greedy walk down the trie of continuation rows.

    cont: int64 (R, L) candidate continuations, ``SEP`` past a text's end. At each column the
    most frequent token among the rows still agreeing is drafted (ties: the smallest id), with
    probability count / (rows + prior) (the prior shrinks estimates built on few rows).
    Returns (tokens int64 (k,), probs float64 (k,)), k <= max_len. Runs the compiled
    kernels/draft.c where it is available (a few microseconds instead of a few hundred), else
    :func:`walk_continuations_numpy`; both return the same (tested)."""
    if draft_kernels.library() is None or len(cont) > 4096:
        return walk_continuations_numpy(cont, max_len, prior)
    rows = np.ascontiguousarray(cont[:, :max_len], dtype=np.int64)
    toks, probs = np.empty(rows.shape[1], dtype=np.int64), np.empty(rows.shape[1], dtype=np.float64)
    k = draft_kernels.walk(rows, prior, toks, probs)
    return toks[:k], probs[:k]


def walk_continuations_numpy(cont: np.ndarray, max_len: int, prior: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Greedy walk down the trie of continuation rows (the reference; kernels/draft.c is the fast one).

    cont: int64 (R, L) candidate continuations, ``SEP`` past a text's end. At each column the
    most frequent token among the rows still agreeing is drafted, with probability
    count / (rows + prior) (the prior shrinks estimates built on few rows). Returns
    (tokens int64 (k,), probs float64 (k,)), k <= max_len."""
    rows = cont[:, :max_len]
    toks: list[np.ndarray] = []
    probs: list[np.ndarray] = []
    j, width = 0, rows.shape[1]
    while j < width and len(rows):
        # Where all remaining rows agree, take the whole common run in one step.
        same = (rows[:, j:] == rows[0, j:]).all(axis=0)
        run = int(np.argmin(same)) if not same.all() else len(same)
        if run:
            seg = rows[0, j : j + run]
            seps = np.flatnonzero(seg == SEP)
            if len(seps):
                seg = seg[: seps[0]]
            toks.append(seg)
            probs.append(np.full(len(seg), len(rows) / (len(rows) + prior)))
            if len(seps):
                break
            j += run
            continue
        vals, counts = np.unique(rows[:, j], return_counts=True)
        best = int(np.argmax(counts))
        if vals[best] == SEP:
            break
        toks.append(vals[best : best + 1])
        probs.append(np.array([counts[best] / (len(rows) + prior)]))
        rows = rows[rows[:, j] == vals[best]]
        j += 1
    if not toks:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float64)
    return np.concatenate(toks).astype(np.int64), np.concatenate(probs)


def _bind_tokens(texts: Sequence[str], tokenizer, tail: list[int]) -> np.ndarray:
    """int32 (T,): every text tokenised whole, each followed by ``tail`` (EOS, SEP)."""
    enc = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    lengths = np.fromiter(map(len, enc), dtype=np.int64, count=len(enc))
    body = np.fromiter(itertools.chain.from_iterable(enc), dtype=np.int32, count=int(lengths.sum()))
    # Insert the tail (EOS, SEP) after every text with one vectorised insert.
    at = np.repeat(np.cumsum(lengths), len(tail))
    return np.insert(body, at, np.tile(np.asarray(tail, dtype=np.int32), len(enc)))


class BoundDraft:
    """A DraftCorpus bound to one tokenizer, with an n-gram index over its tokens."""

    def __init__(self, tokens: np.ndarray, levels: Sequence[int] = DEFAULT_LEVELS, max_rows: int = 64):
        self.tokens = np.ascontiguousarray(tokens, dtype=np.int32)
        self.levels = tuple(sorted(set(levels), reverse=True))
        self.max_rows = max_rows
        # int64 (V,) context match keys of the tokenizer this draft is bound to (space_fold_keys);
        # None: context matching compares ids as they are.
        self.match_keys: np.ndarray | None = None
        self.keys: dict[int, np.ndarray] = {}
        self.order: dict[int, np.ndarray] = {}
        # Padding with SEP lets continuation gathers run past the end without bounds checks.
        self._padded = np.concatenate([self.tokens, np.full(64, SEP, dtype=np.int32)])
        for n in self.levels:
            self._index_level(n)
        # The index as the compiled lookups read it (the arrays are never reallocated).
        self._native = draft_kernels.NgramIndex([self.keys[n] for n in self.levels],
                                                [self.order[n] for n in self.levels], self.levels, self._padded)

    @classmethod
    def from_corpus(cls, draft: DraftCorpus, tokenizer, **kw) -> BoundDraft:
        """Tokenise every text whole with ``tokenizer`` and index it."""
        eos = tokenizer.eos_token_id
        tail = [eos, SEP] if eos is not None else [SEP]
        tokens = _bind_tokens(draft.texts, tokenizer, tail) if draft.texts else np.empty(0, dtype=np.int32)
        bound = cls(tokens, **kw)
        bound.match_keys = space_fold_keys(tokenizer)
        return bound

    def _index_level(self, n: int) -> None:
        h = hash_windows(self.tokens, n)  # h[j] hashes tokens[j .. j+n-1]
        ends = np.arange(n - 1, len(self.tokens), dtype=np.int64)
        # A window is valid when it holds no SEP, i.e. lies inside one text.
        csum = np.concatenate([[0], np.cumsum(self.tokens == SEP)])
        valid = (csum[ends + 1] - csum[ends + 1 - n]) == 0
        # One packed sort by (hash, position) is much faster than a lexsort of two keys.
        packed = (h[valid].astype(np.uint64) << np.uint64(32)) | ends[valid].astype(np.uint64)
        packed.sort()
        self.keys[n] = (packed >> np.uint64(32)).astype(np.uint32)
        self.order[n] = (packed & np.uint64(0xFFFFFFFF)).astype(np.int32)

    @property
    def num_tokens(self) -> int:
        return int(len(self.tokens))

    def nbytes(self) -> int:
        return self.tokens.nbytes + sum(k.nbytes + o.nbytes for k, o in zip(self.keys.values(), self.order.values(), strict=False))

    def continuations(self, context: np.ndarray, max_len: int) -> tuple[np.ndarray, int]:
        """Rows of corpus text that follow the longest indexed suffix of ``context``.

        context: int64 (L,); max_len <= 64. Returns (cont int64 (R, max_len), n matched) or an
        empty (0, max_len) array with n = 0. At most ``max_rows`` rows: more occurrences are
        thinned to an even spread (the i-th of them at lo + i * (hits - 1) // (max_rows - 1)).
        Runs kernels/draft.c where available, else :meth:`continuations_numpy` (same rows)."""
        if draft_kernels.library() is None:
            return self.continuations_numpy(context, max_len)
        out = np.empty((self.max_rows, max_len), dtype=np.int64)
        rows, matched = draft_kernels.lookup(self._native, np.ascontiguousarray(context, dtype=np.int64), out)
        return out[:rows], matched

    def propose(self, context: np.ndarray, max_len: int, prior: float = 1.0,
                scratch: draft_kernels.Scratch | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The task draft after ``context`` (int64 (L,)): the walk down its :meth:`continuations`
        (:func:`walk_continuations`), as (tokens int64 (k,), probs float64 (k,)), k <= max_len.

        Compiled, lookup and walk are one call over at most ``draft_kernels.ROWS`` rows, into
        ``scratch`` (width ``max_len``; a caller that proposes step after step passes its own)."""
        if draft_kernels.library() is None:
            rows, _ = self.continuations(context, max_len)
            return walk_continuations(rows, max_len, prior=prior)
        if scratch is None or scratch.width != max_len:
            scratch = draft_kernels.Scratch(max_len)
        k = draft_kernels.corpus_draft(self._native, np.ascontiguousarray(context, dtype=np.int64),
                                       min(self.max_rows, draft_kernels.ROWS), prior, scratch)
        return scratch.result(k)

    def continuations_numpy(self, context: np.ndarray, max_len: int) -> tuple[np.ndarray, int]:
        """The reference of :meth:`continuations`."""
        for n in self.levels:
            if len(context) < n or not len(self.keys[n]):
                continue
            pattern = context[-n:]
            key = np.uint32(hash_pattern(pattern.tolist()))  # same dtype: no cast of the whole array
            lo = np.searchsorted(self.keys[n], key, side="left")
            hi = np.searchsorted(self.keys[n], key, side="right")
            if hi <= lo:
                continue
            if hi - lo > self.max_rows:  # keep a spread of occurrences, not just the first ones
                pick = lo + np.arange(self.max_rows) * (hi - lo - 1) // (self.max_rows - 1)
                ends = self.order[n][pick]
            else:
                ends = self.order[n][lo:hi]
            grams = self.tokens[ends[:, None] + np.arange(1 - n, 1)]
            ends = ends[(grams == pattern).all(axis=1)]
            if len(ends):
                return self._padded[ends[:, None] + np.arange(1, max_len + 1)].astype(np.int64), n
        return np.empty((0, max_len), dtype=np.int64), 0


def context_continuations(context: np.ndarray, max_len: int, levels: Sequence[int] = CONTEXT_LEVELS,
                          keys: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """Prompt-lookup rows: what followed earlier occurrences of the context's own suffix.

    context: int64 (L,); keys: int64 (L,) the ids that matching compares (``match_keys`` of
    the context, see :func:`space_fold_keys`), None to compare the ids themselves. Returns
    (cont int64 (R, max_len), n matched), rows of context ids, the most recent occurrences
    first (at most 16 rows). This is the stateless reference; decoding uses ``Proposer``'s
    incremental index, which must return the same rows (tested)."""
    L = len(context)
    keys = context if keys is None else keys
    padded = np.concatenate([context, np.full(max_len, SEP, dtype=np.int64)])
    for n in levels:
        if L <= n:
            continue
        win = np.lib.stride_tricks.sliding_window_view(keys[: L - 1], n)  # excludes the suffix itself
        hits = np.flatnonzero((win == keys[-n:]).all(axis=1))
        if len(hits):
            starts = hits[::-1][:16] + n
            return padded[starts[:, None] + np.arange(max_len)], n
    return np.empty((0, max_len), dtype=np.int64), 0


def space_fold_keys(tokenizer) -> np.ndarray:
    """int64 (V,): for each token id, the id of the same piece without its leading word marker
    (byte-level BPE's "\u0120", SentencePiece's "\u2581") where the piece is a word (a letter
    or digit follows the marker) and the vocabulary has it without, else the id itself.

    Context matching compares these keys: an output that copies a word of the prompt right
    after a quote or at its very start ('"valerij', 'Denver') spells the word without the
    space it has in the prompt (' valerij'), as other ids, and would otherwise find no match
    for it. Drafts are verified, so a looser match costs time, never tokens."""
    vocab = tokenizer.get_vocab()
    size = max(len(tokenizer), max(vocab.values(), default=-1) + 1)
    keys = np.arange(size, dtype=np.int64)
    for piece, i in vocab.items():
        # Byte-level BPE spells whitespace and control bytes as letters from U+0100 up ("\u010a"
        # is a newline): those are not words.
        word = len(piece) > 1 and piece[1].isalnum()
        if word and (piece[0] == "\u2581" or (piece[0] == "\u0120" and ord(piece[1]) < 256)):
            j = vocab.get(piece[1:])
            if j is not None:
                keys[i] = j
    return keys
