"""N-gram tables counted in shards and merged, equal to counting the whole corpus at once.

A shard is a contiguous slice of the documents. Each shard counts *all* its n-grams
(``min_count=1``): a shard cannot prune, since an n-gram seen once in each of two shards
has count 2 overall. The merge sums ``count`` and ``doc_count`` (shards hold disjoint
documents), applies ``min_count`` and builds the table with the code of
:mod:`tasc.ngrams.counts`, so the result equals ``count_text_ngrams`` / ``count_token_ngrams`` on
the whole corpus, row order and metadata included:

* token level: n-grams are keyed by token ids, which every shard shares;
* text level: each shard numbers its pre-tokens in first-seen order. Concatenating the
  shard vocabularies in shard order and keeping first occurrences gives the first-seen
  numbering of the whole corpus, so merged rows sort exactly as the unsharded kernel's
  (lexicographically by pre-token id), which decides ties the final sort leaves.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tasc.ngrams.counts import (
    TEXT_SCHEMA,
    NgramCounts,
    _encoded_lengths,
    _finish,
    count_ngrams,
    token_table,
)
from tasc.ngrams.pretokens import encode_texts


@dataclass(frozen=True)
class ShardCounts:
    """Every n-gram (n = 1..max_n) of one shard: ``levels[n-1]``; ``vocab``: the shard's
    pre-tokens in first-seen order (text level; ids index it), None at token level;
    ``tokens``: ids in the shard (its corpus tokens at token level)."""

    level: str
    max_n: int
    levels: list[NgramCounts]
    vocab: list[str] | None
    documents: int
    tokens: int


def shard_bounds(n_docs: int, shards: int) -> list[tuple[int, int]]:
    """``shards`` contiguous, non-empty [start, stop) slices of ``n_docs`` documents (fewer
    when there are fewer documents), sizes differing by at most one."""
    k = max(1, min(shards, n_docs))
    edges = np.linspace(0, n_docs, k + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True)]


def count_text_shard(texts: Sequence[str], max_n: int) -> ShardCounts:
    ids, offsets, vocab = encode_texts(list(texts))
    levels = count_ngrams(ids, offsets, max_n, min_count=1)
    return ShardCounts("text", max_n, levels, vocab.to_pylist(), len(texts), int(ids.size))


def count_token_shard(sequences: Sequence[Sequence[int]], max_n: int) -> ShardCounts:
    lengths = np.fromiter(map(len, sequences), dtype=np.int64, count=len(sequences))
    offsets = np.zeros(lengths.size + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    ids = np.fromiter((i for s in sequences for i in s), dtype=np.int64, count=int(offsets[-1]))
    return ShardCounts("token", max_n, count_ngrams(ids, offsets, max_n, min_count=1), None, len(sequences),
                       int(ids.size))


def _global_vocab(shards: Sequence[ShardCounts]) -> tuple[list[str], list[np.ndarray]]:
    """The corpus vocabulary in first-seen order, and per shard its local -> global id map."""
    index: dict[str, int] = {}
    maps = []
    for s in shards:
        maps.append(np.fromiter((index.setdefault(p, len(index)) for p in s.vocab), np.int32, count=len(s.vocab)))
    return list(index), maps


def merge_levels(shards: Sequence[ShardCounts], min_count: int) -> list[NgramCounts]:
    """Summed counts per level, rows with ``count >= min_count``, sorted lexicographically
    by (global) id like the kernel's. Text-level ids are global after ``_global_vocab``."""
    if not shards:
        raise ValueError("nothing to merge: no shards")
    max_n = shards[0].max_n
    if any(s.max_n != max_n or s.level != shards[0].level for s in shards):
        raise ValueError("shards differ in level or max_n")
    maps = _global_vocab(shards)[1] if shards[0].level == "text" else None
    out = []
    for n in range(1, max_n + 1):
        grams = [s.levels[n - 1].grams if maps is None else maps[i][s.levels[n - 1].grams]
                 for i, s in enumerate(shards)]
        grams = np.concatenate(grams).reshape(-1, n).astype(np.int32, copy=False)
        if grams.shape[0] == 0:
            out.append(NgramCounts.empty(n))
            continue
        uniq, inverse = np.unique(grams, axis=0, return_inverse=True)
        inverse = inverse.reshape(-1)
        count = np.zeros(len(uniq), np.int64)
        doc_count = np.zeros(len(uniq), np.int64)
        np.add.at(count, inverse, np.concatenate([s.levels[n - 1].count for s in shards]))
        np.add.at(doc_count, inverse, np.concatenate([s.levels[n - 1].doc_count for s in shards]))
        keep = count >= min_count
        out.append(NgramCounts(n, np.ascontiguousarray(uniq[keep]), count[keep], doc_count[keep]))
    return out


def merged_text_table(shards: Sequence[ShardCounts], min_count: int = 2, tokenizer=None) -> pa.Table:
    """The text-level table of the shards' documents together (== ``count_text_ngrams``)."""
    levels = merge_levels(shards, min_count)
    vocab = pa.array(_global_vocab(shards)[0], pa.string())
    parts = []
    for lv in levels:
        cols = [pc.take(vocab, pa.array(lv.grams[:, j])) for j in range(lv.n)]
        parts.append(cols[0] if lv.n == 1 else pc.binary_join_element_wise(*cols, ""))
    ngram = pa.concat_arrays(parts) if parts else pa.array([], pa.string())
    cols = {"ngram": ngram, "base_tokens": pa.nulls(len(ngram), pa.int32()), "gain": pa.nulls(len(ngram), pa.int64())}
    if tokenizer is not None:
        base = _encoded_lengths(tokenizer, ngram.to_pylist())
        count = np.concatenate([lv.count for lv in levels])
        cols.update(base_tokens=base, gain=count * (base.astype(np.int64) - 1))
    meta = {"level": "text", "max_n": shards[0].max_n, "min_count": min_count}
    return _finish(levels, cols, TEXT_SCHEMA, meta)


def merged_token_table(shards: Sequence[ShardCounts], min_count: int = 2, tokenizer=None) -> pa.Table:
    """The token-level table of the shards' sequences together (== ``count_token_ngrams``)."""
    return token_table(merge_levels(shards, min_count), shards[0].max_n, min_count, tokenizer)
