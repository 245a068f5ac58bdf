"""N-gram counting: the numpy kernel against a brute-force Counter, the lossless split,
text and token tables, and Parquet storage."""

from __future__ import annotations

import json
import random
from collections import Counter, defaultdict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage.ngram_tables import NgramTableError, read_ngram_table, write_ngram_table
from tasc.ngrams.counts import (
    TEXT_SCHEMA,
    TOKEN_SCHEMA,
    _sorted_runs,
    count_ngrams,
    count_text_ngrams,
    count_token_ngrams,
)
from tasc.ngrams.pretokens import encode_texts, split_words

TRICKY = [
    "",
    " ",
    "\n",
    "a",
    "  hello   world  ",
    "line one\nline two\r\n\ttabbed\t\t x",
    "don't you'll we've they're I'm he'd it's 'sdmt 'll've 'LL ''s x''s",
    " 's  'll\n'd\t've",
    "def f(x_1, y__2):\n    return x_1**2 + 3.14e-5  # comment\n",
    '{"intent": "GetWeather", "slots": {"city": "Paris"}}',
    "naïve café Straße ÀÉÎ 漢字かな 😀🙂 x²+y³ ٣٤ e\u0301 \u200b\u00a0\u2003end",
    "trailing spaces   ",
    "   leading",
    "\x00\x1c\x1f\x85 ctrl",
]


def random_texts(rng: random.Random, alphabet: str, docs: int, max_len: int) -> list[str]:
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, max_len))) for _ in range(docs)]


def brute_force(docs: list[list[int]], max_n: int, min_count: int) -> dict[tuple, tuple[int, int]]:
    count: Counter = Counter()
    in_docs: dict[tuple, set] = defaultdict(set)
    for d, doc in enumerate(docs):
        for n in range(1, max_n + 1):
            for i in range(len(doc) - n + 1):
                g = tuple(doc[i : i + n])
                count[g] += 1
                in_docs[g].add(d)
    return {g: (c, len(in_docs[g])) for g, c in count.items() if c >= min_count}


def kernel_result(docs: list[list[int]], max_n: int, min_count: int, dtype=np.int64) -> dict:
    ids = np.array([t for doc in docs for t in doc], dtype=dtype)
    offsets = np.zeros(len(docs) + 1, np.int64)
    np.cumsum([len(d) for d in docs], out=offsets[1:])
    levels = count_ngrams(ids, offsets, max_n, min_count)
    assert [lv.n for lv in levels] == list(range(1, max_n + 1))
    out = {}
    for lv in levels:
        assert lv.grams.dtype == np.int32 and lv.grams.shape == (lv.count.size, lv.n)
        assert lv.count.dtype == np.int64 and lv.doc_count.dtype == np.int64
        rows = [tuple(r) for r in lv.grams.tolist()]
        assert rows == sorted(rows) and len(set(rows)) == len(rows)
        for r, c, dc in zip(rows, lv.count.tolist(), lv.doc_count.tolist(), strict=True):
            out[r] = (c, dc)
    return out


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("min_count", [1, 2, 3])
def test_kernel_matches_brute_force(seed, min_count):
    rng = random.Random(seed)
    vocab = rng.choice([2, 3, 5, 40])
    docs = [
        [rng.randrange(vocab) for _ in range(rng.choice([0, 1, 2, 5, 30, 60]))]
        for _ in range(rng.randint(1, 12))
    ]
    max_n = rng.choice([1, 3, 6])
    dtype = np.int32 if seed % 2 else np.int64
    assert kernel_result(docs, max_n, min_count, dtype) == brute_force(docs, max_n, min_count)


def test_windows_never_cross_documents():
    got = kernel_result([[1, 2], [3, 4], [], [5, 1, 2]], max_n=4, min_count=1)
    assert (2, 3) not in got and (4, 5) not in got and (2, 5) not in got
    assert got[(1, 2)] == (2, 2) and got[(5, 1, 2)] == (1, 1)
    # the same document repeated: doc_count stays at 1, count sees every occurrence
    got = kernel_result([[7, 7, 7, 7]], max_n=3, min_count=2)
    assert got == {(7,): (4, 1), (7, 7): (3, 1), (7, 7, 7): (2, 1)}


