"""Throughput of n-gram counting on real completions.

Corpora: MBPP reference solutions (``code``) and SNIPS utterances, each replicated until
it holds at least ``--min-tokens`` pre-tokens. Replication makes every n-gram of the
original corpus frequent, so apriori pruning removes nothing: a worst case for the kernel.
No real tokenizer is available offline, so the token level counts the pre-token ids
(one list of ints per document, as a tokenizer would return them).

Reported per corpus and N, in corpus tokens (pre-tokens) per second: ``regex_split``
(the reference ``split_words`` per text, for comparison), ``split`` (``encode_texts``:
vectorised split + vocabulary), ``kernel`` (``count_ngrams`` on ids), ``text_incl_split``
(``count_text_ngrams``: texts -> table), ``text_excl_split`` (``text_ngram_table``: ids -> table),
``token`` (``count_token_ngrams``: id lists -> table).

    python -m benchmarks.bench_ngrams [--min-tokens 1000000] [--max-n 4,8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import time

from tasc.data.spec import default_data_dir
from tasc.ngrams.counts import (
    count_ngrams,
    count_text_ngrams,
    count_token_ngrams,
    encode_texts,
    split_words,
    text_ngram_table,
)

DATA = default_data_dir()


def mbpp_code() -> list[str]:
    with open(DATA / "mbpp" / "mbpp.jsonl", encoding="utf-8") as fh:
        return [json.loads(line)["code"].replace("\r\n", "\n") for line in fh if line.strip()]


def snips_utterances() -> list[str]:
    out = []
    for f in sorted((DATA / "snips" / "train").glob("*.json")):
        # One upstream file has a stray Latin-1 byte; replace it rather than fail.
        obj = json.loads(f.read_bytes().decode("utf-8", errors="replace"))
        for items in obj.values():
            out += ["".join(seg["text"] for seg in item["data"]) for item in items]
    return out


def _best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bench(name: str, texts: list[str], max_ns: list[int], min_tokens: int, repeats: int) -> list[dict]:
    base = sum(len(split_words(t)) for t in texts)
    texts = texts * max(1, -(-min_tokens // base))
    regex_s = _best(lambda: [split_words(t) for t in texts], repeats)
    split_s = _best(lambda: encode_texts(texts), repeats)
    ids, offsets, vocab = encode_texts(texts)
    seqs = [ids[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
    tokens = int(ids.size)
    rows = []
    for n in max_ns:
        res = {
            "corpus": name,
            "max_n": n,
            "docs": len(texts),
            "tokens": tokens,
            "distinct_corpus_tokens": base,
        }
        times = {
            "regex_split": regex_s,
            "split": split_s,
            "kernel": _best(lambda n=n: count_ngrams(ids, offsets, n, 2), repeats),
            "text_excl_split": _best(lambda n=n: text_ngram_table(ids, offsets, vocab, n, 2), repeats),
            "text_incl_split": _best(lambda n=n: count_text_ngrams(texts, n, 2), repeats),
            "token": _best(lambda n=n: count_token_ngrams(seqs, n, 2), repeats),
        }
        res["rows"] = int(sum(lv.count.size for lv in count_ngrams(ids, offsets, n, 2)))
        for k, s in times.items():
            res[f"{k}_s"] = round(s, 3)
            res[f"{k}_tok_per_s"] = int(tokens / s)
        rows.append(res)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--min-tokens", type=int, default=1_000_000)
    ap.add_argument("--max-n", default="4,8")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    max_ns = [int(x) for x in args.max_n.split(",")]
    results = []
    for name, load in (("mbpp_code", mbpp_code), ("snips_utterances", snips_utterances)):
        results += bench(name, load(), max_ns, args.min_tokens, args.repeats)
    print(json.dumps({"bench": "ngrams", "results": results}))
    cols = ("regex_split", "split", "kernel", "text_excl_split", "text_incl_split", "token")
    head = f"{'corpus':<17} {'N':>2} {'tokens':>9} {'rows':>7}" + "".join(f" {c:>15}" for c in cols)
    print(head + "\n" + "-" * len(head))
    for r in results:
        print(
            f"{r['corpus']:<17} {r['max_n']:>2} {r['tokens']:>9} {r['rows']:>7}"
            + "".join(f" {r[k + '_tok_per_s']:>15,}" for k in cols)
        )
    print("(corpus tokens per second; rows = frequent n-grams, min_count = 2)")


if __name__ == "__main__":
    main()
