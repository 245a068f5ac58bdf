"""Batched decoding on the tiny real model: every row's tokens equal plain single-request
greedy decoding (engine.decode, no draft) for batch sizes 1-4, with no draft, with scripted
drafts that are right for a random number of tokens and then wrong (so rows accept
different lengths in the same step), and with the real Proposer; plus the EOS, budget and
stop-string exits, seeded sampling, stats, errors and the batch benchmark's report.

Exactness caveat (fp32): a batched pass runs other matmul shapes than a one-row pass, so a
logit can differ in its last bits. Where the model's top two logits are within that
rounding (a near-tie), the two runs may pick different tokens. ``_assert_same`` accepts a
divergence only at such a tie (top-2 gap < TIE in a plain unbatched forward) and only as a
rare event; everything else must be token-identical."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM

from tasc.data.prompts import encode_prompts
from tasc.decode.batch_engine import decode_batch, generate_batch
from tasc.decode.draft import SEP, BoundDraft, build_draft_corpus
from tasc.decode.engine import DecodeConfig, decode
from tasc.decode.proposer import Proposer

PROMPTS = [
    "What is the weather in Paris?",
    "Write a function to add two numbers.",
    "Book a table for two at 8pm",
    "Play some jazz music",
    "def f(x):",
    "hello",
    "Write a python function to find the minimum of three numbers.",
    "Will it rain tomorrow in London?",
]
MAX_NEW = 32
TIE = 1e-4  # fp32 logits of the tiny model are O(10): a gap this small is rounding noise


@pytest.fixture(scope="module", params=["torch", "auto"])
def lm(request, tiny_lm, tiny_model_dir):
    """The tiny model with transformers' layers, and with tasc's CPU kernels (packed linears,
    grouped attention), whose masks must carry padding and the per-row holes as well."""
    if request.param == "torch":
        return tiny_lm
    from tasc.models import load_model

    loaded = load_model(str(tiny_model_dir), dtype="float32", device="cpu", kernels="auto")
    if loaded.kernels == "torch":
        pytest.skip("the CPU kernels are not available here")
    return loaded


@pytest.fixture(scope="module")
def ids(lm):
    return encode_prompts(lm.tokenizer, PROMPTS, None, True)


@pytest.fixture(scope="module")
def greedy(lm, ids):
    """The reference: plain single-request greedy decoding of every prompt."""
    return [decode(lm.model, lm.tokenizer, p, None, DecodeConfig(max_new_tokens=MAX_NEW)) for p in ids]


def _assert_same(lm, prompt_ids, got: list[int], want: list[int], ties: list) -> None:
    """got == want, or they part at a near-tie of the unbatched model (recorded in ``ties``)."""
    if got == want:
        return
    d = next((t for t in range(min(len(got), len(want))) if got[t] != want[t]), None)
    assert d is not None, f"one output is a prefix of the other: {got} vs {want}"
    with torch.inference_mode():
        logits = lm.model(torch.tensor([list(prompt_ids) + want[:d]])).logits[0, -1]
    gap = abs(float(logits[got[d]] - logits[want[d]]))
    top = float(logits.max())
    assert gap < TIE and top - max(float(logits[got[d]]), float(logits[want[d]])) < TIE, (
        f"diverged at token {d}: {got[d]} vs {want[d]}, logit gap {gap:.3g} is not a near-tie")
    ties.append((d, gap))
    warnings.warn(f"batched and single decoding part at a near-tie (token {d}, logit gap {gap:.2g})", stacklevel=2)


class ScriptedProposer:
    """Drafts from the known greedy continuation: k in 0..6 tokens, of which a random number
    are right and the rest wrong, so the accepted length is known in advance."""

    def __init__(self, prompt_len: int, ref: list[int], vocab: int, seed: int):
        self.prompt_len, self.ref, self.vocab = prompt_len, ref, vocab
        self.rng = np.random.default_rng(seed)
        self.good = 0
        self.log: list[tuple[int, int, int]] = []  # (drafted, expected accepted, accepted)

    def propose(self, ctx: np.ndarray):
        true = self.ref[len(ctx) - self.prompt_len :]
        k = int(self.rng.integers(0, 7))
        self.good = min(int(self.rng.integers(0, k + 1)), len(true))
        draft = list(true[: self.good])
        while len(draft) < k:
            t = int(self.rng.integers(0, self.vocab))
            if len(draft) == self.good and len(true) > self.good and t == true[self.good]:
                continue  # the first wrong token must really be wrong
            draft.append(t)
        return np.array(draft, dtype=np.int64), np.full(len(draft), 0.5)

    def update(self, probs: np.ndarray, n_accepted: int) -> None:
        self.log.append((len(probs), min(self.good, len(probs)), n_accepted))


def _scripted(lm, ids, greedy, seed):
    return [ScriptedProposer(len(p), g.token_ids, len(lm.tokenizer), seed + i)
            for i, (p, g) in enumerate(zip(ids, greedy, strict=True))]


def _batches(n: int, bs: int):
    return [list(range(s, min(s + bs, n))) for s in range(0, n, bs)]


@pytest.mark.parametrize("bs", [1, 2, 3, 4])
def test_batched_greedy_equals_single(lm, ids, greedy, bs):
    ties: list = []
    out = generate_batch(lm.model, lm.tokenizer, PROMPTS, method="greedy",
                         config=DecodeConfig(max_new_tokens=MAX_NEW), batch_size=bs)
    for p, o, g in zip(ids, out, greedy, strict=True):  # input order, though batches are length-sorted
        _assert_same(lm, p, o.token_ids, g.token_ids, ties)
        if o.token_ids == g.token_ids:
            assert o.text == g.text
            assert o.stats.forward_passes == g.stats.forward_passes == MAX_NEW
        assert o.stats.prompt_tokens == len(p) and o.stats.new_tokens == len(o.token_ids)
        assert o.stats.chars == len(o.text) and o.stats.drafted == 0
        assert 0 < o.stats.first_token_s <= o.stats.latency_s
    assert len(ties) <= 1, ties
    if bs == 1:
        assert not ties  # one row: the same shapes as engine.decode


@pytest.mark.parametrize("bs", [1, 2, 3, 4])
def test_batched_spec_with_scripted_drafts_equals_greedy(lm, ids, greedy, bs):
    """Rows draft 0-6 tokens per step, right for a random prefix: different draft lengths
    and different accepted lengths in the same pass; each row accepts exactly its right part."""
    props = _scripted(lm, ids, greedy, seed=100 * bs)
    cfg = DecodeConfig(max_new_tokens=MAX_NEW)
    ties: list = []
    for rows in _batches(len(ids), bs):
        out = decode_batch(lm.model, lm.tokenizer, [ids[i] for i in rows], [props[i] for i in rows], cfg)
        for i, o in zip(rows, out, strict=True):
            _assert_same(lm, ids[i], o.token_ids, greedy[i].token_ids, ties)
            if o.token_ids == greedy[i].token_ids:
                assert o.text == greedy[i].text
                assert all(exp == acc for _, exp, acc in props[i].log), props[i].log
                assert o.stats.drafted == sum(d for d, _, _ in props[i].log)
                assert o.stats.accepted == sum(a for _, _, a in props[i].log)
                assert o.stats.forward_passes < MAX_NEW
    assert len(ties) <= 1, ties
    assert sum(a for p in props for _, _, a in p.log) > 0
    assert sum(d - a for p in props for d, _, a in p.log) > 0  # rejections happened too


@pytest.mark.parametrize("bs", [2, 4])
def test_generate_batch_spec_with_bound_draft_equals_greedy(lm, ids, greedy, bs):
    """The real Proposer, drafting from half the greedy outputs plus unrelated texts."""
    texts = [g.text for g in greedy[::2]] + ["def add(a, b):\n    return a + b", "Play the song by Adele"]
    draft = BoundDraft.from_corpus(build_draft_corpus(on_policy=texts), lm.tokenizer)
    out = generate_batch(lm.model, lm.tokenizer, PROMPTS, draft=draft, method="tasc-spec",
                         config=DecodeConfig(max_new_tokens=MAX_NEW), batch_size=bs)
    ties: list = []
    for p, o, g in zip(ids, out, greedy, strict=True):
        _assert_same(lm, p, o.token_ids, g.token_ids, ties)
        assert o.stats.accepted <= o.stats.drafted
    assert len(ties) <= 1, ties
    assert sum(o.stats.accepted for o in out) > 0
    assert sum(o.stats.forward_passes for o in out) < 0.8 * sum(g.stats.forward_passes for g in greedy)


@pytest.mark.parametrize("max_new", [1, 2, 7])
def test_max_new_tokens_is_exact(lm, ids, greedy, max_new):
    cfg = DecodeConfig(max_new_tokens=max_new)
    props = _scripted(lm, ids, greedy, seed=7)
    out = decode_batch(lm.model, lm.tokenizer, ids[:4], props[:4], cfg)
    for o, g in zip(out, greedy, strict=False):
        assert o.token_ids == g.token_ids[:max_new] and o.stats.new_tokens == max_new


def test_eos_and_stop_strings_end_rows_at_different_steps(tiny_model_dir, lm, ids, greedy):
    """A second EOS id (common in the outputs, drafted through) and a stop string: rows end
    mid-run at different steps and leave the batch; the others go on unchanged."""
    from collections import Counter

    from tasc.models import load_model

    counts = Counter(t for g in greedy for t in g.token_ids[2:])
    stop_tok = counts.most_common(1)[0][0]
    eos_lm = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    eos_lm.model.generation_config.eos_token_id = [eos_lm.tokenizer.eos_token_id, stop_tok]
    eos = eos_lm.tokenizer.eos_token_id
    draft = BoundDraft(np.array([t for g in greedy for t in (*g.token_ids, eos, SEP)], dtype=np.int32))
    word = next(w for w in greedy[1].text.split() if len(w) >= 3 and greedy[1].text.index(w) >= 8)
    for cfg in (DecodeConfig(max_new_tokens=MAX_NEW), DecodeConfig(max_new_tokens=MAX_NEW, stop=(word, "@@"))):
        want = [decode(eos_lm.model, eos_lm.tokenizer, p, None, cfg) for p in ids]
        got = decode_batch(eos_lm.model, eos_lm.tokenizer, ids, [Proposer(draft) for _ in ids], cfg)
        ties: list = []
        for p, o, w in zip(ids, got, want, strict=True):
            _assert_same(eos_lm, p, o.token_ids, w.token_ids, ties)
            if o.token_ids == w.token_ids:
                assert o.text == w.text
            assert stop_tok not in o.token_ids
        assert len(ties) <= 1, ties
        lengths = {len(w.token_ids) for w in want}
        assert len(lengths) >= 3  # rows really end at different points
        assert sum(o.stats.accepted for o in got) > 0


def test_sampling_matches_single_request_sampling(lm, ids, greedy):
    """With a temperature each row draws from its own generator seeded like engine.decode's."""
    draft = BoundDraft.from_corpus(build_draft_corpus(on_policy=[g.text for g in greedy]), lm.tokenizer)
    cfg = DecodeConfig(max_new_tokens=16, temperature=1.0, seed=3)
    got = decode_batch(lm.model, lm.tokenizer, ids[:3], [Proposer(draft) for _ in range(3)], cfg)
    want = [decode(lm.model, lm.tokenizer, p, Proposer(draft), cfg) for p in ids[:3]]
    assert [o.token_ids for o in got] == [w.token_ids for w in want]


