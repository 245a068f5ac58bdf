"""The prompt prefix cache: a prompt started from the stored rows of an earlier prompt's shared
prefix gives bitwise the logits and the tokens of a prompt computed in full (greedy and
TASC-spec); the store is bounded, forgets rows when the weights change, leaves at least the
rows a pass must predict, exists only where reuse is lossless, and benchmarks run without it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tasc.accel import packed
from tasc.accel.prefix import PrefixStore, shared_prefix
from tasc.decode.engine import DecodeConfig, decode
from tasc.models import load_model

needs_kernels = pytest.mark.skipif(not packed.available(), reason="no AVX2/FMA CPU or no C compiler here")
rng = np.random.default_rng(11)
TEMPLATE = rng.integers(5, 700, 40).tolist()  # the part every prompt of a task shares
PROMPTS = [TEMPLATE + rng.integers(5, 700, n).tolist() for n in (9, 14, 3, 21)]


@pytest.fixture(scope="module")
def qlm(tiny_model_dir):
    lm = load_model(str(tiny_model_dir), dtype="q8_0", device="cpu", kernels="auto")
    if lm.backend.prefixes is None:
        pytest.skip("this CPU's kernel leaves long prompts to BLAS: no prefix cache")
    return lm


class _Cache:  # the fields of a LeanCache the store touches
    def __init__(self, rows: int, capacity: int = 8):
        self.keys = torch.arange(2 * 3 * capacity * 4, dtype=torch.float32).reshape(2, 1, 3, capacity, 4)
        self.values = -self.keys
        self.length = rows

    def reserve(self, n):
        if n > self.keys.shape[3]:
            raise AssertionError("reserve beyond the test capacity")


def test_shared_prefix_counts_leading_tokens():
    a = np.array([1, 2, 3, 4])
    assert shared_prefix(a, np.array([1, 2, 9])) == 2
    assert shared_prefix(a, np.array([1, 2])) == 2
    assert shared_prefix(a, np.array([7])) == 0
    assert shared_prefix(a, a) == 4


def test_the_store_copies_the_longest_prefix_and_leaves_the_predicted_rows():
    store = PrefixStore(entries=2, min_tokens=2)
    src = _Cache(6)
    store.add([1, 2, 3, 4, 5, 6], src, "w")
    src.keys.zero_()  # the store holds copies
    dst = _Cache(0)
    assert store.restore([1, 2, 3, 4, 5, 6], dst, "w", keep=1) == 5  # the last row must be computed
    assert dst.length == 5
    ref = _Cache(6)
    assert torch.equal(dst.keys[:, :, :, :5], ref.keys[:, :, :, :5])
    assert torch.equal(dst.values[:, :, :, :5], ref.values[:, :, :, :5])
    assert store.restore([1, 2, 9], _Cache(0), "w") == 2
    assert store.restore([1, 9], _Cache(0), "w") == 0  # below min_tokens: not worth the copy
    assert store.restore([1, 2, 3, 4], _Cache(0), "w", keep=3) == 0  # 1 row left < min_tokens
    assert store.restore([1, 2, 3, 4], _Cache(2), "w") == 0  # not a prompt: the cache has rows
    assert (store.hits, store.reused) == (2, 7)


def test_the_store_is_bounded_and_forgets_rows_of_other_weights():
    row = 2 * (2 * 3 * 4 * 4)  # bytes of one token's keys and values in _Cache
    store = PrefixStore(entries=2, max_bytes=10 * row, min_tokens=2)
    for first in (1, 2, 3):
        store.add([first, 0, 0, 0], _Cache(4), "w")
    assert store.restore([1, 0, 0, 0, 0], _Cache(0), "w") == 0  # the oldest went first
    assert store.restore([3, 0, 0, 0, 0], _Cache(0), "w") == 4
    store.add([4, 0, 0, 0, 0, 0, 0, 0], _Cache(8), "w")  # 8 + 4 rows > max_bytes: one goes
    assert store.nbytes() == 8 * row
    assert store.restore([2, 0, 0, 0, 0], _Cache(0), "w") == 0
    assert store.restore([3, 0, 0, 0, 0], _Cache(0), "w") == 0
    assert store.restore([4, 0, 0, 0, 0, 0, 0, 0, 0], _Cache(0), "w") == 8
    assert store.restore([4, 0, 0, 0, 0, 0, 0, 0, 0], _Cache(0), "other weights") == 0
    store.add([5, 0, 0], _Cache(4), "other weights")
    assert store.restore([4, 0, 0, 0, 0, 0, 0, 0, 0], _Cache(0), "w") == 0  # forgotten
    store.add(list(range(11)), _Cache(11, capacity=16), "w")  # alone over max_bytes: not kept
    assert store.restore(list(range(12)), _Cache(0, capacity=16), "w") == 0


@needs_kernels
def test_a_prompt_from_stored_rows_gives_the_logits_of_a_full_prefill(qlm):
    backend = qlm.backend
    backend.prefixes.clear()
    for ids in PROMPTS:
        cold = backend.start(reuse_prefix=False)
        want = cold.step(ids, keep=3)
        warm = backend.start()
        got = warm.step(ids, keep=3)
        assert warm.reused >= len(TEMPLATE) or ids is PROMPTS[0]
        assert torch.equal(got, want)
        # the next pass attends over restored and computed rows alike
        assert torch.equal(warm.step([7, 8], keep=2), cold.step([7, 8], keep=2))
        assert warm.argmax([9], keep=1) == cold.argmax([9], keep=1)
    assert backend.prefixes.hits >= len(PROMPTS) - 1


@needs_kernels
@pytest.mark.parametrize("speculative", [False, True])
def test_decoding_with_the_prefix_cache_emits_the_tokens_of_full_prompts(qlm, speculative):
    from tasc.decode.proposer import Proposer

    backend, cfg = qlm.backend, DecodeConfig(max_new_tokens=24)
    backend.prefixes.clear()
    for i, ids in enumerate(PROMPTS):
        proposer = (lambda: Proposer(None)) if speculative else (lambda: None)
        cold = decode(backend, qlm.tokenizer, ids, proposer(), DecodeConfig(max_new_tokens=24, prefix_cache=False))
        warm = decode(backend, qlm.tokenizer, ids, proposer(), cfg)
        assert cold.stats.reused_prompt_tokens == 0
        # cold runs store nothing; each warm one stores its prompt for the next
        assert warm.stats.reused_prompt_tokens == 0 if i == 0 else warm.stats.reused_prompt_tokens >= len(TEMPLATE)
        assert warm.token_ids == cold.token_ids


@needs_kernels
@pytest.mark.parametrize("change", ["norms", "linear", "embedding"])
def test_weights_changed_in_place_forget_the_stored_rows(tiny_model_dir, change):
    def edit(model):
        with torch.no_grad():
            if change == "norms":
                model.model.layers[0].input_layernorm.weight.mul_(0.5)
            elif change == "linear":  # quantised again by the lean decoder on the next request
                model.model.layers[1].mlp.down_proj.weight.mul_(1.25)
            else:
                model.model.embed_tokens.weight[PROMPTS[1][0]] *= 2.0

    lm = load_model(str(tiny_model_dir), dtype="q8_0", device="cpu", kernels="auto")
    if lm.backend.prefixes is None:
        pytest.skip("no prefix cache on this CPU")
    lm.backend.start().argmax(PROMPTS[0], keep=1)
    edit(lm.model)
    again = lm.backend.start()
    fresh = load_model(str(tiny_model_dir), dtype="q8_0", device="cpu", kernels="auto")
    edit(fresh.model)
    assert again.argmax(PROMPTS[1], keep=1) == fresh.backend.start(reuse_prefix=False).argmax(PROMPTS[1], keep=1)
    assert again.reused == 0
    assert lm.backend.start().argmax(PROMPTS[2], keep=1) and lm.backend.prefixes.reused > 0  # rows of the new weights


def test_fp32_backends_have_no_prefix_cache(tiny_lm):
    """fp32 prompts go through BLAS and SDPA, whose rows depend on the split: no reuse there."""
    assert tiny_lm.backend.prefixes is None
    steps = tiny_lm.backend.start()
    steps.argmax(PROMPTS[0], keep=1)
    assert steps.reused == 0


@needs_kernels
def test_benchmark_runners_compute_every_prompt_in_full(qlm):
    from tasc.eval.methods import engine_runner

    store = qlm.backend.prefixes
    store.clear()
    hits = store.hits
    run = engine_runner(qlm, DecodeConfig(max_new_tokens=4), None, False, speculative=False)
    outs = [run({"prompt": "the same words " * 8 + tail}) for tail in ("a", "b", "c")]
    assert [o.stats.reused_prompt_tokens for o in outs] == [0, 0, 0]
    assert store.hits == hits
    from tasc.data.prompts import encode_prompts

    ids = encode_prompts(qlm.tokenizer, [{"prompt": "the same words " * 8 + "c"}], None, False)[0]
    warm = decode(qlm.backend, qlm.tokenizer, ids, None, DecodeConfig(max_new_tokens=4))
    assert warm.stats.reused_prompt_tokens == 0  # the runner stored none of its prompts
    again = decode(qlm.backend, qlm.tokenizer, ids, None, DecodeConfig(max_new_tokens=4))
    assert again.stats.reused_prompt_tokens == len(ids) - 1 and again.token_ids == warm.token_ids


@needs_kernels
def test_batches_start_their_prompts_from_stored_prefixes_with_the_same_tokens(qlm):
    from tasc.decode.batch_engine import decode_batch

    backend = qlm.backend
    backend.prefixes.clear()
    off = DecodeConfig(max_new_tokens=16, prefix_cache=False)
    cold = decode_batch(backend, qlm.tokenizer, PROMPTS, None, off)
    decode(backend, qlm.tokenizer, PROMPTS[0], None, DecodeConfig(max_new_tokens=2))  # one stored prompt
    warm = decode_batch(backend, qlm.tokenizer, PROMPTS, None, DecodeConfig(max_new_tokens=16))
    assert [o.token_ids for o in warm] == [o.token_ids for o in cold]
    assert all(0 < o.stats.first_token_s <= o.stats.latency_s for o in warm + cold)
    assert [o.stats.reused_prompt_tokens for o in cold] == [0] * len(PROMPTS)
    reused = [o.stats.reused_prompt_tokens for o in warm]
    assert reused[0] == len(PROMPTS[0]) - 1 and min(reused[1:]) >= len(TEMPLATE)
