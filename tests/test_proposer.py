"""The proposer's gates: verify cost (best_length), confidence (min_prob) and calibration
(update)."""

from __future__ import annotations

import numpy as np
import pytest

from tasc.decode.draft import SEP, BoundDraft, context_continuations, walk_continuations
from tasc.decode.proposer import Proposer, ProposerConfig, best_length, expected_tokens


def test_expected_tokens():
    np.testing.assert_allclose(expected_tokens(np.array([0.5, 0.5])), [1.0, 1.5, 1.75])
    np.testing.assert_allclose(expected_tokens(np.empty(0)), [1.0])


def test_best_length_zero_when_drafting_is_a_loss():
    linear = np.arange(18, dtype=np.float64)  # an m-token verify costs m plain steps
    assert best_length(np.full(8, 0.95), linear) == 0
    steep = 1.0 + 0.5 * np.arange(-1, 17)  # cost[1] == 1, +0.5 per token
    steep[0] = 0.0
    assert best_length(np.full(8, 0.3), steep) == 0
    assert best_length(np.empty(0), np.ones(18)) == 0


def test_best_length_long_when_confident_and_cost_flat():
    flat = np.ones(18)
    assert best_length(np.full(8, 0.9), flat) == 8
    assert best_length(np.full(30, 0.9), flat) == 16  # bounded by the cost table
    # Moderate cost growth: a confident draft is still worth a few tokens, a weak one less.
    cost = np.concatenate([[0.0], 1.0 + 0.1 * np.arange(17)])
    strong = best_length(np.full(12, 0.95), cost)
    weak = best_length(np.full(12, 0.5), cost)
    assert strong > weak >= 0 and strong >= 4


def test_cost_table_is_extended():
    p = Proposer(None, ProposerConfig(max_len=8), cost=[0.0, 1.0, 1.2, 1.5])
    assert len(p.cost) == 10
    np.testing.assert_allclose(p.cost[:4], [0.0, 1.0, 1.2, 1.5])
    np.testing.assert_allclose(p.cost[4:6], [1.8, 2.1])  # linear from the last slope
    assert np.all(np.diff(p.cost) >= 0)


def _repeated_draft(rows: int = 9) -> BoundDraft:
    """``rows`` identical texts [1, 2, 3, 10, ..., 29]: after [2, 3] every row agrees, so each
    drafted token gets probability rows / (rows + 1)."""
    doc = [1, 2, 3, *range(10, 30)]
    return BoundDraft(np.array([t for _ in range(rows) for t in (*doc, SEP)], dtype=np.int32))


CONTEXT = np.array([1, 2, 3], dtype=np.int64)


@pytest.mark.parametrize(("min_prob", "expected_len"), [(0.8, 2), (0.5, 6), (0.15, 16), (0.95, 0)])
def test_min_prob_stops_the_draft(min_prob, expected_len):
    cfg = ProposerConfig(max_len=16, min_prob=min_prob, use_context=False)
    toks, probs = Proposer(_repeated_draft(), cfg).propose(CONTEXT)
    # 0.9 ** k >= min_prob: 0.81 / 0.53 / 0.185 for k = 2 / 6 / 16.
    assert len(toks) == len(probs) == expected_len
    assert toks.tolist() == list(range(10, 10 + expected_len))
    np.testing.assert_allclose(probs, 0.9)


def test_propose_respects_cost():
    cfg = ProposerConfig(max_len=16, use_context=False)
    toks, _ = Proposer(_repeated_draft(), cfg, cost=np.arange(18.0)).propose(CONTEXT)
    assert len(toks) == 0  # every extra token costs a full step: never worth it


def test_context_source_is_used_without_a_corpus():
    ctx = np.array([7, 8, 9, 4, 5, 7, 8, 9], dtype=np.int64)
    toks, _ = Proposer(None, ProposerConfig(min_prob=0.0)).propose(ctx)
    assert toks.tolist()[:2] == [4, 5]
    assert len(Proposer(None, ProposerConfig(use_context=False)).propose(ctx)[0]) == 0


