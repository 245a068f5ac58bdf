"""The TASC draft: hashing, the n-gram index against a brute-force search, the draft kernels,
binding one stored text draft to two tokenizers, memory, and Parquet storage."""

from __future__ import annotations

import itertools

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage.drafts import read_draft, write_draft
from tasc.decode.draft import (
    DEFAULT_LEVELS,
    DRAFT_SCHEMA_VERSION,
    SEP,
    BoundDraft,
    DraftCorpus,
    DraftError,
    build_draft_corpus,
    check_compatible,
    context_continuations,
    hash_pattern,
    hash_windows,
    walk_continuations,
)
from tasc.decode.proposer import Proposer, ProposerConfig

TEXTS = (
    "turn on the kitchen lights please",
    " leading space and trailing space ",
    "def add(a, b):\n    return a + b\n",
    '{"intent": "GetWeather", "slots": {"city": "Paris"}}',
    "naïve café Straße 漢字 😀 x²",
    "turn on the kitchen lights please",  # repeats are kept: they are counts
)


# ---------------------------------------------------------------- hashing


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7])
def test_hash_windows_index_and_pattern_agree(n):
    rng = np.random.default_rng(n)
    tokens = rng.integers(-1, 50_000, 200).astype(np.int32)
    h = hash_windows(tokens, n)
    assert h.dtype == np.uint32 and h.shape == (200 - n + 1,)
    for j in range(0, len(h), 7):
        assert hash_windows(tokens[j : j + n], n)[0] == h[j]
        assert hash_windows(tokens[j : j + n].astype(np.int64), n)[0] == h[j]  # dtype-independent
    # Different windows hash differently (no collisions expected among 200 random ones).
    uniq = {tuple(tokens[j : j + n]) for j in range(len(h))}
    assert len(set(h.tolist())) == len(uniq)
    assert hash_windows(tokens[: n - 1], n).shape == (0,)


def test_hash_pattern_agrees_with_hash_windows():
    rng = np.random.default_rng(7)
    for n in (1, 2, 4, 5):
        tokens = np.concatenate([[SEP, 0, 2**31 - 1], rng.integers(-1, 200_000, 60)]).astype(np.int64)
        h = hash_windows(tokens, n)
        for j in range(len(h)):
            assert hash_pattern(tokens[j : j + n].tolist()) == h[j]
            assert hash_pattern(tokens[j : j + n]) == h[j]  # numpy ints too


def test_hash_windows_is_order_sensitive():
    a = hash_windows(np.array([1, 2, 3]), 3)[0]
    b = hash_windows(np.array([3, 2, 1]), 3)[0]
    assert a != b


# ---------------------------------------------------------------- index vs brute force


def _random_stream(rng, n_docs: int = 40, vocab: int = 6) -> np.ndarray:
    parts = []
    for i in range(n_docs):
        length = 0 if i == 7 else int(rng.integers(1, 20))  # one empty doc: two SEPs in a row
        parts += [*rng.integers(0, vocab, length).tolist(), SEP]
    return np.array(parts, dtype=np.int32)


def _brute(tokens: np.ndarray, context: np.ndarray, levels, max_len: int):
    padded = np.concatenate([tokens, np.full(max_len, SEP)]).astype(np.int64)
    for n in sorted(levels, reverse=True):
        if len(context) < n:
            continue
        pat = context[-n:]
        ends = [
            i for i in range(n - 1, len(tokens))
            if np.array_equal(tokens[i - n + 1 : i + 1], pat) and SEP not in tokens[i - n + 1 : i + 1]
        ]
        if ends:
            return [padded[i + 1 : i + 1 + max_len].tolist() for i in ends], n, ends
    return [], 0, []


def test_index_contract():
    rng = np.random.default_rng(0)
    tokens = _random_stream(rng)
    d = BoundDraft(tokens)
    assert d.levels == tuple(sorted(DEFAULT_LEVELS, reverse=True))
    for n in d.levels:
        keys, order = d.keys[n], d.order[n]
        assert keys.dtype == np.uint32 and order.dtype == np.int32
        assert np.all(np.diff(keys.astype(np.int64)) >= 0)
        # Exactly the windows that lie inside one text are indexed, each with its own hash.
        valid = [i for i in range(n - 1, len(tokens)) if SEP not in tokens[i - n + 1 : i + 1]]
        assert sorted(order.tolist()) == valid
        for k, i in zip(keys[::5], order[::5], strict=True):
            assert SEP not in tokens[i - n + 1 : i + 1]
            assert hash_windows(tokens[i - n + 1 : i + 1], n)[0] == k


