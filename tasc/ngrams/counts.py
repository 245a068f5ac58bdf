"""Frequent n-gram counting over a task's completions, at text level and at token level.

Two levels share one numpy kernel:

* text level: each text is split into pre-tokens by a lossless GPT-2 style regex
  (tasc.ngrams.pretokens: ``"".join(split_words(t)) == t`` for every string; ``encode_texts``
  computes the same split on code-point arrays), pre-tokens get int ids from a pyarrow dictionary, and
  n-grams of pre-token ids are counted. An n-gram's text is the concatenation of its
  pieces, so it does not depend on any tokenizer.
* token level: n-grams of given token-id sequences (from any tokenizer).

Kernel contract (``count_ngrams``):

* input: ``ids`` int32/int64 (T,), values in [0, 2**31); ``offsets`` int64 (D+1,), CSR
  document boundaries: ``offsets[0] == 0``, non-decreasing, ``offsets[-1] == T``.
* a window never crosses a document boundary; ``count`` counts occurrences (overlapping
  ones included), ``doc_count`` counts documents with at least one occurrence.
* only n-grams with ``count >= min_count`` are returned. Apriori pruning is exact: an
  n-gram occurring ``c`` times has a prefix and a suffix occurring at least ``c`` times.
* keys are exact, never hashed: level n keys a window by (rank of its frequent prefix
  (n-1)-gram, rank of its last token), so no collision handling is needed.
* output rows of each level are sorted lexicographically by token id; deterministic.

Table schema (``count_text_ngrams``, ``count_token_ngrams``; TEXT_SCHEMA, TOKEN_SCHEMA):

* ``ngram`` string: the n-gram text; token level: the tokenizer's decode, null without one.
* ``n`` int16: length in pre-tokens (text level) or tokens (token level).
* ``count`` int64: occurrences; ``doc_count`` int64: documents containing it.
* ``base_tokens`` int32: length in base-tokenizer tokens: n at token level; at text level
  ``len(tokenizer.encode(ngram, add_special_tokens=False))``, null without a tokenizer.
* ``gain`` int64: ``count * (base_tokens - 1)``, the tokens saved if the n-gram became one
  token; null when base_tokens is null.
* ``token_ids`` list<int32>: token level only, the ids.

Rows are sorted by gain desc (nulls last), count desc, n desc, ngram asc; ties left keep
the kernel order, so the table is deterministic. Schema metadata ``tasc.ngrams`` holds
JSON ``{"level", "max_n", "min_count"}``. At text level two distinct pre-token sequences
can, in rare regex edge cases, share a text; they stay separate rows.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tasc.ngrams.pretokens import encode_texts

META_KEY = b"tasc.ngrams"

_COMMON = [
    pa.field("ngram", pa.string()),
    pa.field("n", pa.int16()),
    pa.field("count", pa.int64()),
    pa.field("doc_count", pa.int64()),
    pa.field("base_tokens", pa.int32()),
    pa.field("gain", pa.int64()),
]
TEXT_SCHEMA = pa.schema(_COMMON)
TOKEN_SCHEMA = pa.schema([*_COMMON, pa.field("token_ids", pa.list_(pa.int32()))])

_SORT_KEYS = [("gain", "descending"), ("count", "descending"), ("n", "descending"), ("ngram", "ascending")]


@dataclass(frozen=True)
class NgramCounts:
    """Frequent n-grams of one length n: ``grams`` int32 (K, n), ``count`` and
    ``doc_count`` int64 (K,); rows sorted lexicographically by id."""

    n: int
    grams: np.ndarray
    count: np.ndarray
    doc_count: np.ndarray

    @classmethod
    def empty(cls, n: int) -> NgramCounts:
        z = np.zeros(0, np.int64)
        return cls(n, np.zeros((0, n), np.int32), z, z.copy())


# ---------------------------------------------------------------------------- kernel


def _sorted_runs(hi: np.ndarray, hi_max: int, pos: np.ndarray, doc_of_pos: np.ndarray, min_count: int):
    """Group equal keys. hi uint64 (m,), overwritten; pos int64 (m,), ascending. Returns
    the kept keys (ascending), their count and doc_count (int64), and per sorted element
    its position (int64) and the dense rank of its group among kept ones (int32, -1 if
    dropped)."""
    pbits = max(1, int(doc_of_pos.size - 1).bit_length())
    if int(hi_max).bit_length() + pbits <= 64:
        # Packing the position under the key turns an argsort into a plain sort, which
        # numpy runs with SIMD and is several times faster; positions within a group
        # come out ascending, hence documents too.
        packed = np.left_shift(hi, np.uint64(pbits), out=hi)
        packed |= pos.view(np.uint64)
        packed.sort()
        s_hi = packed >> np.uint64(pbits)
        s_pos = np.bitwise_and(packed, np.uint64((1 << pbits) - 1), out=packed).view(np.int64)
    else:
        order = np.argsort(hi, kind="stable")
        s_hi, s_pos = hi[order], pos[order]
    m = s_hi.size
    start = np.empty(m, bool)
    start[0] = True
    np.not_equal(s_hi[1:], s_hi[:-1], out=start[1:])
    doc = doc_of_pos[s_pos]
    doc_start = start.copy()
    doc_start[1:] |= doc[1:] != doc[:-1]
    first = np.flatnonzero(start)
    count = np.diff(first, append=m)
    doc_count = np.add.reduceat(doc_start, first, dtype=np.int64)
    keep = count >= min_count
    rank = np.cumsum(keep, dtype=np.int32) - 1
    rank[~keep] = -1
    return s_hi[first[keep]], count[keep], doc_count[keep], s_pos, np.repeat(rank, count)


def count_ngrams(ids: np.ndarray, offsets: np.ndarray, max_n: int, min_count: int = 2) -> list[NgramCounts]:
    """Count all n-grams, n = 1..max_n, of the documents ``ids[offsets[d]:offsets[d+1]]``.

    ids: int32/int64 (T,), non-negative. offsets: int64 (D+1,), CSR boundaries.
    Returns ``max_n`` NgramCounts (n = 1..max_n) with ``count >= min_count``.
    One sort per level over the surviving windows; no Python loop over tokens.
    """
    ids = np.asarray(ids)
    offsets = np.asarray(offsets, dtype=np.int64)
    if ids.ndim != 1 or ids.dtype.kind not in "iu":
        raise ValueError(f"ids must be a 1-D integer array, got {ids.dtype} {ids.shape}")
    if max_n < 1 or min_count < 1:
        raise ValueError(f"need max_n >= 1 and min_count >= 1, got {max_n}, {min_count}")
    t = ids.size
    csr = offsets.ndim == 1 and offsets.size > 0 and offsets[0] == 0 and offsets[-1] == t
    if not csr or np.any(np.diff(offsets) < 0):
        raise ValueError("offsets must be non-decreasing, start at 0 and end at len(ids)")
    if t == 0:
        return [NgramCounts.empty(n) for n in range(1, max_n + 1)]
    lo, top = int(ids.min()), int(ids.max())
    if lo < 0 or top >= 2**31:
        raise ValueError(f"ids must lie in [0, 2**31), got [{lo}, {top}]")

    doc_of_pos = np.repeat(np.arange(offsets.size - 1, dtype=np.int32), np.diff(offsets))
    pos = np.arange(t, dtype=np.int64)
    keys, count, doc_count, s_pos, s_rank = _sorted_runs(
        ids.astype(np.uint64), top, pos, doc_of_pos, min_count
    )
    uni_ids = keys.astype(np.int32)
    k1 = uni_ids.size
    uni_gid = np.full(t, -1, np.int32)
    uni_gid[s_pos] = s_rank
    out = [NgramCounts(1, uni_ids[:, None], count, doc_count)]

    # A bigram (i, i+1) is inside one document unless i+1 starts a later document. From
    # n = 3 on, two overlapping in-document (n-1)-windows imply the same document.
    same_doc = np.ones(t - 1, bool)
    starts = offsets[1:-1]
    same_doc[starts[(starts > 0) & (starts < t)] - 1] = False

    gid = uni_gid
    for n in range(2, max_n + 1):
        prev = out[-1]
        alive = gid >= 0
        cand = alive[:-1] & alive[1:]  # prefix and suffix (n-1)-grams both frequent
        if n == 2:
            cand &= same_doc
        pos = np.flatnonzero(cand)
        if pos.size == 0:
            out += [NgramCounts.empty(m) for m in range(n, max_n + 1)]
            break
        # Exact key: (rank of the prefix (n-1)-gram, rank of the last token).
        hi = gid[pos].astype(np.uint64)
        hi *= np.uint64(k1)
        hi += uni_gid[n - 1 :][pos].astype(np.uint64)
        keys, count, doc_count, s_pos, s_rank = _sorted_runs(
            hi, prev.count.size * k1 - 1, pos, doc_of_pos, min_count
        )
        gid = np.full(t - n + 1, -1, np.int32)
        gid[s_pos] = s_rank
        prefix, last = np.divmod(keys, np.uint64(k1))
        grams = np.concatenate([prev.grams[prefix], uni_ids[last][:, None]], axis=1)
        out.append(NgramCounts(n, grams, count, doc_count))
    return out


# ---------------------------------------------------------------------------- text


def _encoded_lengths(tokenizer, texts: list[str]) -> np.ndarray:
    """int32 (len(texts),): base-tokenizer lengths, one batch call for all texts."""
    if not texts:
        return np.zeros(0, np.int32)
    if callable(tokenizer):  # transformers tokenizers batch-encode in Rust
        enc = tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    else:
        enc = [tokenizer.encode(s, add_special_tokens=False) for s in texts]
    return np.fromiter(map(len, enc), dtype=np.int32, count=len(texts))


def _finish(levels: list[NgramCounts], columns: dict, schema: pa.Schema, meta: dict) -> pa.Table:
    columns["n"] = np.concatenate([np.full(lv.count.size, lv.n, np.int16) for lv in levels])
    columns["count"] = np.concatenate([lv.count for lv in levels])
    columns["doc_count"] = np.concatenate([lv.doc_count for lv in levels])
    columns = {f.name: columns[f.name] for f in schema}
    table = pa.table(columns, schema=schema.with_metadata({META_KEY: json.dumps(meta)}))
    return table.sort_by(_SORT_KEYS)


def text_ngram_table(
    ids: np.ndarray, offsets: np.ndarray, vocab: pa.Array, max_n: int = 8, min_count: int = 2, tokenizer=None
) -> pa.Table:
    """Text-level table (TEXT_SCHEMA) from ``encode_texts`` output: ids int32 (T,), offsets
    int64 (D+1,), vocab pa.string (V,). An n-gram's text is the concatenation of its pieces.
    With a tokenizer, ``base_tokens`` is the encoded length of each distinct n-gram (one
    batch call, not one per occurrence) and ``gain`` follows."""
    levels = count_ngrams(ids, offsets, max_n, min_count)
    parts = []
    for lv in levels:
        cols = [pc.take(vocab, pa.array(lv.grams[:, j])) for j in range(lv.n)]
        parts.append(cols[0] if lv.n == 1 else pc.binary_join_element_wise(*cols, ""))
    ngram = pa.concat_arrays(parts)
    cols = {
        "ngram": ngram,
        "base_tokens": pa.nulls(len(ngram), pa.int32()),
        "gain": pa.nulls(len(ngram), pa.int64()),
    }
    if tokenizer is not None:
        base = _encoded_lengths(tokenizer, ngram.to_pylist())
        count = np.concatenate([lv.count for lv in levels])
        cols.update(base_tokens=base, gain=count * (base.astype(np.int64) - 1))
    return _finish(levels, cols, TEXT_SCHEMA, {"level": "text", "max_n": max_n, "min_count": min_count})


def count_text_ngrams(texts: Sequence[str], max_n: int = 8, min_count: int = 2, tokenizer=None) -> pa.Table:
    """Text-level n-gram table (TEXT_SCHEMA) of ``texts``, one document each, split as
    ``split_words`` does. See ``text_ngram_table``."""
    return text_ngram_table(*encode_texts(texts), max_n=max_n, min_count=min_count, tokenizer=tokenizer)


def count_token_ngrams(
    sequences: Sequence[Sequence[int]], max_n: int = 8, min_count: int = 2, tokenizer=None
) -> pa.Table:
    """Token-level n-gram table (TOKEN_SCHEMA) of token-id sequences (one document each).
    ``base_tokens`` is n; ``ngram`` is the tokenizer's decode of the ids, or null."""
    lengths = np.fromiter(map(len, sequences), dtype=np.int64, count=len(sequences))
    offsets = np.zeros(lengths.size + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    ids = np.fromiter(itertools.chain.from_iterable(sequences), dtype=np.int64, count=int(offsets[-1]))
    return token_table(count_ngrams(ids, offsets, max_n, min_count), max_n, min_count, tokenizer)


def token_table(levels, max_n: int, min_count: int, tokenizer=None) -> pa.Table:
    """TOKEN_SCHEMA table of counted levels (``count_ngrams`` output, or merged shards)."""
    n = np.concatenate([np.full(lv.count.size, lv.n, np.int32) for lv in levels])
    bounds = np.zeros(n.size + 1, np.int32)
    np.cumsum(n, out=bounds[1:])
    flat = np.concatenate([lv.grams.ravel() for lv in levels])
    count = np.concatenate([lv.count for lv in levels])
    cols = {
        "ngram": pa.nulls(n.size, pa.string()),
        "base_tokens": n,
        "gain": count * (n.astype(np.int64) - 1),
        "token_ids": pa.ListArray.from_arrays(pa.array(bounds), pa.array(flat)),
    }
    if tokenizer is not None:
        rows = [flat[a:b].tolist() for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        cols["ngram"] = tokenizer.batch_decode(rows, clean_up_tokenization_spaces=False)
    return _finish(levels, cols, TOKEN_SCHEMA, {"level": "token", "max_n": max_n, "min_count": min_count})
