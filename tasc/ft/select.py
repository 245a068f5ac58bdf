"""Vocabulary expansion for one TASC round, step 1: choose the tokens (tasc.ft.expand adds them).

Selection ranks candidate strings from the text-level n-gram table of the task's completions
by estimated savings (``count * (base_tokens - 1)``), then accepts them one at a time in a
lazy greedy loop that measures the real saving on a sample: each candidate is added, the
sample documents containing it are re-encoded, and it stays only if it saves at least
``min_count`` tokens given the tokens already chosen. Tokens that later, longer ones made
useless are pruned by a leave-one-out measure and their slots refilled. Overlaps (a longer
token swallowing a shorter one, a token splitting words it was not counted in) are
therefore paid for by the measurement, not guessed.

New tokens are *added tokens* of the Hugging Face fast tokenizer (``normalized=False``,
no strip, no single-word rule). They are matched in the raw text before pre-tokenisation,
which is the only way a token can span pre-token boundaries (``{"intent": "``, ``", "``)
without changing the pre-tokenizer; inside their spans the base BPE is untouched. Decoding
an added token yields its content verbatim, with one exception on byte-level tokenizers:
content made only of characters of the byte-level alphabet (e.g. ``café``) is read back as
raw bytes and breaks. Such candidates are dropped, and ``tasc.ft.expand.expand_tokenizer`` checks
every token encodes to its own id and decodes to its exact text.
"""

from __future__ import annotations

import heapq
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from tasc.ngrams.counts import count_text_ngrams

PRUNE_PASSES = 3  # leave-one-out pruning and refill rounds in selection
SELECTION_COLUMNS = ["token", "n", "count", "base_tokens", "estimated_gain", "measured_gain", "uses"]


class TokenizerError(ValueError):
    """A tokenizer that cannot be expanded, or tokens that would not round-trip."""


# New tokens per round. Each new row must learn to beat its own first piece at the argmax
# within the round's fine-tuning budget; with the CPU budget, many tokens per round cost task
# metric points (docs/performance.md). Rounds repeat, so more tokens come in steps, each
# round trained on the last.
TOKENS_PER_ROUND = 12


@dataclass(frozen=True)
class SelectionConfig:
    tokens_per_round: int = TOKENS_PER_ROUND
    min_count: int = 5  # occurrences for a candidate, and tokens a chosen one must save
    max_chars: int = 32
    max_base_tokens: int = 16
    cross_whitespace: bool = True  # allow whitespace inside a token (" the city", '": "')
    cross_newlines: bool = False  # allow a newline next to non-space text ("):\n")
    candidate_pool: int = 2000
    max_n: int = 8  # longest candidate, in pre-tokens
    sample_size: int = 4000  # completions the savings are measured on
    seed: int = 0


@dataclass
class Selection:
    """Chosen tokens in order of choice. ``table`` columns: token (str), n (pre-tokens),
    count (occurrences in the sample), base_tokens, estimated_gain (count * (base_tokens - 1)),
    measured_gain (tokens it saves on the sample given all the other chosen tokens), uses
    (times it is used encoding all completions).
    ``base_total``/``new_total``: tokens of all completions before/after."""

    table: pd.DataFrame
    base_total: int
    new_total: int
    sample_docs: int
    candidates: int  # candidates that passed the filters
    tested: int  # candidates measured

    @property
    def tokens(self) -> list[str]:
        return self.table["token"].tolist()

    @property
    def reduction(self) -> float:
        """Fraction of completion tokens saved: ``1 - new_total / base_total``."""
        return 1.0 - self.new_total / self.base_total if self.base_total else 0.0


def require_fast(tokenizer):
    """The Rust ``tokenizers.Tokenizer`` behind a Hugging Face tokenizer, or TokenizerError."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if not getattr(tokenizer, "is_fast", False) or backend is None:
        raise TokenizerError(
            f"{type(tokenizer).__name__} has no fast (Rust 'tokenizers') backend; vocabulary "
            "expansion edits tokenizer.json. Load the tokenizer with AutoTokenizer (use_fast=True) "
            "or convert it to a fast tokenizer first."
        )
    return backend


def _added(text: str):
    from tokenizers import AddedToken

    return AddedToken(text, normalized=False, special=False, lstrip=False, rstrip=False, single_word=False)


def _fresh(base_json: str, tokens: Sequence[str]):
    """A new backend tokenizer: the base one plus ``tokens`` as added tokens."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(base_json)
    if tokens:
        tok.add_tokens([_added(t) for t in tokens])
    return tok