@pytest.mark.parametrize("kernels", ["compiled", "python"])
def test_one_token_context_match_drafts_unless_switched_off(kernels, monkeypatch):
    """After the first token of a copied span only that token matches the prompt: the default
    drafts from it; context_min_n=2 (transformers-style two-token minimum) does not."""
    if kernels == "python":
        monkeypatch.setattr("tasc.accel.draft_kernels.library", lambda: None)
    ctx = np.array([3, 41, 42, 43, 44, 9, 8, 41], dtype=np.int64)  # 41 occurs once before the end
    toks, _ = Proposer(None, ProposerConfig(min_prob=0.0)).propose(ctx)
    assert toks.tolist()[:3] == [42, 43, 44]
    assert len(Proposer(None, ProposerConfig(min_prob=0.0, context_min_n=2)).propose(ctx)[0]) == 0


@pytest.mark.parametrize("kernels", ["compiled", "python"])
def test_context_proposals_follow_the_growing_context(kernels, monkeypatch):
    """One proposer over a request whose context grows: every proposal equals the walk over
    ``context_continuations`` of the context so far (the prompt-lookup reference), with the
    compiled scan and with the incremental index used where no C compiler is available."""
    if kernels == "python":
        monkeypatch.setattr("tasc.accel.draft_kernels.library", lambda: None)
    rng = np.random.default_rng(5)
    cfg = ProposerConfig(max_len=8, min_prob=0.0, use_corpus=False, context_span=False)
    # Random stretches, then a periodic one (more than 16 earlier occurrences of each suffix).
    seq = np.concatenate([rng.integers(0, 4, 60), rng.integers(0, 3, 100), np.tile([0, 1, 2], 30)]).astype(np.int64)
    p = Proposer(None, cfg)
    spans = Proposer(None, ProposerConfig(max_len=8, use_corpus=False))
    drafted = 0
    L = 1
    while L <= len(seq):
        toks, probs = p.propose(seq[:L])
        spans.propose(seq[:L])
        if spans._span:  # the match length the compiled scan and the index agree on (both paths run)
            e = len(seq[:L]) - 1
            assert spans._span >= 1 and (spans._span == 64 or spans._span <= e)
        rows, _ = context_continuations(seq[:L], cfg.max_len)
        exp_toks, exp_probs = walk_continuations(rows, cfg.max_len, prior=cfg.context_prior)
        assert toks.tolist() == exp_toks.tolist(), L
        np.testing.assert_allclose(probs, np.minimum(exp_probs, 0.99))
        drafted += len(toks)
        L += int(rng.integers(1, 4))  # grows by 1-3 tokens per step, like accepted runs
    assert drafted > 0


def test_update_lowers_trust_after_rejections_and_raises_after_acceptances():
    p = Proposer(_repeated_draft(), ProposerConfig(use_context=False))
    probs = np.full(6, 0.9)
    p.update(probs, 0)
    assert p.trust["corpus"] < 1.0
    low = p.trust["corpus"]
    for _ in range(50):
        p.update(probs, 0)
    assert 0.3 <= p.trust["corpus"] < low  # bounded below
    assert p.trust["corpus"] == pytest.approx(0.3)
    assert p.proposed == 51 * 6 and p.accepted == 0
    # Lower trust scales the estimates down, which shortens the draft under min_prob.
    toks, est = p.propose(CONTEXT)
    assert len(toks) < 6 and np.all(est <= 0.9 * 0.3 + 1e-12)

    q = Proposer(None)
    weak = np.full(4, 0.5)
    q.update(weak, 4)
    assert q.trust["corpus"] > 1.0
    for _ in range(50):
        q.update(weak, 4)
    assert q.trust["corpus"] == pytest.approx(1.5)  # bounded above
    q.update(np.empty(0), 0)  # no draft, no feedback
    assert q.trust["corpus"] == pytest.approx(1.5) and q.proposed == 51 * 4
    assert q.trust["context"] == 1.0  # each source is calibrated on its own proposals


