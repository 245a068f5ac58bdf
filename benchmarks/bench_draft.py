"""Micro-benchmark of the TASC-spec draft index.

Builds the index over a corpus of real task outputs (SNIPS JSON completions and MBPP code,
tokenised with the default model's tokenizer, replicated to the target size) and reports:
index build throughput (corpus tokens/s, with and without tokenisation), memory per corpus
token, and proposal latency (p50/p99 per call) from contexts sampled out of the corpus.

    python -m benchmarks.bench_draft [--tokens 10000000]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from tasc.decode.draft import BoundDraft, build_draft_corpus
from tasc.decode.proposer import Proposer, ProposerConfig
from tasc.models import DEFAULT_MODEL


def real_texts() -> list[str]:
    from tasc.data.ingest import ingest
    from tasc.data.spec import load_spec

    texts = []
    for name in ("snips", "mbpp"):
        c = ingest(load_spec(name), policy="skip").corpus
        texts += c["completion"].tolist()
    return texts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=10_000_000)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--proposals", type=int, default=2000)
    args = ap.parse_args()
    from tasc.models import load_tokenizer

    tok = load_tokenizer(args.model)
    texts = real_texts()
    t = time.perf_counter()
    base = BoundDraft.from_corpus(build_draft_corpus(texts), tok)
    tokenise_s = time.perf_counter() - t
    reps = max(1, int(np.ceil(args.tokens / base.num_tokens)))
    tokens = np.tile(base.tokens, reps)[: args.tokens]
    t = time.perf_counter()
    draft = BoundDraft(tokens)
    build_s = time.perf_counter() - t
    rng = np.random.default_rng(0)
    lat = []
    # As in decoding: one Proposer per request, the context growing by a few tokens a step.
    for e in rng.integers(64, len(tokens) - 200, max(1, args.proposals // 20)):
        prop = Proposer(draft, ProposerConfig(use_context=True))
        stream = tokens[e - 64 : e + 100].astype(np.int64)
        stream = stream[stream >= 0]
        n = 48
        for _ in range(20):
            t = time.perf_counter()
            prop.propose(stream[:n])
            lat.append(time.perf_counter() - t)
            n = min(n + int(rng.integers(1, 5)), len(stream))
    lat_us = np.array(lat) * 1e6
    result = {
        "corpus_tokens": int(draft.num_tokens),
        "build_tokens_per_s": draft.num_tokens / build_s,
        "tokenise_and_build_tokens_per_s": base.num_tokens / tokenise_s,
        "bytes_per_token": draft.nbytes() / draft.num_tokens,
        "propose_us_p50": float(np.percentile(lat_us, 50)),
        "propose_us_p99": float(np.percentile(lat_us, 99)),
    }
    print(json.dumps(result))
    print(f"| corpus tokens | build tok/s | tokenise+build tok/s | bytes/token | propose p50 us | propose p99 us |\n"
          f"|---|---|---|---|---|---|\n| {result['corpus_tokens']:,} | {result['build_tokens_per_s']:,.0f} | "
          f"{result['tokenise_and_build_tokens_per_s']:,.0f} | {result['bytes_per_token']:.1f} | "
          f"{result['propose_us_p50']:.0f} | {result['propose_us_p99']:.0f} |")


if __name__ == "__main__":
    main()
