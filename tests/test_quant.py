"""The quantised linear kernels (tasc.accel.quant): GGUF bytes in and out as the gguf package has
them, a row's output bitwise independent of the other rows in the call and of the thread count,
every instruction-set variant bitwise equal to the portable one, accuracy against the
dequantised weights, the row operations a loader needs, and the exact argmax with ties."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from tasc.accel import quant, variants
from tasc.accel.quant import QuantWeight
from tasc.models import DEFAULT_MODEL, ModelError, gguf_file

pytestmark = pytest.mark.skipif(not variants.available(), reason="no C compiler here")

FORMATS = ("Q8_0", "Q4_0", "Q4_1")
ROWS = (1, 2, 3, 4, 5, 6, 7, 8, 13, 17)  # every rows-a-pass count of every variant


@pytest.fixture(scope="module")
def runnable() -> list[str]:
    """Every variant this CPU runs (ref everywhere; the SIMD ones after their child probe)."""
    found = [name for name in variants.ISAS if variants.probe(name)]
    assert "ref" in found
    return found


def weights(fmt: str, n: int = 50, k: int = 96, seed: int = 0) -> tuple[np.ndarray, QuantWeight]:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)).astype(np.float32)
    w[3, :32] = 0.0  # a zero block
    w[4, 32:64] = 0.25  # a constant block
    w[5] *= 40.0  # a row of larger scales
    return w, QuantWeight.quantize(w, fmt)


def activations(m: int = 17, k: int = 96, seed: int = 1) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((max(m, 4), k)).astype(np.float32)
    x[1, :32] = 0.0  # a zero block
    x[2] = np.arange(k) % 3 * 0.5  # rounding ties in the int8 quantisation
    x[3, 7] = 3.0e4  # one large value
    return x[:m]


@pytest.mark.parametrize("fmt", FORMATS)
def test_bytes_and_values_are_those_of_gguf(fmt):
    w, q = weights(fmt)
    qtype = gguf.GGMLQuantizationType[fmt]
    assert np.array_equal(q.blocks, gguf.quants.quantize(w, qtype))
    assert np.array_equal(q.dequantize(), gguf.quants.dequantize(q.blocks, qtype))
    assert q.shape == (50, 96) and q.nbytes == 50 * 3 * quant.TYPE_SIZE[fmt]
    assert np.array_equal(QuantWeight.quantize(torch.from_numpy(w), fmt).blocks, q.blocks)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("n", [50, 64])
def test_the_layout_replaces_the_blocks_and_gives_them_back(fmt, n):
    """Once packed a weight holds its bytes once, in the kernel's layout (padded to whole
    column groups where n is not one), and reads the GGUF blocks back from it unchanged."""
    w, q = weights(fmt, n=n)
    blocks = q.blocks.copy()
    out = q.matmul(activations())
    assert q._blocks is None and q._packed is not None
    assert np.array_equal(q.blocks, blocks)
    assert np.array_equal(q.dequantize(), gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[fmt]))
    assert np.array_equal(q.take_rows(slice(2, 9)).blocks, blocks[2:9])
    assert np.array_equal(q.matmul(activations()), out)


def test_tensors_of_the_shipped_gguf_are_read_as_stored():
    try:
        path = gguf_file(DEFAULT_MODEL)  # SmolLM2-135M-Instruct, Q4_1 layers and a Q8_0 head
    except ModelError:
        pytest.skip("the shipped GGUF model is not installed")
    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    k_proj = tensors["blk.0.attn_k.weight"]  # Q4_1, GGUF shape (576, 192): 192 rows of 576
    q = QuantWeight.from_gguf(k_proj)
    assert (q.fmt, q.n, q.k) == ("Q4_1", 192, 576)
    assert np.array_equal(q.blocks, k_proj.data)
    assert np.array_equal(q.dequantize(), gguf.quants.dequantize(k_proj.data, k_proj.tensor_type))
    head = QuantWeight.from_gguf(tensors["token_embd.weight"])  # Q8_0, the tied LM head
    assert (head.fmt, head.n, head.k) == ("Q8_0", 49152, 576)
    part = head.take_rows(slice(1000, 1040))
    assert np.array_equal(part.dequantize(), gguf.quants.dequantize(tensors["token_embd.weight"].data[1000:1040],
                                                                    gguf.GGMLQuantizationType.Q8_0))
    x = activations(3, 576)
    assert np.array_equal(q.matmul(x, threads=1)[:, :5], q.take_rows(slice(0, 5)).matmul(x, threads=1))
    with pytest.raises(ValueError, match="tensor type F32 is not supported"):
        QuantWeight.from_gguf(tensors["blk.0.attn_norm.weight"])


@pytest.mark.parametrize("fmt", FORMATS)
def test_rows_do_not_depend_on_the_batch_or_the_threads(fmt, runnable):
    _, q = weights(fmt)
    x = activations()
    for name in runnable:
        full = q.matmul(x, threads=1, isa=name)
        for m in ROWS:  # one pass, partial passes, several row chunks
            assert np.array_equal(q.matmul(x[:m], threads=1, isa=name), full[:m]), (name, m)
        for i in range(len(x)):  # alone
            assert np.array_equal(q.matmul(x[i:i + 1], threads=1, isa=name), full[i:i + 1]), (name, i)
        pick = [16, 0, 5, 5, 9]  # other neighbours, a repeated row
        assert np.array_equal(q.matmul(x[pick], threads=1, isa=name), full[pick])
        assert np.array_equal(q.matmul(x, threads=2, isa=name), full)
        assert np.array_equal(q.matmul(x[:3], threads=2, isa=name), full[:3])


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_variant_gives_the_portable_results_bitwise(fmt, runnable):
    _, q = weights(fmt, n=70, k=160, seed=2)
    x = activations(17, 160, seed=3)
    ref = q.matmul(x, threads=1, isa="ref")
    for name in runnable:
        assert np.array_equal(q.matmul(x, threads=1, isa=name), ref), name
        assert np.array_equal(q.argmax(x, threads=1, isa=name), q.argmax(x, threads=1, isa="ref")), name


def quantise_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The kernel's int8 activations (per 32-block, maxabs / 127, round half to even)."""
    blocks = x.reshape(len(x), -1, 32)
    d = np.abs(blocks).max(axis=2, keepdims=True) / np.float32(127)
    inv = np.where(d == 0, np.float32(0), np.float32(1) / np.where(d == 0, np.float32(1), d))
    return np.clip(np.rint(blocks * inv), -127, 127), d


