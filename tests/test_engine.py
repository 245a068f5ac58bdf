"""The decoding engine on a tiny real model: plain greedy against transformers' generate,
speculative decoding token-identical to greedy (with on-policy, reference-only and no task
draft), the length, stop-string and EOS exits, the sampling accept/reject rule and the
verify-cost table."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest
import torch

from tasc.data.prompts import encode_prompts, render_prompt
from tasc.decode import engine
from tasc.decode.draft import SEP, BoundDraft, build_draft_corpus
from tasc.decode.engine import DecodeConfig, decode, measure_verify_cost, verify_draft
from tasc.decode.proposer import Proposer
from tasc.models import load_model

PROMPTS = [
    "What is the weather in Paris?",
    "Write a function to add two numbers.",
    "Book a table for two at 8pm",
    "Play some jazz music",
    "def f(x):",
    "Find the shared elements from the given two lists.",
    "Rate this book 5 stars",
    "Add this song to my playlist",
    "hello",
    "Write a python function to find the minimum of three numbers.",
    "GetWeather city",
    "Will it rain tomorrow in London?",
]
OTHER_PROMPTS = ["Search for a movie schedule", "Write a function to reverse a string.", "Is it cold?"]
MAX_NEW = 48


@pytest.fixture(scope="module")
def lm(tiny_lm):
    return tiny_lm


@pytest.fixture(scope="module")
def greedy(lm):
    """Plain greedy outputs for PROMPTS + OTHER_PROMPTS."""
    cfg = DecodeConfig(max_new_tokens=MAX_NEW)
    return engine.generate(lm.model, lm.tokenizer, PROMPTS + OTHER_PROMPTS, method="greedy", config=cfg)


@pytest.fixture(scope="module")
def on_policy_draft(lm, greedy):
    corpus = build_draft_corpus(on_policy=[o.text for o in greedy], corpus_hash="test")
    assert corpus.source == "on-policy"
    return BoundDraft.from_corpus(corpus, lm.tokenizer)


def _hf_greedy(lm, ids: list[int], max_new: int, eos) -> list[int]:
    x = torch.tensor([ids])
    with torch.inference_mode():
        out = lm.model.generate(
            input_ids=x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=max_new,
            eos_token_id=eos, pad_token_id=lm.tokenizer.pad_token_id,
        )
    return out[0, len(ids):].tolist()


def test_greedy_equals_transformers_generate(lm, greedy):
    ids = encode_prompts(lm.tokenizer, PROMPTS[:4], None, True)
    rendered = render_prompt(lm.tokenizer, PROMPTS[0])
    assert rendered.startswith("<|im_start|>user\n") and rendered.endswith("<|im_start|>assistant\n")
    assert ids[0] == lm.tokenizer(rendered, add_special_tokens=False)["input_ids"]
    for p_ids, out in zip(ids, greedy[:4], strict=True):
        ref = _hf_greedy(lm, p_ids, MAX_NEW, lm.tokenizer.eos_token_id)
        assert out.token_ids == ref
        assert out.text == lm.tokenizer.decode(ref, skip_special_tokens=True)
        assert out.stats.new_tokens == len(out.token_ids) == MAX_NEW  # the tiny model never emits EOS here
        assert out.stats.forward_passes == MAX_NEW  # one prefill + one pass per further token
        assert out.stats.prompt_tokens == len(p_ids)


@pytest.mark.parametrize("kind", ["on-policy", "references", "none"])
def test_spec_is_token_identical_to_greedy(lm, greedy, on_policy_draft, kind):
    from tests.tiny import training_texts

    if kind == "on-policy":
        draft = on_policy_draft
    elif kind == "references":
        draft = BoundDraft.from_corpus(build_draft_corpus(references=training_texts(60)), lm.tokenizer)
    else:
        draft = None
    # All prompts with the on-policy draft; half of them (to save time) with the others.
    prompts = PROMPTS if kind == "on-policy" else PROMPTS[:6]
    cfg = DecodeConfig(max_new_tokens=MAX_NEW)
    spec = engine.generate(lm.model, lm.tokenizer, prompts, draft=draft, method="tasc-spec", config=cfg)
    base = greedy[: len(prompts)]
    for s, g in zip(spec, base, strict=True):
        assert s.token_ids == g.token_ids
        assert s.text == g.text
        assert s.stats.accepted <= s.stats.drafted
        assert 0 < s.stats.first_token_s <= s.stats.latency_s  # the prompt's pass, timed
    spec_passes = sum(o.stats.forward_passes for o in spec)
    greedy_passes = sum(o.stats.forward_passes for o in base)
    assert spec_passes <= greedy_passes
    if kind == "on-policy":
        # The draft holds these very outputs: most of each one is drafted and accepted.
        assert sum(o.stats.accepted for o in spec) > 0
        assert spec_passes < 0.6 * greedy_passes


def test_unknown_method_fails(lm):
    with pytest.raises(ValueError, match="unknown method"):
        engine.generate(lm.model, lm.tokenizer, ["hi"], method="beam")


@pytest.mark.parametrize("max_new", [1, 2, 7, 19])
def test_max_new_tokens_is_exact(lm, greedy, on_policy_draft, max_new):
    cfg = DecodeConfig(max_new_tokens=max_new)
    prompts = PROMPTS[:3]
    g = engine.generate(lm.model, lm.tokenizer, prompts, method="greedy", config=cfg)
    s = engine.generate(lm.model, lm.tokenizer, prompts, draft=on_policy_draft, method="tasc-spec", config=cfg)
    for gi, si, full in zip(g, s, greedy, strict=False):
        assert len(gi.token_ids) == len(si.token_ids) == max_new
        assert gi.token_ids == si.token_ids == full.token_ids[:max_new]
        assert si.stats.new_tokens == max_new


def _pick_stop(text: str) -> str | None:
    """An ASCII word of 3+ letters in the second half of ``text`` (a stop string that occurs)."""
    for m in re.finditer(r"[A-Za-z]{3,}", text):
        if m.start() >= 12:
            return m.group(0)
    return None


def test_stop_strings(lm, greedy, on_policy_draft):
    ids = encode_prompts(lm.tokenizer, PROMPTS, None, True)
    checked = 0
    for p_ids, full in zip(ids, greedy, strict=False):
        stop = _pick_stop(full.text)
        if stop is None:
            continue
        cfg = DecodeConfig(max_new_tokens=MAX_NEW, stop=(stop, "@@never@@"))
        g = decode(lm.model, lm.tokenizer, p_ids, None, cfg)
        s = decode(lm.model, lm.tokenizer, p_ids, Proposer(on_policy_draft), cfg)
        assert g.token_ids == s.token_ids
        assert g.text == s.text == full.text[: full.text.index(stop)]
        assert stop not in g.text
        # Decoding stops at the token that completes the stop string, not later.
        assert g.token_ids == full.token_ids[: len(g.token_ids)]
        assert stop in lm.tokenizer.decode(g.token_ids, skip_special_tokens=True)
        assert stop not in lm.tokenizer.decode(g.token_ids[:-1], skip_special_tokens=True)
        checked += 1
    assert checked >= 6


def test_eos_inside_accepted_draft(tiny_model_dir, lm, greedy):
    """A second EOS id (as models with several end tokens have): outputs end right before it,
    also when it sits in the middle of an accepted draft run."""
    counts = Counter(t for o in greedy[: len(PROMPTS)] for t in o.token_ids[2:])
    stop_tok = counts.most_common(1)[0][0]
    eos_lm = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    eos_lm.model.generation_config.eos_token_id = [eos_lm.tokenizer.eos_token_id, stop_tok]
    assert engine.eos_ids(eos_lm.model, eos_lm.tokenizer) == {eos_lm.tokenizer.eos_token_id, stop_tok}
    # The draft: the exact greedy token streams (without the new EOS), each + EOS + SEP, so the
    # drafted runs go through stop_tok and on.
    eos = eos_lm.tokenizer.eos_token_id
    stream = np.array([t for o in greedy for t in (*o.token_ids, eos, SEP)], dtype=np.int32)
    draft = BoundDraft(stream)
    cfg = DecodeConfig(max_new_tokens=MAX_NEW)
    g = engine.generate(eos_lm.model, eos_lm.tokenizer, PROMPTS, method="greedy", config=cfg)
    s = engine.generate(eos_lm.model, eos_lm.tokenizer, PROMPTS, draft=draft, method="tasc-spec", config=cfg)
    ended = 0
    for gi, si, full, p_ids in zip(g, s, greedy, encode_prompts(eos_lm.tokenizer, PROMPTS, None, True), strict=False):
        assert gi.token_ids == si.token_ids
        assert gi.text == si.text
        assert stop_tok not in si.token_ids
        if stop_tok in full.token_ids:
            cut = full.token_ids.index(stop_tok)
            assert si.token_ids == full.token_ids[:cut]
            # transformers keeps the EOS token itself; the engine drops it.
            hf = _hf_greedy(eos_lm, p_ids, MAX_NEW, [eos, stop_tok])
            assert hf == [*si.token_ids, stop_tok]
            if cut >= 2:
                ended += 1
        else:
            assert si.token_ids == full.token_ids
    assert ended >= 3
    assert sum(o.stats.accepted for o in s) > 0


def _empirical_first_token(
    logits: torch.Tensor, draft_tok: int, temperature: float, trials: int
) -> tuple[np.ndarray, float]:
    gen = torch.Generator().manual_seed(1234)
    counts = np.zeros(logits.shape[1])
    draft = np.array([draft_tok], dtype=np.int64)
    accepted = 0
    for _ in range(trials):
        n, tok = verify_draft(logits, draft, temperature, gen)
        first = draft_tok if n == 1 else tok
        accepted += n
        counts[first] += 1
    return counts / trials, accepted / trials


def test_sampling_accept_reject_preserves_distribution():
    draft_tok = 1
    logits = torch.tensor([[2.0, 1.5, 0.3, -1.0, 0.8, 0.0, -0.5, 1.0], [0.0] * 8])
    temperature = 0.7
    target = torch.softmax(logits[0] / temperature, dim=-1).numpy()
    emp, acc_rate = _empirical_first_token(logits, draft_tok, temperature, trials=20000)
    tv = 0.5 * np.abs(emp - target).sum()
    assert tv < 0.03, (emp, target)
    # A deterministic draft token is kept with probability p(draft).
    assert abs(acc_rate - target[draft_tok]) < 0.02


def test_sampling_without_draft_and_greedy_verify():
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, 0.0, 0.0], [0.0, 0.0, 4.0]])
    # Greedy: accept while the draft agrees with the argmax, then emit the argmax.
    assert verify_draft(logits, np.array([1, 0], dtype=np.int64), 0.0, None) == (2, 2)
    assert verify_draft(logits, np.array([1, 2], dtype=np.int64), 0.0, None) == (1, 0)
    assert verify_draft(logits, np.array([0, 0], dtype=np.int64), 0.0, None) == (0, 1)
    # Sampling with a very low temperature behaves like argmax; a rejected token is never re-emitted.
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        n, tok = verify_draft(logits, np.array([0], dtype=np.int64), 0.05, gen)
        assert (n, tok) == (0, 1)


def test_sampling_decode_is_seeded(lm):
    ids = encode_prompts(lm.tokenizer, PROMPTS[:1], None, True)[0]
    a = decode(lm.model, lm.tokenizer, ids, None, DecodeConfig(max_new_tokens=12, temperature=1.0, seed=3))
    b = decode(lm.model, lm.tokenizer, ids, None, DecodeConfig(max_new_tokens=12, temperature=1.0, seed=3))
    assert a.token_ids == b.token_ids and len(a.token_ids) == 12


def test_measure_verify_cost(lm, monkeypatch):
    """The table follows what a step of m tokens really costs: a backend whose m-token step
    takes (20 + 5 m) ms gives cost[m] near (4 + m) / 5, interpolated between the measured
    lengths, and a length whose runs all stall is capped at m one-token steps."""
    import time as clock

    from tasc.accel.backend import Backend

    stalled = 12  # every run of this length stalls

    class Timed:
        def prefill(self, ids, keep=1):
            return None

        def argmax(self, ids, keep):
            m = len(ids)
            clock.sleep((0.020 + 0.005 * m) * (5 if m == stalled else 1))
            return [0] * keep

        def crop(self, n):
            return None

    backend = Backend.for_model(lm.model)
    monkeypatch.setattr(Backend, "start", lambda self, reuse_prefix=True: Timed())
    cost = measure_verify_cost(backend, max_len=12, context=8, reps=2)
    assert cost.shape == (13,) and cost[0] == 0.0 and cost[1] == 1.0
    for m in (2, 4, 8):
        assert cost[m] == pytest.approx((4 + m) / 5, rel=0.2), m
    assert cost[5] == pytest.approx((cost[4] + cost[6]) / 2)  # not measured: interpolated
    assert cost[12] == 12.0  # every 12-token run stalled 5x (16 steps' time): capped at 12


@pytest.mark.parametrize("dtype", ["q8_0", "q4_1"])
def test_spec_is_token_identical_to_greedy_on_quantised_weights(tiny_model_dir, dtype):
    """The default CPU path: quantised linears and head, row-wise attention, the fused step. The
    head's rows are then made near copies of each other, so greedy meets near ties at every step
    (and the weights changed in place are quantised again): still the same tokens."""
    qlm = load_model(str(tiny_model_dir), dtype=dtype, device="cpu", kernels="auto")
    assert qlm.weights == dtype and "quant" in qlm.kernels
    cfg = DecodeConfig(max_new_tokens=MAX_NEW)
    for near_ties in (False, True):
        if near_ties:
            head = qlm.model.get_output_embeddings().weight
            with torch.no_grad():
                rng = torch.Generator().manual_seed(0)
                top = head[:200].clone()
                head[200:400] = top + 1e-4 * torch.randn(top.shape, generator=rng)
        base = engine.generate(qlm.backend, qlm.tokenizer, PROMPTS, method="greedy", config=cfg)
        draft = BoundDraft.from_corpus(build_draft_corpus(on_policy=[o.text for o in base], corpus_hash="t"),
                                       qlm.tokenizer)
        spec = engine.generate(qlm.backend, qlm.tokenizer, PROMPTS, draft=draft, method="tasc-spec", config=cfg)
        assert [s.token_ids for s in spec] == [g.token_ids for g in base]
        assert sum(o.stats.accepted for o in spec) > 0
