"""The CPU inference kernels: the packed small-batch GEMM against numpy, row results that do not
depend on the batch, a packed tiny model that decodes like the plain one (speculative decoding
token-identical to greedy), training through a packed model, an unchanged state dict, and the
exact argmax head (the same ids as the full fp32 head, near ties included)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tasc.accel import argmax_head, packed
from tasc.accel.backend import Backend
from tasc.decode import engine
from tasc.decode.draft import BoundDraft, build_draft_corpus
from tasc.decode.engine import DecodeConfig
from tasc.models import load_model

pytestmark = pytest.mark.skipif(not packed.available(), reason="no AVX2/FMA CPU or no C compiler here")

PROMPTS = ["What is the weather in Paris?", "Write a function to add two numbers.", "Play some jazz music",
           "def f(x):", "Book a table for two at 8pm", "Add this song to my playlist"]


def test_small_gemm_matches_numpy_and_rows_do_not_depend_on_the_batch():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((37, 70), dtype=np.float32)  # N not a multiple of the block
    blocks = packed.pack(w)
    assert blocks.shape == (5, 70, 8)
    x = rng.standard_normal((26, 70), dtype=np.float32)
    full = packed.small_gemm(x, blocks, 37)
    np.testing.assert_allclose(full, x @ w.T, rtol=1e-5, atol=1e-5)
    for m in (1, 2, 5, 9, 12, 13):  # one pass, a partial pass, several passes
        part = packed.small_gemm(np.ascontiguousarray(x[:m]), blocks, 37)
        assert np.array_equal(part, full[:m])  # bitwise
    assert np.array_equal(packed.small_gemm(x, blocks, 37, threads=2), full)


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    plain = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    fast = load_model(str(tiny_model_dir), dtype="float32", device="cpu", kernels="auto")
    return plain, fast


def test_packed_model_computes_the_same_logits(models):
    plain, fast = models
    assert plain.kernels == "torch"
    assert fast.kernels == "packed-linear+grouped-attention+argmax-head+lean-decoder"
    ids = torch.tensor([plain.tokenizer("Will it rain tomorrow in London? Book a table")["input_ids"]])
    with torch.no_grad():
        a, b = plain.model(ids).logits, fast.model(ids).logits
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-4)
    assert list(fast.model.state_dict()) == list(plain.model.state_dict())


def test_packed_model_decodes_losslessly(models):
    plain, fast = models
    cfg = DecodeConfig(max_new_tokens=40)
    greedy = engine.generate(fast.model, fast.tokenizer, PROMPTS, method="greedy", config=cfg)
    reference = engine.generate(plain.model, plain.tokenizer, PROMPTS, method="greedy", config=cfg)
    same = sum(g.token_ids == r.token_ids for g, r in zip(greedy, reference, strict=True))
    assert same >= len(PROMPTS) - 1  # float rounding may flip a near tie, rarely
    draft = BoundDraft.from_corpus(build_draft_corpus(on_policy=[o.text for o in greedy], corpus_hash="t"),
                                   fast.tokenizer)
    spec = engine.generate(fast.model, fast.tokenizer, PROMPTS, draft=draft, method="tasc-spec", config=cfg)
    for s, g in zip(spec, greedy, strict=True):
        assert s.token_ids == g.token_ids  # multi-token verify steps agree with one-token steps
    assert sum(o.stats.accepted for o in spec) > 0


def test_training_goes_through_torch_and_repacks_changed_weights(tiny_model_dir):
    plain = load_model(str(tiny_model_dir), dtype="float32", device="cpu").model.train()
    fast = load_model(str(tiny_model_dir), dtype="float32", device="cpu", kernels="auto").model.train()
    ids = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11]])
    for m in (plain, fast):
        m.zero_grad()
        m(ids, labels=ids).loss.backward()
    for (name, p), q in zip(plain.named_parameters(), fast.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, msg=name)
    with torch.no_grad():  # a training step changes the weights in place: the packed copy follows
        for p in fast.parameters():
            p.add_(p.grad, alpha=-0.5)
        after = fast(ids).logits
        packed.unpack_linears(fast)
        torch.testing.assert_close(after, fast(ids).logits, rtol=1e-5, atol=1e-4)


def _full_argmax(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    return packed.small_gemm(x, packed.pack(w), len(w)).argmax(axis=1)


def test_argmax_head_equals_the_full_head_bitwise_near_ties_included():
    rng = np.random.default_rng(1)
    n, k = 301, 64  # N not a multiple of the block
    w = rng.standard_normal((n, k)).astype(np.float32) * 0.05
    # Near ties: columns that differ from column 7 in the last bits only, an exact copy (the
    # smaller id must win), and a column of zeros.
    for j, eps in ((40, 1e-7), (41, -1e-7), (42, 3e-7)):
        w[j] = w[7] * np.float32(1 + eps)
    w[250] = w[7]
    w[3] = 0.0
    x = rng.standard_normal((20, k)).astype(np.float32)
    x[10:] = w[7] * 40  # rows whose argmax is column 7 or one of its near copies
    head = argmax_head.ArgmaxHead(torch.from_numpy(w))
    ids = head(x)
    assert np.array_equal(ids, _full_argmax(w, x))
    assert set(ids[10:].tolist()) <= {7, 40, 41, 42} and 250 not in ids
    assert head.rescored >= len(x)  # every row recomputed its winner in fp32
    for m in (1, 4, 13):  # the row count never changes a row's id
        assert np.array_equal(head(np.ascontiguousarray(x[:m])), ids[:m])


def test_argmax_head_follows_a_changed_weight():
    rng = np.random.default_rng(2)
    weight = torch.from_numpy(rng.standard_normal((64, 32)).astype(np.float32))
    x = rng.standard_normal((5, 32)).astype(np.float32)
    head = argmax_head.ArgmaxHead(weight)
    before = head(x)
    with torch.no_grad():
        weight[int(before[0])] -= 100.0  # the old winner of row 0 can no longer win
    after = head(x)
    assert after[0] != before[0]
    assert np.array_equal(after, _full_argmax(weight.numpy(), x))


def test_greedy_decoding_with_the_argmax_head_is_unchanged(models):
    _, fast = models
    head = fast.backend.head
    assert head is not None
    cfg = DecodeConfig(max_new_tokens=30)
    rows = head.rows
    with_head = engine.generate(fast.backend, fast.tokenizer, PROMPTS, method="greedy", config=cfg)
    assert head.rows > rows  # the head did the work
    rows = head.rows
    no_head = Backend(fast.model, lean=fast.backend.lean)
    without = engine.generate(no_head, fast.tokenizer, PROMPTS, method="greedy", config=cfg)
    assert [o.token_ids for o in with_head] == [o.token_ids for o in without]
    assert head.rows == rows


def test_thread_budget_grants_one_thread_while_another_process_keeps_a_core_busy():
    """A parallel region waits at its barrier for a descheduled thread: with a busy neighbour,
    steps get one thread; on a quiet machine, what was asked for."""
    import subprocess
    import sys
    import time

    from tasc.accel.threads import ThreadBudget

    budget = ThreadBudget(interval=0.2)
    if budget.cores < 2 or budget.others() is None:
        pytest.skip("needs two cores and /proc")
    assert budget.threads(1) == 1
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.6)
        budget._last = (time.monotonic() - 0.5, *budget._last[1:])  # look now, over the spinning time
        assert budget.threads(2) == 1 and budget.taken
    finally:
        spin.kill()
        spin.wait()
    time.sleep(0.3)
    budget.others()  # a window that starts after the neighbour is gone
    time.sleep(0.3)
    budget._last = (time.monotonic() - 0.3, *budget._last[1:])
    seen, look = [], budget.others  # another job may still run here: judge by the load seen
    budget.others = lambda: seen.append(look()) or seen[-1]
    assert budget.threads(2) == (1 if seen[-1] > budget.crowded else 2)


def test_a_child_waited_for_counts_as_this_process_not_as_a_neighbour():
    """A benchmark runs another engine as a child between its own requests: once the child has
    ended, its CPU time is this process's, so the next request is not judged crowded by it."""
    import os
    import subprocess
    import sys

    from tasc.accel.threads import _own_busy

    before = _own_busy()
    if before is None:
        pytest.skip("needs /proc")
    spin = "import time\nwhile time.process_time() < 0.5: pass"  # CPU time: a busy machine only delays it
    subprocess.run([sys.executable, "-c", spin], check=True)
    assert _own_busy() - before >= 0.4 * os.sysconf("SC_CLK_TCK")  # the parent itself only waited


def test_thread_budget_looks_again_soon_after_an_idle_spell():
    """A look over an idle spell judges by all of it (load that may have ended since, such as
    another benchmark), so the next look comes after ``recheck`` seconds, not ``interval``."""
    import time

    from tasc.accel.threads import ThreadBudget

    budget = ThreadBudget(interval=5.0, stale=10.0, recheck=0.05)  # wide margins for a slow machine
    if budget.cores < 2 or budget.others() is None:
        pytest.skip("needs two cores and /proc")
    looks, look = [], budget.others
    budget.others = lambda: looks.append(time.monotonic()) or look()
    budget._last = (time.monotonic() - 50.0, *budget._last[1:])  # the last look, 50 s ago
    budget.threads(2)
    time.sleep(0.1)
    budget.threads(2)  # soon after the look over the spell: another look
    time.sleep(0.1)
    budget.threads(2)  # then back to one look an interval
    assert len(looks) == 2 and looks[1] - looks[0] >= 0.05