@pytest.mark.parametrize("fmt", FORMATS)
def test_accuracy_against_the_dequantised_weights(fmt):
    _, q = weights(fmt, n=40, k=256, seed=4)
    x = activations(9, 256, seed=5)
    y = q.matmul(x, threads=1).astype(np.float64)
    w = q.dequantize().astype(np.float64)
    # Against the same int8 activations in float64: only the float rounding of the kernel.
    qa, d = quantise_rows(x)
    xq = (qa * d).reshape(x.shape).astype(np.float64)
    scale = np.abs(xq) @ np.abs(w).T
    assert np.all(np.abs(y - xq @ w.T) <= 1e-5 * scale + 1e-30)
    # Against fp32 activations: within the int8 rounding bound, sum_b d_b / 2 * |w_b|_1.
    wabs = np.abs(w).reshape(len(w), -1, 32).sum(axis=2)
    bound = (d[:, :, 0].astype(np.float64) / 2) @ wabs.T
    exact = x.astype(np.float64) @ w.T
    assert np.all(np.abs(y - exact) <= bound * 1.001 + 1e-5 * scale)
    assert np.abs(y - exact).max() < 0.02 * np.abs(exact).max()


def test_rejects_k_not_a_multiple_of_32_and_unknown_formats():
    with pytest.raises(ValueError, match="multiple of 32"):
        QuantWeight.quantize(np.ones((4, 40), dtype=np.float32), "Q8_0")
    with pytest.raises(ValueError, match="not a positive multiple of 32"):
        QuantWeight(np.zeros((4, 34), dtype=np.uint8), "Q8_0", 40)
    with pytest.raises(ValueError, match="unsupported block format 'Q5_0'"):
        QuantWeight.quantize(np.ones((4, 32), dtype=np.float32), "Q5_0")
    with pytest.raises(ValueError, match=r"must be \(M, 96\)"):
        weights("Q4_1")[1].matmul(np.ones((2, 64), dtype=np.float32))
    lib = variants.library()  # the kernel checks too
    assert lib.tasc_quant_matmul(0, 8, None, 1, 40, None, None, 16, None, 1) == -1
    assert lib.tasc_quant_matmul(0, 6, None, 1, 64, None, None, 16, None, 1) == -2


def test_variant_choice_and_the_environment(monkeypatch):
    assert variants.isa() in variants.ISAS
    monkeypatch.setenv("TASC_QUANT_ISA", "ref")
    assert variants.isa() == "ref"
    monkeypatch.setenv("TASC_QUANT_ISA", "amx")
    with pytest.raises(ValueError, match="expected one of"):
        variants.isa()