def test_trust_is_kept_per_source():
    p = Proposer(None)  # context n-grams only
    ctx = np.array([5, 6, 7, 8, 9, 5, 6, 7, 8], dtype=np.int64)
    toks, probs = p.propose(ctx)
    assert toks.tolist()[:1] == [9] and p._source == "context"
    p.update(probs, 0)
    assert p.trust["context"] < 1.0 and p.trust["corpus"] == 1.0


def test_proposers_of_one_run_share_their_calibration():
    from tasc.decode.proposer import new_trust

    trust = new_trust()
    first, second = Proposer(None, trust=trust), Proposer(None, trust=trust)
    ctx = np.array([5, 6, 7, 8, 9, 5, 6, 7, 8], dtype=np.int64)
    _, probs = first.propose(ctx)
    for _ in range(5):
        first.update(probs, len(probs))  # the context source keeps being right
    assert trust["context"] > 1.0 and second.trust["context"] == trust["context"]
    _, boosted = second.propose(ctx)  # the next request starts from what the first learned
    _, fresh = Proposer(None).propose(ctx)
    assert len(boosted) >= len(fresh) and boosted[0] > fresh[0]


def test_a_long_copied_span_is_trusted_more_than_a_short_match():
    passage = list(range(100, 140))
    copying = np.array(passage + [7, 8] + passage[:12], dtype=np.int64)  # the answer copies 12 tokens
    short = np.array(passage + [7, 8] + [1, 2, 3, 4, 5, 6, 7, 8] + passage[8:12], dtype=np.int64)
    cfg = ProposerConfig(use_corpus=False, min_prob=0.0)
    p, q = Proposer(None, cfg), Proposer(None, cfg)
    long_toks, long_probs = p.propose(copying)
    short_toks, short_probs = q.propose(short)
    assert p._span == 12 and q._span == 4
    assert long_toks[:4].tolist() == short_toks[:4].tolist() == passage[12:16]
    assert long_probs[0] > short_probs[0]
    off = Proposer(None, ProposerConfig(use_corpus=False, min_prob=0.0, context_span=False))
    assert off.propose(copying)[1][0] == pytest.approx(short_probs[0])


def _fold_case(tokenizer):
    """A context whose output starts a word the prompt has with a leading space: the ids
    differ ('book' vs ' book'), the folded keys agree."""
    prompt = tokenizer("Please book a table for two", add_special_tokens=False)["input_ids"]
    start = tokenizer('{"intent": "book', add_special_tokens=False)["input_ids"]
    return np.array(prompt + start, dtype=np.int64), prompt


@pytest.mark.parametrize("compiled", [True, False])
def test_folded_context_match_drafts_a_word_copied_without_its_space(tiny_tokenizer, compiled, monkeypatch):
    from tasc.decode.draft import DraftCorpus, space_fold_keys

    if not compiled:
        monkeypatch.setattr("tasc.accel.draft_kernels.library", lambda: None)
    keys = space_fold_keys(tiny_tokenizer)
    vocab = tiny_tokenizer.get_vocab()
    assert keys[vocab["\u0120book"]] == vocab["book"] and keys[vocab["book"]] == vocab["book"]
    assert keys[vocab["<|im_end|>"]] == vocab["<|im_end|>"]  # no marker: the id itself
    assert keys[vocab["\u0120\u010a\u0120\u0120\u0120"]] != vocab["\u010a\u0120\u0120\u0120"]  # whitespace: not a word
    context, prompt = _fold_case(tiny_tokenizer)
    assert vocab["book"] in context.tolist() and vocab["\u0120book"] in prompt  # different ids
    after = context.tolist()[prompt.index(vocab["\u0120book"]) + 1 :]  # what follows the word there
    empty = BoundDraft.from_corpus(DraftCorpus(texts=(), source="references", corpus_hash=""), tiny_tokenizer)
    cfg = ProposerConfig(use_corpus=False, min_prob=0.0)
    toks, _ = Proposer(empty, cfg, cost=np.ones(20)).propose(context)
    assert toks.tolist() == after[: len(toks)] and len(toks) >= 2
    # Without folding the copied word matches nothing in the prompt, so there is no draft.
    plain = Proposer(empty, ProposerConfig(use_corpus=False, min_prob=0.0, context_fold_spaces=False), np.ones(20))
    assert len(plain.propose(context)[0]) == 0
    # The reference agrees on the rows when given the folded keys.
    rows, n = context_continuations(context, 8, keys=keys[context])
    assert n >= 1 and rows[0, : len(after)].tolist()[: min(8, len(after))] == after[:8]
    assert context_continuations(context, 8)[1] == 0