def test_continuations_equal_brute_force():
    rng = np.random.default_rng(1)
    tokens = _random_stream(rng)
    max_len = 8
    d = BoundDraft(tokens, max_rows=10_000)
    seen_levels = set()
    for trial in range(300):
        if trial % 2:  # a real stretch of the corpus (often a level-4 hit) ...
            start = int(rng.integers(0, len(tokens) - 6))
            context = tokens[start : start + int(rng.integers(1, 7))].astype(np.int64)
            context = context[context != SEP]
        else:  # ... or random tokens, including one that never occurs (7)
            context = rng.integers(0, 8, int(rng.integers(0, 7))).astype(np.int64)
        rows, n = d.continuations(context, max_len)
        exp_rows, exp_n, ends = _brute(tokens, context, d.levels, max_len)
        assert n == exp_n, (context, n, exp_n)
        assert rows.dtype == np.int64 and rows.shape == (len(exp_rows), max_len)
        assert rows.tolist() == exp_rows  # same occurrences, in corpus order
        seen_levels.add(n)
        for i in ends:  # the matched window never crosses a document boundary
            assert SEP not in tokens[i - n + 1 : i + 1]
    assert seen_levels == {0, 1, 2, 4}


def test_continuations_keep_a_spread_when_capped():
    # Pattern 7 followed by 200 distinct tokens: a row's first token says which occurrence it is.
    tokens = np.array([t for i in range(200) for t in (7, 100 + i, SEP)], dtype=np.int32)
    d = BoundDraft(tokens, levels=(1,), max_rows=16)
    rows, n = d.continuations(np.array([5, 7]), 4)
    assert n == 1 and rows.shape == (16, 4)
    first = rows[:, 0]
    assert first[0] == 100 and first[-1] == 299  # first and last occurrence both kept
    assert np.all(np.diff(first) > 5)  # spread out, not the first 16
    assert np.all(rows[:, 1] == SEP)


def test_from_corpus_appends_eos_after_each_text(tiny_tokenizer):
    corpus = build_draft_corpus(references=["hello world", "", "play jazz"], on_policy=["hello world"])
    assert corpus.texts == ("hello world", "play jazz", "hello world") and corpus.source == "both"
    d = BoundDraft.from_corpus(corpus, tiny_tokenizer)
    eos = tiny_tokenizer.eos_token_id
    expected = []
    for t in corpus.texts:
        expected += [*tiny_tokenizer(t, add_special_tokens=False)["input_ids"], eos, SEP]
    assert d.tokens.tolist() == expected
    assert d.tokens.dtype == np.int32 and d.num_tokens == len(expected)
    # The end of a text is predicted: after "play jazz" comes EOS, then SEP.
    tail = np.array(tiny_tokenizer("play jazz", add_special_tokens=False)["input_ids"], dtype=np.int64)
    rows, n = d.continuations(tail, 3)
    assert n >= 1 and rows[0].tolist()[:2] == [eos, SEP]


# ---------------------------------------------------------------- draft kernels


def test_context_continuations_most_recent_first_and_excludes_suffix():
    context = np.array([5, 1, 2, 3, 9, 6, 1, 2, 3, 8, 7, 1, 2, 3], dtype=np.int64)
    rows, n = context_continuations(context, 4)
    # [7,1,2,3] occurs only as the suffix itself, so the level-3 match [1,2,3] is used.
    assert n == 3
    assert rows.tolist() == [[8, 7, 1, 2], [9, 6, 1, 2]]  # most recent occurrence first
    # Past the end of the context, rows are padded with SEP.
    rows, n = context_continuations(np.array([4, 5, 6, 4, 5], dtype=np.int64), 4)
    assert n == 2 and rows.tolist() == [[6, 4, 5, SEP]]
    # A suffix that only occurs as itself gives nothing.
    rows, n = context_continuations(np.array([1, 2, 3, 4, 5], dtype=np.int64), 4)
    assert n == 0 and rows.shape == (0, 4)
    # At most 16 rows, the most recent ones.
    ctx = np.array([t for i in range(30) for t in (1, 2, 50 + i)] + [1, 2], dtype=np.int64)
    rows, n = context_continuations(ctx, 2)
    assert n == 2 and rows.shape == (16, 2) and rows[0, 0] == 79 and rows[-1, 0] == 64