def _lengths(tok, texts: Sequence[str]) -> np.ndarray:
    """int64 (len(texts),): encoded lengths without special tokens."""
    if not texts:
        return np.zeros(0, np.int64)
    enc = tok.encode_batch(list(texts), add_special_tokens=False)
    return np.fromiter((len(e.ids) for e in enc), np.int64, count=len(texts))


def _shape_ok(text: str, config: SelectionConfig) -> bool:
    body = text.lstrip()
    if not config.cross_whitespace and any(c.isspace() for c in body):
        return False
    return config.cross_newlines or "\n" not in text or not text.strip()


def filter_candidates(table, tokenizer, config: SelectionConfig) -> pd.DataFrame:
    """Candidate rows of a text n-gram table (with base_tokens): frequent, multi-token,
    short enough, of the allowed shape, new to the vocabulary and exactly decodable as an
    added token. Returns at most ``candidate_pool`` rows (token, n, count, base_tokens,
    estimated_gain), best estimated gain first."""
    df = table.to_pandas() if hasattr(table, "to_pandas") else pd.DataFrame(table)
    df = df.rename(columns={"ngram": "token", "gain": "estimated_gain"})
    keep = (
        (df["count"] >= config.min_count)
        & (df["base_tokens"] >= 2)
        & (df["base_tokens"] <= config.max_base_tokens)
        & (df["token"].str.len() <= config.max_chars)
    )
    df = df[keep]
    vocab = tokenizer.get_vocab()
    df = df[np.array([_shape_ok(t, config) and t not in vocab for t in df["token"]], bool)]
    df = df.drop_duplicates("token").sort_values("estimated_gain", ascending=False, kind="stable")
    df = df.head(2 * config.candidate_pool)  # spare rows for the decode check below
    cols = ["token", "n", "count", "base_tokens", "estimated_gain"]
    if df.empty:
        return df[cols].reset_index(drop=True)
    backend = _fresh(require_fast(tokenizer).to_str(), df["token"].tolist())
    ok = np.array([backend.decode([backend.token_to_id(t)], skip_special_tokens=False) == t for t in df["token"]])
    return df[ok].head(config.candidate_pool)[cols].reset_index(drop=True)


def _sample(texts: Sequence[str], size: int, seed: int) -> list[str]:
    texts = list(texts)
    if len(texts) <= size:
        return texts
    return random.Random(seed).sample(texts, size)