def test_unpacked_sort_path_agrees():
    rng = np.random.default_rng(0)
    hi = rng.integers(0, 20, 500).astype(np.uint64)
    pos = np.arange(500, dtype=np.int64)
    doc = np.repeat(np.arange(50, dtype=np.int32), 10)
    packed = _sorted_runs(hi.copy(), 19, pos, doc, 2)
    fallback = _sorted_runs(hi.copy(), 2**62, pos, doc, 2)  # too wide to pack: stable argsort
    for a, b in zip(packed, fallback, strict=True):
        np.testing.assert_array_equal(a, b)


def test_kernel_rejects_bad_input():
    with pytest.raises(ValueError, match="offsets"):
        count_ngrams(np.arange(4), np.array([0, 3]), 2)
    with pytest.raises(ValueError, match="ids must lie"):
        count_ngrams(np.array([1, -1]), np.array([0, 2]), 2)
    with pytest.raises(ValueError, match="max_n"):
        count_ngrams(np.arange(3), np.array([0, 3]), 0)
    assert all(lv.count.size == 0 for lv in count_ngrams(np.zeros(0, np.int32), np.array([0]), 3))


@pytest.mark.parametrize("text", TRICKY)
def test_split_is_lossless(text):
    pieces = split_words(text)
    assert "".join(pieces) == text and all(pieces)


def test_split_follows_gpt2_rules():
    assert split_words("Hello world's  end!!\n") == ["Hello", " world", "'s", " ", " end", "!!", "\n"]
    assert split_words("x = 10\n\tif") == ["x", " =", " 10", "\n", "\t", "if"]


@pytest.mark.parametrize("seed", range(6))
def test_encode_texts_equals_split_words(seed):
    rng = random.Random(seed)
    alphabets = [" '\n\tsdmtlvreS!x", " \t\n\r\xa0'sdmtlvrex_Z09²٣!?.,(){}#éß漢🙂\u0301"]
    texts = TRICKY + random_texts(rng, alphabets[seed % 2], docs=60, max_len=25)
    rng.shuffle(texts)
    ids, offsets, vocab = encode_texts(texts)
    assert ids.dtype == np.int32 and offsets.dtype == np.int64 and vocab.type == pa.string()
    words = vocab.to_pylist()
    for d, text in enumerate(texts):
        assert [words[i] for i in ids[offsets[d] : offsets[d + 1]]] == split_words(text)


def test_encode_texts_rejects_lone_surrogates():
    with pytest.raises(ValueError, match="valid Unicode"):
        encode_texts(["ok", "bad \ud800"])


def test_text_level_counts_and_concatenation():
    rng = random.Random(3)
    words = [" the", " cat", " sat", ".", "\n", " on", "x", "'s", "  "]
    texts = ["".join(rng.choice(words) for _ in range(rng.randint(0, 15))) for _ in range(30)]
    table = count_text_ngrams(texts, max_n=4, min_count=2)
    assert table.schema.equals(TEXT_SCHEMA) and len(table) > 0
    assert json.loads(table.schema.metadata[b"tasc.ngrams"]) == {"level": "text", "max_n": 4, "min_count": 2}
    pieces = [split_words(t) for t in texts]
    vocab = {p: i for i, p in enumerate(sorted({p for ps in pieces for p in ps}))}
    expect = brute_force([[vocab[p] for p in ps] for ps in pieces], 4, 2)
    inv = {i: p for p, i in vocab.items()}
    by_text = {"".join(inv[i] for i in g): (len(g), c, dc) for g, (c, dc) in expect.items()}
    got = {r["ngram"]: (r["n"], r["count"], r["doc_count"]) for r in table.to_pylist()}
    assert got == by_text
    assert table.column("base_tokens").null_count == len(table) == table.column("gain").null_count
    # no tokenizer: count desc, then n desc, then text
    rows = [(-r["count"], -r["n"], r["ngram"]) for r in table.to_pylist()]
    assert rows == sorted(rows)