def test_row_operations_for_fused_and_permuted_weights():
    w, q = weights("Q4_1", n=48, k=64)
    x = activations(5, 64)
    parts = [q.take_rows(slice(0, 16)), q.take_rows(slice(16, 20)), q.take_rows(slice(20, 48))]
    fused = QuantWeight.concat(parts)
    assert np.array_equal(fused.blocks, q.blocks)
    assert np.array_equal(fused.matmul(x, threads=1), np.hstack([p.matmul(x, threads=1) for p in parts]))
    with pytest.raises(ValueError, match="cannot concatenate"):
        QuantWeight.concat([q, weights("Q8_0", n=48, k=64)[1]])
    # Parts of whole column groups: the fused layout is built from theirs, theirs become views
    # of it (the weights are held once), and every product stays the same.
    parts = [q.take_rows(slice(0, 16)), q.take_rows(slice(16, 48))]
    alone = [p.matmul(x, threads=1) for p in parts]
    fused = QuantWeight.concat(parts)
    assert fused.shape == (48, 64) and fused.nbytes == q.nbytes
    assert np.array_equal(fused.blocks, q.blocks)
    for part, y in zip(parts, alone, strict=True):
        assert all(np.shares_memory(a, b) for a, b in zip(part.packed(), fused.packed(), strict=True))
        assert np.array_equal(part.matmul(x, threads=1), y)
    assert np.array_equal(fused.matmul(x, threads=1), np.hstack(alone))
    assert np.array_equal(fused.matmul(x, threads=1), q.matmul(x, threads=1))
    assert np.array_equal(fused.dequantize(), q.dequantize())
    assert QuantWeight.concat([q]) is q
    # llama.cpp's conversion permutes q/k rows per head; unpermute_rows undoes it exactly.
    n_head = 3
    hf = w.reshape(n_head, 2, 48 // n_head // 2, 64).swapaxes(1, 2).reshape(48, 64)  # as convert does
    restored = QuantWeight.quantize(hf, "Q4_1").permute_rows(quant.unpermute_rows(48, n_head))
    assert np.array_equal(restored.blocks, q.blocks)
    with pytest.raises(ValueError, match="not a permutation"):
        q.permute_rows(np.zeros(48, dtype=int))
    y = q(torch.from_numpy(x).reshape(1, 5, 64))  # as a torch linear layer
    assert y.shape == (1, 5, 48) and np.array_equal(y[0].numpy(), q.matmul(x))


@pytest.mark.parametrize("fmt", ("Q8_0", "Q4_1"))
def test_argmax_is_the_first_largest_output(fmt, runnable):
    rng = np.random.default_rng(6)
    w = rng.standard_normal((203, 64)).astype(np.float32)  # 13 column groups, the last partial
    w[150] = w[7]  # exact ties: 7 must win, across the two threads' column ranges too
    w[202] = w[7]
    w[60] = w[40] * np.float32(1.0001)  # a near tie
    q = QuantWeight.quantize(w, fmt)
    x = np.vstack([w[7], w[40], w[202] * 0.5, rng.standard_normal((14, 64))]).astype(np.float32)
    for name in runnable:
        logits = q.matmul(x, threads=1, isa=name)
        expected = logits.argmax(axis=1)  # numpy: the first of equal maxima
        assert expected[0] == 7 and expected[2] == 7
        for threads in (1, 2):
            for m in (1, 3, 17):
                assert np.array_equal(q.argmax(x[:m], threads=threads, isa=name), expected[:m]), (name, m)


def test_layouts_packed_together_share_one_huge_page_aligned_buffer():
    """pack_together moves the layouts (a concat's parts follow it) into one buffer starting on
    a huge-page boundary; every product stays the same, through the weights and their parts."""
    x = activations(3, 64)
    a, b, c = (weights(fmt, n=32, k=64)[1] for fmt in ("Q4_1", "Q8_0", "Q4_1"))
    parts = [a.take_rows(slice(0, 16)), a.take_rows(slice(16, 32))]
    fused = QuantWeight.concat(parts)
    before = [w.matmul(x, threads=1) for w in (fused, *parts, b, c)]
    quant.pack_together([fused, b, c, b])  # a weight named twice moves once
    base = fused.packed()[0]
    while base.base is not None:
        base = base.base
    layouts = [w.packed() for w in (fused, *parts, b, c)]
    assert all(np.shares_memory(arr, base) for layout in layouts for arr in layout)
    assert fused.packed()[0].ctypes.data % quant.HUGE == 0
    assert all(np.shares_memory(p, f) for part in parts for p, f in zip(part.packed(), fused.packed(), strict=True))
    assert all(np.array_equal(w.matmul(x, threads=1), y) for w, y in zip((fused, *parts, b, c), before, strict=True))
