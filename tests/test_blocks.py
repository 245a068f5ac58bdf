"""GGUF block bytes at load (tasc.accel.blocks): the C loops give the bytes of the numpy path and
of gguf.quants, at every magnitude fp16 scales meet (subnormal, rounding ties, overflow), and lay
them out exactly as the numpy path does, padding included."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from tasc.accel import blocks

FORMATS = ("Q8_0", "Q4_0", "Q4_1")

pytestmark = pytest.mark.skipif(blocks._library() is None, reason="no C compiler here")


def awkward_blocks(seed: int = 0) -> np.ndarray:
    """Blocks of 32 floats across the magnitudes whose fp16 scales are subnormal, near fp16's
    largest value, or rounding ties, plus zero, signed-zero, constant and one-value blocks."""
    rng = np.random.default_rng(seed)
    scales = np.float32(10.0) ** rng.uniform(-9, 7, size=(2000, 1)).astype(np.float32)
    x = rng.standard_normal((2000, 32)).astype(np.float32) * scales
    x[0] = 0.0
    x[1] = -0.0
    x[2] = 0.25
    x[3, :] = 0.0
    x[3, 5] = -3.0
    x[4] = np.arange(32, dtype=np.float32) - 16  # quants on rounding ties
    # Block maxima whose scale d lies exactly halfway between two fp16 values, and at fp16's top.
    for i, d in enumerate([2.0**-24 * 1.5, 2.0**-14 * (1 + 2**-11), 1.0 + 2**-11, 1.0 + 3 * 2**-11, 65504.0, 65519.0,
                           65520.0, 1e-30]):
        x[10 + i] = rng.uniform(-1, 1, 32).astype(np.float32) * d * 127
        x[10 + i, 0] = d * 127
        x[20 + i] = x[10 + i] * -15 / 127  # the same scales for the 4-bit formats (d = max / 8 or range / 15)
    return x


def numpy_path(monkeypatch, fn, *args):
    with monkeypatch.context() as m:
        m.setattr(blocks, "_library", lambda: None)
        with np.errstate(over="ignore"):  # scales past fp16's range are inf, in both paths
            return fn(*args)


@pytest.mark.parametrize("fmt", FORMATS)
def test_c_quantisation_gives_the_bytes_of_numpy_and_gguf(fmt, monkeypatch):
    x = awkward_blocks()
    got = blocks.quantize_blocks(x, fmt)
    assert got.shape == (len(x), blocks.TYPE_SIZE[fmt])
    expected = numpy_path(monkeypatch, blocks.quantize_blocks, x, fmt)
    assert np.array_equal(got, expected), np.argwhere((got != expected).any(axis=1))[:5].ravel()
    with np.errstate(over="ignore"):  # gguf's scales overflow to inf where fp16 does
        assert np.array_equal(got, gguf.quants.quantize(x, gguf.GGMLQuantizationType[fmt]).reshape(got.shape))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("n", [1, 16, 50])
def test_c_layout_is_the_numpy_one_and_reads_back(fmt, n, monkeypatch):
    k = 96
    raw = blocks.quantize_blocks(awkward_blocks(seed=n)[: n * k // 32], fmt).reshape(n, -1)
    q, s = blocks.pack_layout(raw, fmt, k)
    q_np, s_np = numpy_path(monkeypatch, blocks.pack_layout, raw, fmt, k)
    assert np.array_equal(q, q_np) and np.array_equal(s, s_np)
    assert q.ctypes.data % 64 == 0 and s.ctypes.data % 64 == 0
    assert np.array_equal(blocks.unpack_layout(q, s, fmt, n, k), raw)
    if n % blocks.GROUP:  # the padding columns are zero blocks
        groups = -(-n // blocks.GROUP)
        assert not q.reshape(groups, k // 32, -1, blocks.GROUP, 4)[-1, :, :, n % blocks.GROUP:].any()
        assert not s.reshape(groups, k // 32, -1, blocks.GROUP)[-1, :, :, n % blocks.GROUP:].any()


def test_unknown_format_is_refused():
    with pytest.raises(ValueError, match="unsupported block format 'Q5_0'"):
        blocks.quantize_blocks(np.zeros((1, 32), np.float32), "Q5_0")