def test_text_level_base_tokens_and_gain(tiny_tokenizer):
    texts = [
        '{"intent": "GetWeather", "slots": {"city": "Paris"}}',
        '{"intent": "GetWeather", "slots": {}}',
    ] * 3
    table = count_text_ngrams(texts, max_n=6, min_count=2, tokenizer=tiny_tokenizer)
    rows = table.to_pylist()
    for r in rows:
        assert r["base_tokens"] == len(tiny_tokenizer.encode(r["ngram"], add_special_tokens=False))
        assert r["gain"] == r["count"] * (r["base_tokens"] - 1)
    keys = [(-r["gain"], -r["count"], -r["n"], r["ngram"]) for r in rows]
    assert keys == sorted(keys)
    assert rows[0]["gain"] > 0


def test_token_level(tiny_tokenizer):
    texts = ["def add(a, b):\n    return a + b\n", "def sub(a, b):\n    return a - b\n"] * 2
    seqs = [tiny_tokenizer.encode(t, add_special_tokens=False) for t in texts]
    table = count_token_ngrams(seqs, max_n=5, min_count=2, tokenizer=tiny_tokenizer)
    assert table.schema.equals(TOKEN_SCHEMA)
    expect = brute_force(seqs, 5, 2)
    rows = table.to_pylist()
    assert {tuple(r["token_ids"]): (r["count"], r["doc_count"]) for r in rows} == expect
    for r in rows:
        assert r["n"] == r["base_tokens"] == len(r["token_ids"])
        assert r["gain"] == r["count"] * (r["n"] - 1)
        assert r["ngram"] == tiny_tokenizer.decode(r["token_ids"], clean_up_tokenization_spaces=False)
    plain = count_token_ngrams([np.array(s) for s in seqs], max_n=5, min_count=2)
    assert plain.column("ngram").null_count == len(plain) == len(table)
    # without texts the tie-break falls back to the kernel's lexicographic id order
    assert sorted(plain.column("token_ids").to_pylist()) == sorted(table.column("token_ids").to_pylist())
    keys = [(-r["gain"], -r["count"], -r["n"], r["token_ids"]) for r in plain.to_pylist()]
    assert keys == sorted(keys)


def test_parquet_round_trip(tmp_path):
    table = count_token_ngrams([[1, 2, 3, 1, 2, 3], [1, 2]], max_n=3)
    path = write_ngram_table(
        table, tmp_path / "sub" / "t.parquet", {"corpus_version": "abc123", "task": "snips"}
    )
    back, meta = read_ngram_table(path)
    assert back.equals(table)
    assert meta == {"level": "token", "max_n": 3, "min_count": 2, "corpus_version": "abc123", "task": "snips"}
    md = pq.read_schema(path).metadata
    assert md[b"tasc.schema_version"] == b"1"
    assert pq.ParquetFile(path).metadata.row_group(0).column(0).compression == "ZSTD"


def test_write_needs_level_metadata(tmp_path):
    bare = count_text_ngrams(["a b a b"], max_n=2).replace_schema_metadata(None)
    with pytest.raises(ValueError, match="max_n"):
        write_ngram_table(bare, tmp_path / "x.parquet", {"level": "text"})
    with pytest.raises(ValueError, match="missing columns"):
        write_ngram_table(pa.table({"x": [1]}), tmp_path / "y.parquet", {})


def test_read_rejects_other_files(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not parquet")
    with pytest.raises(NgramTableError, match="notes.txt"):
        read_ngram_table(text)
    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"ngram": ["a"]}), plain)
    with pytest.raises(NgramTableError, match="plain.parquet.*no tasc metadata"):
        read_ngram_table(plain)
    with pytest.raises(NgramTableError, match="missing.parquet"):
        read_ngram_table(tmp_path / "missing.parquet")