def test_walk_continuations_majority_path():
    cont = np.array([[5, 6, 7], [5, 6, 8], [5, 6, 8], [4, 1, 1]], dtype=np.int64)
    toks, probs = walk_continuations(cont, 3, prior=1.0)
    assert toks.tolist() == [5, 6, 8]
    np.testing.assert_allclose(probs, [3 / 5, 3 / 4, 2 / 4])
    toks, probs = walk_continuations(cont, 3, prior=0.5)
    np.testing.assert_allclose(probs, [3 / 4.5, 3 / 3.5, 2 / 3.5])
    toks, probs = walk_continuations(cont, 2, prior=1.0)
    assert toks.tolist() == [5, 6] and len(probs) == 2
    # The walk stops where most agreeing rows end (SEP) ...
    cont = np.array([[3, SEP, SEP], [3, SEP, SEP], [3, 4, 5]], dtype=np.int64)
    toks, _ = walk_continuations(cont, 3)
    assert toks.tolist() == [3]
    # ... and at a majority SEP right away; no rows give nothing.
    assert walk_continuations(np.array([[SEP, 1]], dtype=np.int64), 2)[0].size == 0
    toks, probs = walk_continuations(np.empty((0, 4), dtype=np.int64), 4)
    assert toks.size == 0 and probs.size == 0 and toks.dtype == np.int64 and probs.dtype == np.float64


def _walk_reference(cont: np.ndarray, max_len: int, prior: float):
    """The walk one column at a time: the majority token among the rows still agreeing."""
    alive = np.ones(len(cont), dtype=bool)
    toks, probs = [], []
    for j in range(min(max_len, cont.shape[1])):
        col = cont[alive, j]
        if col.size == 0:
            break
        vals, counts = np.unique(col, return_counts=True)
        best = int(np.argmax(counts))
        if vals[best] == SEP:
            break
        toks.append(int(vals[best]))
        probs.append(float(counts[best]) / (col.size + prior))
        alive &= cont[:, j] == vals[best]
    return toks, probs


def test_walk_continuations_equals_column_by_column_reference():
    rng = np.random.default_rng(3)
    for trial in range(300):
        r, width = int(rng.integers(1, 12)), int(rng.integers(1, 10))
        # Rows share a prefix of random length, then diverge over a tiny alphabet with SEPs.
        shared = rng.integers(0, 3, width)
        cont = np.where(np.arange(width) < rng.integers(0, width + 1), shared, rng.integers(-1, 3, (r, width)))
        if trial % 3 == 0:  # whole rows ending in SEP padding, as past a text's end
            cont[:, int(rng.integers(0, width)) :] = SEP
        cont = cont.astype(np.int64)
        max_len = int(rng.integers(1, width + 2))
        prior = float(rng.choice([0.5, 1.0]))
        toks, probs = walk_continuations(cont, max_len, prior=prior)
        ref_toks, ref_probs = _walk_reference(cont, max_len, prior)
        assert toks.tolist() == ref_toks, (cont, max_len)
        np.testing.assert_allclose(probs, ref_probs)
        assert toks.dtype == np.int64 and probs.dtype == np.float64


def test_empty_draft_binds_and_proposes_nothing(tiny_tokenizer):
    corpus = build_draft_corpus(references=["", ""], on_policy=[])
    assert corpus.texts == ()
    d = BoundDraft.from_corpus(corpus, tiny_tokenizer)
    assert d.num_tokens == 0 and d.nbytes() == 0
    rows, n = d.continuations(np.array([1, 2, 3, 4, 5], dtype=np.int64), 8)
    assert rows.shape == (0, 8) and n == 0
    ctx = np.array([1, 2, 3, 4, 5], dtype=np.int64)
    toks, probs = Proposer(d, ProposerConfig(use_context=False)).propose(ctx)
    assert toks.size == 0 and probs.size == 0
    toks, _ = Proposer(d).propose(ctx)  # no repeats in the context either
    assert toks.size == 0


def test_memory_per_token(tiny_tokenizer):
    from tests.tiny import training_texts

    base = training_texts(200)
    texts = [f"{t} #{i}" for i, t in zip(range(3000), itertools.cycle(base), strict=False)]
    d = BoundDraft.from_corpus(build_draft_corpus(references=texts), tiny_tokenizer)
    assert d.num_tokens > 3000 * 3
    per_token = d.nbytes() / d.num_tokens
    assert 4 <= per_token <= 32, per_token