@pytest.mark.parametrize("compiled", [True, False])
def test_exact_context_match_wins_over_a_folded_one(tiny_tokenizer, compiled, monkeypatch):
    """Folding is a fallback: where the ids themselves match, their rows are drafted and the
    calibration is charged to "context", not "fold"."""
    from tasc.decode.draft import DraftCorpus

    if not compiled:
        monkeypatch.setattr("tasc.accel.draft_kernels.library", lambda: None)
    tok = tiny_tokenizer
    ids = tok('{"intent": "book", "x": 1} {"intent": "book', add_special_tokens=False)["input_ids"]
    empty = BoundDraft.from_corpus(DraftCorpus(texts=(), source="references", corpus_hash=""), tok)
    p = Proposer(empty, ProposerConfig(use_corpus=False, min_prob=0.0), cost=np.ones(20))
    toks, probs = p.propose(np.array(ids, dtype=np.int64))
    first = tok('{"intent": "book', add_special_tokens=False)["input_ids"]
    assert toks.tolist()[:2] == ids[len(first) : len(first) + 2]
    assert p._source == "context"
    p.update(probs, 0)
    assert p.trust["context"] < 1.0 and p.trust["fold"] == 1.0


def test_folded_matches_agree_between_compiled_and_python_paths_as_the_context_grows(tiny_tokenizer, monkeypatch):
    """Step by step over a growing context, the compiled proposer and the incremental Python
    index give the same drafts and sources, folded matches included (the fold index must take
    every new position, also in steps where an exact match answered)."""
    from tasc.accel import draft_kernels
    from tasc.decode.draft import DraftCorpus

    if draft_kernels.library() is None:
        pytest.skip("no C compiler here: the numpy references run")
    tok = tiny_tokenizer
    # ' book' twice: the second is indexed in a step where the exact ' book' matches, and the
    # later '"book' must fold onto both occurrences, not only onto the first.
    text = 'Please book a table for two. Then book a room for one. {"intent": "book a room", "n": "one"}'
    ids = np.array(tok(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
    empty = BoundDraft.from_corpus(DraftCorpus(texts=(), source="references", corpus_hash=""), tok)
    cfg = ProposerConfig(use_corpus=False, min_prob=0.0)
    compiled = Proposer(empty, cfg, cost=np.ones(20))
    python = Proposer(empty, cfg, cost=np.ones(20))
    sources = set()
    for L in range(2, len(ids) + 1):
        want = compiled.propose(ids[:L])
        monkeypatch.setattr("tasc.accel.draft_kernels.library", lambda: None)
        got = python.propose(ids[:L])
        monkeypatch.undo()
        assert got[0].tolist() == want[0].tolist(), L
        np.testing.assert_allclose(got[1], want[1], err_msg=str(L))  # same rows behind the estimates
        assert python._source == compiled._source, L
        sources.add(compiled._source)
    assert "fold" in sources and "context" in sources