class _Counter:
    """Encoded lengths under the base tokenizer plus added tokens, without rebuilding the large
    base tokenizer for every trial: a small tokenizer holding only the added tokens finds
    their matches as the real one does (leftmost-longest, before pre-tokenisation, together
    with the base's own added tokens, e.g. those of an earlier round), and each distinct
    piece of text between matches is encoded once by the base tokenizer."""

    def __init__(self, base_json: str):
        from tokenizers import AddedToken

        self.base = _fresh(base_json, [])
        keys = ("special", "normalized", "lstrip", "rstrip", "single_word")
        self.fixed = [AddedToken(t["content"], **{k: t[k] for k in keys if k in t})
                      for t in json.loads(base_json).get("added_tokens", [])]
        self.piece_len: dict[str, int] = {}
        self.reset([])

    def reset(self, tokens: Sequence[str]) -> None:
        from tokenizers import Tokenizer
        from tokenizers.models import WordLevel

        self.tokens = list(tokens)
        self.splitter = Tokenizer(WordLevel({"<piece>": 0}, unk_token="<piece>"))
        self.splitter.add_tokens(self.fixed + [_added(t) for t in self.tokens])

    def add(self, token: str) -> None:
        self.tokens.append(token)
        self.splitter.add_tokens([_added(token)])

    def lengths(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """int64 (len(texts),) encoded lengths and int64 (len(tokens),) uses of each token."""
        if not texts:
            return np.zeros(0, np.int64), np.zeros(len(self.tokens), np.int64)
        out = np.zeros(len(texts), np.int64)
        pieces: list[tuple[int, str]] = []
        added: list[int] = []
        for d, (text, enc) in enumerate(zip(texts, self.splitter.encode_batch(list(texts)), strict=True)):
            for i, (a, b) in zip(enc.ids, enc.offsets, strict=True):
                if i:
                    added.append(i - 1 - len(self.fixed))
                    out[d] += 1
                else:
                    pieces.append((d, text[a:b]))
        missing = list({p for _, p in pieces if p not in self.piece_len})
        self.piece_len.update(zip(missing, _lengths(self.base, missing).tolist(), strict=True))
        for d, p in pieces:
            out[d] += self.piece_len[p]
        added_ids = np.asarray(added, np.int64)
        return out, np.bincount(added_ids[added_ids >= 0], minlength=len(self.tokens))


def _leave_one_out(counter: _Counter, sample: list[str], docs: list[np.ndarray]) -> np.ndarray:
    """int64 (k,): tokens each of the counter's tokens saves on the sample given the others;
    only the documents containing a token (``docs[j]``) can change without it."""
    tokens = list(counter.tokens)
    with_all = counter.lengths(sample)[0]
    gains = np.zeros(len(tokens), np.int64)
    for j in range(len(tokens)):
        counter.reset(tokens[:j] + tokens[j + 1 :])
        gains[j] = counter.lengths([sample[d] for d in docs[j]])[0].sum() - with_all[docs[j]].sum()
    counter.reset(tokens)
    return gains


def _greedy(pool: pd.DataFrame, sample: list[str], base_json: str, config: SelectionConfig):
    """Lazy greedy choice with exact marginal savings on the sample, then leave-one-out pruning
    of tokens that later, longer ones made useless, and a refill. Returns (rows, gains, tested)."""
    counter = _Counter(base_json)
    texts, counts = pool["token"].tolist(), pool["count"].to_numpy()
    heap = [(-int(g), i) for i, g in enumerate(pool["estimated_gain"])]
    heapq.heapify(heap)
    chosen: list[int] = []
    docs: dict[int, np.ndarray] = {}
    tested = 0
    for _ in range(PRUNE_PASSES):
        counter.reset([texts[j] for j in chosen])
        doc_len = counter.lengths(sample)[0]
        while heap and len(chosen) < config.tokens_per_round:
            neg, i = heapq.heappop(heap)
            # Chosen tokens inside a candidate shrink what it can still save: re-queue stale ones.
            now = int(counts[i]) * (int(counter.lengths([texts[i]])[0][0]) - 1)
            if now < -neg:
                if now >= config.min_count:
                    heapq.heappush(heap, (-now, i))
                continue
            tested += 1
            docs[i] = np.array([d for d, s in enumerate(sample) if texts[i] in s], np.int64)
            counter.add(texts[i])
            new = counter.lengths([sample[d] for d in docs[i]])[0]
            if doc_len[docs[i]].sum() - new.sum() >= config.min_count:
                chosen.append(i)
                doc_len[docs[i]] = new
            else:
                counter.reset([texts[j] for j in chosen])
        gains = _leave_one_out(counter, sample, [docs[j] for j in chosen])
        weak = gains < config.min_count
        if not weak.any():
            break
        chosen = [j for j, w in zip(chosen, weak, strict=True) if not w]
        counter.reset([texts[j] for j in chosen])
        gains = _leave_one_out(counter, sample, [docs[j] for j in chosen])
    return chosen, gains, tested


def select_tokens(completions: Sequence[str], tokenizer, config: SelectionConfig | None = None) -> Selection:
    """Choose up to ``tokens_per_round`` new tokens that cut the token count of ``completions``.

    completions: the task's train completions (str). tokenizer: a Hugging Face fast tokenizer.
    Candidates come from ``count_text_ngrams`` over a sample of ``sample_size`` completions;
    savings are measured on that sample and the final totals on all completions.
    """
    config = config or SelectionConfig()
    base_json = require_fast(tokenizer).to_str()
    sample = _sample(completions, config.sample_size, config.seed)
    table = count_text_ngrams(sample, max_n=config.max_n, min_count=config.min_count, tokenizer=tokenizer)
    pool = filter_candidates(table, tokenizer, config)
    chosen, gains, tested = _greedy(pool, sample, base_json, config)
    out = pool.iloc[chosen].reset_index(drop=True)
    out["measured_gain"] = np.asarray(gains, np.int64)
    base_total = int(_lengths(_fresh(base_json, []), completions).sum())
    final = _fresh(base_json, out["token"].tolist())
    enc = final.encode_batch(list(completions), add_special_tokens=False) if len(completions) else []
    ids = np.fromiter((t for e in enc for t in e.ids), np.int64)
    new_total = int(ids.size)
    out_ids = np.array([final.token_to_id(t) for t in out["token"]], np.int64)
    uses = np.bincount(ids, minlength=int(out_ids.max(initial=0)) + 1)
    out["uses"] = uses[out_ids] if out_ids.size else np.zeros(0, np.int64)
    return Selection(out[SELECTION_COLUMNS], base_total, new_total, len(sample), len(pool), tested)