# ---------------------------------------------------------------- one text draft, two tokenizers


def _docs(d: BoundDraft) -> list[list[int]]:
    cuts = np.flatnonzero(d.tokens == SEP)
    starts = np.concatenate([[0], cuts[:-1] + 1])
    return [d.tokens[s:e].tolist() for s, e in zip(starts, cuts, strict=True)]


def test_same_draft_binds_to_two_tokenizers(tiny_tokenizer, tmp_path):
    from tests.tiny import build_tiny_tokenizer

    other = build_tiny_tokenizer(tmp_path / "tok500", vocab_size=500)
    assert len(other) == 500 != len(tiny_tokenizer)
    corpus = build_draft_corpus(references=TEXTS, corpus_hash="abc")
    before = corpus.content_hash()
    bound = {}
    for name, tok in (("tiny", tiny_tokenizer), ("other", other)):
        d = BoundDraft.from_corpus(corpus, tok)
        docs = _docs(d)
        assert len(docs) == len(TEXTS)
        for doc, text in zip(docs, TEXTS, strict=True):
            assert doc[-1] == tok.eos_token_id
            assert tok.decode(doc[:-1]) == text
            assert doc[:-1] == tok(text, add_special_tokens=False)["input_ids"]
        # Lookups work in this tokenizer's ids: a text's first tokens continue as that text.
        ids = tok(TEXTS[2], add_special_tokens=False)["input_ids"]
        rows, n = d.continuations(np.array(ids[:4], dtype=np.int64), 6)
        assert n == 4 and rows[0].tolist() == (ids[4:] + [tok.eos_token_id, SEP] + [SEP] * 6)[:6]
        bound[name] = d
    assert bound["tiny"].num_tokens != bound["other"].num_tokens
    assert corpus.content_hash() == before  # the stored draft itself is untouched


# ---------------------------------------------------------------- storage


def test_write_read_round_trip(tmp_path):
    corpus = build_draft_corpus(references=TEXTS[:3], on_policy=TEXTS[3:], corpus_hash="c0ffee", meta={"n": 6})
    path = write_draft(corpus, tmp_path / "d" / "both.parquet")
    assert path.exists()
    back = read_draft(path)
    assert back.texts == corpus.texts
    assert back.source == "both"
    assert back.corpus_hash == "c0ffee"
    assert back.schema_version == DRAFT_SCHEMA_VERSION
    assert back.meta == {"n": 6}
    assert back.content_hash() == corpus.content_hash()
    check_compatible(back, "c0ffee")
    check_compatible(back, None)
    assert [p.name for p in path.parent.iterdir()] == ["both.parquet"]  # no temp file left


def test_truncated_parquet_fails_naming_file(tmp_path):
    path = write_draft(build_draft_corpus(references=TEXTS * 20), tmp_path / "t.parquet")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DraftError, match="truncated") as e:
        read_draft(path)
    assert str(path) in str(e.value)


def test_missing_file_fails_with_fix(tmp_path):
    with pytest.raises(DraftError, match="tasc draft SPEC") as e:
        read_draft(tmp_path / "nope.parquet")
    assert "nope.parquet" in str(e.value)


def test_parquet_without_metadata_is_not_a_draft(tmp_path):
    path = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"text": ["a", "b"]}), path)
    with pytest.raises(DraftError, match="not a tasc draft") as e:
        read_draft(path)
    assert str(path) in str(e.value)
    wrong = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"body": ["a"]}).replace_schema_metadata({b"tasc.schema_version": b"1"}), wrong)
    with pytest.raises(DraftError, match="'text' column"):
        read_draft(wrong)


def test_wrong_schema_version_fails_with_fix(tmp_path):
    old = DraftCorpus(texts=("a",), source="references", corpus_hash="h1", schema_version="0")
    back = read_draft(write_draft(old, tmp_path / "old.parquet"))
    assert back.schema_version == "0"
    with pytest.raises(DraftError, match=r"schema version '0'.*rebuild it with `tasc draft SPEC`"):
        check_compatible(back, "h1")