def test_errors(lm, ids):
    with pytest.raises(ValueError, match="unknown method"):
        generate_batch(lm.model, lm.tokenizer, ["hi"], method="beam")
    with pytest.raises(ValueError, match="batch_size"):
        generate_batch(lm.model, lm.tokenizer, ["hi"], method="greedy", batch_size=0)
    with pytest.raises(ValueError, match="proposers"):
        decode_batch(lm.model, lm.tokenizer, ids[:2], [None], DecodeConfig())
    with pytest.raises(ValueError, match="at least one token"):
        decode_batch(lm.model, lm.tokenizer, [ids[0], []], None, DecodeConfig())
    assert decode_batch(lm.model, lm.tokenizer, [], None, DecodeConfig()) == []
    cfg = MistralConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, sliding_window=8)
    with pytest.raises(NotImplementedError, match="sliding-window"):
        decode_batch(MistralForCausalLM(cfg), lm.tokenizer, [[1, 2]], None, DecodeConfig())


def test_bench_batch_report(lm, greedy):
    from benchmarks.bench_batch import compare, markdown_table

    texts = [g.text for g in greedy]
    draft = BoundDraft.from_corpus(build_draft_corpus(on_policy=texts), lm.tokenizer)
    report = compare(lm, PROMPTS[:5], 2, draft, DecodeConfig(max_new_tokens=8), warmup=1)
    assert set(report["methods"]) == {"greedy-b1", "tasc-spec-b1", "greedy-b2", "tasc-spec-b2"}
    b1, b2 = report["methods"]["greedy-b1"], report["methods"]["greedy-b2"]
    assert b1["model_passes"] == b1["row_passes"] == 5 * 8
    assert b2["row_passes"] == 5 * 8 and b2["model_passes"] == 3 * 8  # groups of 2, 2, 1
    for e in report["methods"].values():
        assert e["identical_tokens"] >= 0.8 and e["chars_per_s"] > 0
    table = markdown_table(report)
    assert table.count("\n| ") == 4 and "tasc-spec-b2" in table


