"""The backend's step API on the tiny model: a prefill, one- and k-token steps and crops give
the logits of transformers' forward over the whole sequence; argmax gives the argmax of those
logits; the accelerated backend (lean decoder, exact argmax head) agrees with the torch fallback
on the same kernels bitwise, and with an unaccelerated model up to float rounding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tasc.accel import packed
from tasc.accel.backend import Backend
from tasc.models import load_model

# A prompt, then steps of 1, 5, 4 (after a crop of 3), 1 and 9 tokens (after a crop of 9).
SCRIPT = [("prefill", 30), ("step", 1), ("step", 5), ("crop", 3), ("step", 4), ("crop", 0), ("step", 1),
          ("step", 9), ("crop", 9), ("step", 2)]


def _run(backend: Backend, seed: int = 0):
    """Follow SCRIPT with two requests side by side over the same tokens, one asking for the
    logits, one for the argmax; returns (logits per call, argmax per call, final sequence, steps)."""
    rng = np.random.default_rng(seed)
    vocab = backend.model.get_input_embeddings().weight.shape[0]
    by_logits, by_argmax = backend.start(), backend.start()
    logits, argmax, seq = [], [], []
    for op, n in SCRIPT:
        if op == "crop":
            by_logits.crop(n)
            by_argmax.crop(n)
            seq = seq[: len(seq) - n]
            continue
        ids = rng.integers(0, vocab, n).tolist()
        seq += ids
        keep = 1 if op == "prefill" else n
        logits.append(by_logits.prefill(ids) if op == "prefill" else by_logits.step(ids, keep))
        argmax.append(by_argmax.argmax(ids, keep))
        assert by_logits.length == by_argmax.length == len(seq)
    return logits, argmax, seq, by_logits


def _full_logits(model, seq: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=torch.tensor([seq])).logits[0].float()


def test_torch_backend_steps_equal_the_full_forward(tiny_lm):
    backend = tiny_lm.backend
    assert backend.kernels == "torch" and backend.head is None and backend.lean is None
    assert Backend.for_model(backend) is backend and Backend.for_model(tiny_lm.model).kernels == "torch"
    logits, argmax, seq, steps = _run(backend)
    assert steps.passes == len(logits) == 7
    for got, ids in zip(logits, argmax, strict=True):
        assert ids == got.argmax(dim=-1).tolist()  # no argmax head: the logits' own argmax
    # The last step's logits are those of one forward over the whole surviving sequence.
    full = _full_logits(tiny_lm.model, seq)
    torch.testing.assert_close(logits[-1], full[-2:], rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="prefill starts a request"):
        steps.prefill([1, 2, 3])


@pytest.mark.skipif(not packed.available(), reason="no AVX2/FMA CPU or no C compiler here")
def test_accelerated_backend_agrees_with_the_torch_fallback(tiny_model_dir, tiny_lm):
    fast = load_model(str(tiny_model_dir), dtype="float32", device="cpu", kernels="auto")
    backend = fast.backend
    assert backend.kernels == fast.kernels == "packed-linear+grouped-attention+argmax-head+lean-decoder"
    assert backend.head is not None and backend.lean is not None
    assert Backend.for_model(fast.model) is backend  # found again from the torch model alone
    logits, argmax, _, steps = _run(backend)
    assert steps.passes == 7
    # Transformers' forward over the same packed kernels: the same logits up to the rounding of
    # attention (the lean steps attend row by row with their own vector exp, transformers with
    # SDPA).
    ref_logits, ref_argmax, _, _ = _run(Backend(fast.model))
    for got, want in zip(logits, ref_logits, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=5e-5)
    # The exact argmax head: the argmax of the full logits, bitwise (9 rows <= max_rows).
    assert argmax == ref_argmax == [x.argmax(dim=-1).tolist() for x in logits]
    # An unaccelerated model: the same logits up to float rounding.
    plain_logits, _, _, _ = _run(tiny_lm.backend)
    for got, want in zip(logits, plain_logits, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.skipif(not packed.available(), reason="no AVX2/FMA CPU or no C compiler here")
def test_argmax_beyond_the_heads_rows_uses_the_logits(tiny_model_dir):
    fast = load_model(str(tiny_model_dir), dtype="float32", device="cpu", kernels="auto")
    head = fast.backend.head
    rows, steps = head.rows, fast.backend.start()
    wide = list(range(5, 5 + head.max_rows + 3))
    ids = steps.argmax(wide, keep=len(wide))
    assert head.rows == rows and len(ids) == len(wide)  # more rows than the head takes
    ref = Backend(fast.model).start().step(wide, keep=len(wide)).argmax(dim=-1).tolist()
    assert ids == ref