def test_other_corpus_hash_fails_with_fix(tmp_path):
    back = read_draft(write_draft(build_draft_corpus(references=["a"], corpus_hash="h1"), tmp_path / "d.parquet"))
    with pytest.raises(DraftError, match=r"built for corpus h1, not h2.*rebuild it with `tasc draft SPEC`"):
        check_compatible(back, "h2")


def test_compiled_walk_matches_the_numpy_reference():
    from tasc.accel import draft_kernels
    from tasc.decode.draft import walk_continuations_numpy

    if draft_kernels.library() is None:
        pytest.skip("no C compiler here: walk_continuations is the numpy reference itself")
    rng = np.random.default_rng(1)
    cases = [np.empty((0, 5), dtype=np.int64), np.array([[SEP, 1]], dtype=np.int64), np.array([[4, 5, 6]] * 3)]
    for _ in range(400):
        r, w = int(rng.integers(1, 70)), int(rng.integers(1, 20))
        rows = rng.integers(-1, 4, size=(r, w))  # few distinct ids: ties, SEPs and long agreeing runs
        rows[rng.random(r) < 0.5, : int(rng.integers(0, w + 1))] = 3
        cases.append(rows)
    for rows in cases:
        for max_len, prior in ((16, 1.0), (3, 0.5)):
            toks, probs = walk_continuations(rows, max_len, prior)
            ref_toks, ref_probs = walk_continuations_numpy(rows, max_len, prior)
            assert toks.tolist() == ref_toks.tolist()
            assert np.array_equal(probs, ref_probs)
            assert toks.dtype == np.int64 and probs.dtype == np.float64


def test_compiled_lookups_match_the_numpy_references(monkeypatch):
    from tasc.accel import draft_kernels
    from tasc.decode.draft import context_continuations
    from tasc.decode.proposer import Proposer

    if draft_kernels.library() is None:
        pytest.skip("no C compiler here: the numpy references run")
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, 6, size=5000).astype(np.int32)  # 6 ids: many hits, thinned to max_rows
    tokens[rng.random(5000) < 0.05] = SEP
    draft = BoundDraft(tokens, max_rows=16)
    for _ in range(300):
        ctx = rng.integers(0, 6, size=int(rng.integers(1, 40))).astype(np.int64)
        rows, n = draft.continuations(ctx, 12)
        ref_rows, ref_n = draft.continuations_numpy(ctx, 12)
        assert n == ref_n and np.array_equal(rows, ref_rows)
        compiled = Proposer(None)
        compiled.propose(ctx)  # the fused kernel records the match length
        monkeypatch.setattr("tasc.accel.draft_kernels.library", lambda: None)
        python = Proposer(None)
        _, got, got_n = python._context_rows(ctx)
        want, want_n = context_continuations(ctx, 16)
        assert got_n == want_n and np.array_equal(got, want) and python._span == compiled._span
        monkeypatch.undo()
    hits, _ = draft.continuations(np.array([1, 2], dtype=np.int64), 12)
    assert len(hits) == 16  # many occurrences: thinned to an even spread


def test_bound_draft_propose_compiled_equals_the_numpy_path(monkeypatch):
    """The fused lookup and walk of the compiled path and the path without a C compiler
    (numpy lookup, numpy walk) give the same drafts bitwise, with a scratch reused or not."""
    from tasc.accel import draft_kernels

    if draft_kernels.library() is None:
        pytest.skip("no C compiler here: the numpy path is the only one")
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, 6, size=4000).astype(np.int32)
    tokens[rng.random(4000) < 0.05] = SEP
    draft = BoundDraft(tokens, max_rows=32)
    contexts = [rng.integers(0, 6, size=int(rng.integers(1, 30))).astype(np.int64) for _ in range(200)]
    scratch = draft_kernels.Scratch(12)
    compiled = [draft.propose(ctx, 12, prior=0.7, scratch=scratch) for ctx in contexts]
    assert draft.propose(contexts[0], 12, prior=0.7)[0].tolist() == compiled[0][0].tolist()  # own scratch
    monkeypatch.setattr("tasc.accel.draft_kernels.library", lambda: None)
    drafted = 0
    for ctx, (toks, probs) in zip(contexts, compiled, strict=True):
        ref_toks, ref_probs = draft.propose(ctx, 12, prior=0.7)
        assert toks.tolist() == ref_toks.tolist() and np.array_equal(probs, ref_probs)
        drafted += len(toks)
    assert drafted > 0