@pytest.mark.parametrize("dtype", ["q8_0", "q4_1"])
def test_batches_on_the_fused_quantised_step_are_bitwise_single_decoding(tiny_model_dir, dtype):
    """The default CPU path batches through the fused step: every request keeps its own cache
    and runs engine.decode's steps, the rows of all requests share each pass. Tokens and
    forward passes per request are exactly single decoding's, near ties included (head rows
    made near copies), for greedy and TASC-spec, while the model runs fewer passes in all."""
    from tasc.models import load_model

    qlm = load_model(str(tiny_model_dir), dtype=dtype, device="cpu", kernels="auto")
    if "fused-step" not in qlm.kernels:
        pytest.skip("the fused step does not run here")
    lean, cfg = qlm.backend.lean, DecodeConfig(max_new_tokens=MAX_NEW)
    head = qlm.model.get_output_embeddings().weight
    with torch.no_grad():
        top = head[:200].clone()
        head[200:400] = top + 1e-4 * torch.randn(top.shape, generator=torch.Generator().manual_seed(0))
    single = [decode(qlm.backend, qlm.tokenizer, p, None, cfg) for p in encode_prompts(qlm.tokenizer, PROMPTS, None, True)]
    draft = BoundDraft.from_corpus(build_draft_corpus(on_policy=[o.text for o in single], corpus_hash="t"),
                                   qlm.tokenizer)
    for method in ("greedy", "tasc-spec"):
        for bs in (3, len(PROMPTS)):
            before = lean.steps
            out = generate_batch(qlm.model, qlm.tokenizer, PROMPTS, draft=draft, method=method, config=cfg,
                                 batch_size=bs)
            assert [o.token_ids for o in out] == [w.token_ids for w in single]
            if method == "greedy":  # (drafts adapt to what the batch's proposers saw before)
                assert [o.stats.forward_passes for o in out] == [w.stats.forward_passes for w in single]
            else:
                assert sum(o.stats.accepted for o in out) > 0
            assert lean.steps - before < sum(o.stats.forward_passes for o in out)  # passes were shared
