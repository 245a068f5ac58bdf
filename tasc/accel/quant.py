"""Linear layers on GGUF block-quantised weights (Q8_0, Q4_0, Q4_1) for CPU decoding.

A decode step reads every weight once, so its time is the weights' bytes: a Q4_1 model is a
sixth of its fp32 copy. :class:`QuantWeight` keeps a weight as the GGUF blocks (read from a
GGUF file as stored, or quantised at load by tasc.accel.blocks, the bytes of ``gguf.quants``) and
multiplies with the kernels of ``kernels/quant.c``: activations quantised to int8 per block,
exact integer block dots, and one fixed float order per output element. So a row's output is
bitwise the same whatever the number of rows in the call, the thread count or the instruction
set variant, and a k-token verify step gives exactly the one-token steps' greedy tokens while
reading the weights once.

The kernel variant this CPU runs is chosen at run time (tasc.accel.variants). Without the
kernel library :meth:`QuantWeight.matmul` multiplies the dequantised weights with numpy
instead (other numbers, no batch contract).
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence

import numpy as np

from tasc.accel import native
from tasc.accel.blocks import (
    BLOCK,
    GROUP,
    TYPE_SIZE,
    TYPES,
    aligned,
    check_format,
    pack_layout,
    quantize_blocks,
    split_fields,
    unpack_layout,
)
from tasc.accel.threads import BUDGET
from tasc.accel.variants import ERRORS, ISAS, available, default_id, isa, library

HUGE = 2 << 20  # bytes of a transparent huge page (x86-64)


def _address(a: np.ndarray) -> int:
    try:  # a third of the time of a.ctypes.data, which matters at 100+ calls a decode step
        return ctypes.addressof(ctypes.c_char.from_buffer(a))
    except (TypeError, ValueError):  # read-only
        return a.ctypes.data


def pack_together(weights: Sequence[QuantWeight]) -> None:
    """Move the kernel layouts of ``weights`` (built where they were not yet; the layouts of a
    concat's parts follow it) into one buffer, aligned to transparent huge pages and advised for
    them. Why: a decode step streams every layout once, and on 4 KB pages it misses the TLB on
    each of them (about 24,000 for the shipped model), on 2 MB pages on about 50. The layouts
    move one at a time, each old one given back before the next moves, so the move holds one
    layout twice, not the model. ``TASC_HUGE_PAGES=0`` leaves the layouts where they are."""
    if os.environ.get("TASC_HUGE_PAGES", "1") == "0":
        return
    unique = list({id(w): w for w in weights}.values())
    size = sum(_round_up(q.nbytes, 64) + _round_up(s.nbytes, 64) for q, s in map(QuantWeight.packed, unique))
    span = _round_up(size, HUGE)
    raw = np.empty(span + HUGE, dtype=np.uint8)  # pages are taken as the copies touch them
    start = -raw.ctypes.data % HUGE
    buf = raw[start : start + span]
    native.madvise(buf.ctypes.data, span, native.MADV_HUGEPAGE)  # before the copy touches it
    at = 0
    for w in unique:
        q, s = w.packed()
        qs = buf[at : at + q.nbytes]
        at += _round_up(q.nbytes, 64)
        sc = buf[at : at + s.nbytes].view(np.uint16)
        at += _round_up(s.nbytes, 64)
        qs[:], sc[:] = q, s
        w._place(qs, sc)
        q = s = None  # the last reference to the old layout
        native.trim_heap()  # its pages back to the system (free alone keeps them in the heap)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def unpermute_rows(n_rows: int, n_head: int) -> np.ndarray:
    """Row order that undoes llama.cpp's conversion of a q or k projection (its ``permute``,
    pairs of rotary halves interleaved per head): ``w_gguf.take_rows(idx)`` is in HF order."""
    half = n_rows // n_head // 2
    return np.arange(n_rows).reshape(n_head, half, 2).swapaxes(1, 2).reshape(n_rows)


class QuantWeight:
    """A weight W (n, k) in a GGUF block format: ``blocks`` (n, k/32 * TYPE_SIZE) uint8, the
    GGUF bytes row by row (row = output feature). Multiplies as a linear layer, y = x @ W.T.

    It holds its bytes once: as the GGUF blocks until the kernel layout is built (the first
    product, or :meth:`packed`), then as the layout only, which holds the same bytes in another
    order; ``blocks`` reads them back from it. So a model quantised at load keeps no second copy,
    and a GGUF file's blocks are not kept mapped once packed."""

    def __init__(self, blocks: np.ndarray, fmt: str, k: int):
        check_format(fmt)
        if k <= 0 or k % BLOCK:
            raise ValueError(f"K = {k} is not a positive multiple of {BLOCK} (the {fmt} block)")
        blocks = np.asarray(blocks)
        if blocks.dtype != np.uint8 or blocks.ndim != 2 or blocks.shape[1] != k // BLOCK * TYPE_SIZE[fmt]:
            raise ValueError(f"{fmt} blocks for K = {k} must be uint8 (N, {k // BLOCK * TYPE_SIZE[fmt]}), "
                             f"not {blocks.dtype} {blocks.shape}")
        self._blocks, self.fmt, self.k, self.n = blocks, fmt, k, blocks.shape[0]
        self._parts: list[QuantWeight] | None = None  # a concat's rows, see :meth:`concat`
        self._packed: tuple[np.ndarray, np.ndarray] | None = None
        self._pointers: tuple[int, int] | None = None

    @property
    def blocks(self) -> np.ndarray:
        """The GGUF bytes, (n, k/32 * TYPE_SIZE) uint8 (a concat's: gathered from its parts;
        once packed: read back from the layout)."""
        if self._parts is not None:
            return np.concatenate([p.blocks for p in self._parts])
        return self._blocks if self._blocks is not None else unpack_layout(*self._packed, self.fmt, self.n, self.k)

    @classmethod
    def from_gguf(cls, tensor) -> QuantWeight:
        """From a GGUF tensor (tasc.accel.gguf_index or ``gguf.GGUFReader``), its bytes as
        stored (GGUF's shape is (K, N): N rows of K/32 blocks)."""
        fmt = tensor.tensor_type.name
        if fmt not in TYPES:
            raise ValueError(f"{tensor.name}: tensor type {fmt} is not supported (only {', '.join(TYPES)})")
        if len(tensor.shape) != 2:
            raise ValueError(f"{tensor.name}: a linear weight is 2-D, not shape {list(tensor.shape)}")
        k, n = int(tensor.shape[0]), int(tensor.shape[1])
        return cls(np.asarray(tensor.data).reshape(n, -1), fmt, k)

    @classmethod
    def quantize(cls, weight, fmt: str, done=None) -> QuantWeight:
        """From a float (n, k) numpy array or torch tensor: the bytes of gguf.quants.quantize.
        ``done``, where given, is called with each slice of rows once quantised (a loader hands
        back their file pages)."""
        if hasattr(weight, "detach"):
            weight = weight.detach().float().cpu().numpy()
        w = np.asarray(weight, dtype=np.float32)
        if w.ndim != 2 or w.shape[1] % BLOCK or w.shape[1] == 0:
            raise ValueError(f"weight shape {w.shape}: (N, K) with K a positive multiple of {BLOCK} expected")
        check_format(fmt)
        n, k = w.shape
        out = np.empty((n, k // BLOCK * TYPE_SIZE[fmt]), dtype=np.uint8)
        step = max(1, (1 << 20) // k)  # rows at a time: the temporaries stay a few MB, not the weight's size
        for i in range(0, n, step):
            rows = out[i : i + step]  # whole rows of a C-contiguous array: contiguous too
            quantize_blocks(w[i : i + step].reshape(-1, BLOCK), fmt, rows.reshape(-1, TYPE_SIZE[fmt]))
            if done is not None:
                done(w[i : i + step])
        return cls(out, fmt, k)

    @classmethod
    def concat(cls, weights: Sequence[QuantWeight]) -> QuantWeight:
        """Rows of several weights, in order (fused q/k/v or gate/up: outputs side by side).

        Where every part fills whole column groups, the result's kernel layout is the parts'
        one after another: it is built from theirs, and theirs become views of it, so a model
        holds each weight's layout once, not once in a module and again in its fused group."""
        fmts, ks = {w.fmt for w in weights}, {w.k for w in weights}
        if len(fmts) != 1 or len(ks) != 1:
            raise ValueError(f"cannot concatenate weights of formats {fmts} and K {ks}")
        fmt, k = fmts.pop(), ks.pop()
        if len(weights) == 1:
            return weights[0]
        if any(w.n % GROUP for w in weights):
            return cls(np.concatenate([w.blocks for w in weights]), fmt, k)
        out = cls(np.empty((0, k // BLOCK * TYPE_SIZE[fmt]), dtype=np.uint8), fmt, k)
        out.n, out._parts = sum(w.n for w in weights), list(weights)
        layouts = [w.packed() for w in weights]
        qs = aligned(sum(q.nbytes for q, _ in layouts))
        sc = aligned(sum(s.nbytes for _, s in layouts)).view(np.uint16)
        np.concatenate([q for q, _ in layouts], out=qs)
        np.concatenate([s for _, s in layouts], out=sc)
        out._place(qs, sc)
        return out

    def take_rows(self, index) -> QuantWeight:
        """Rows ``index`` (a slice, or an array of row ids: a selection or a permutation)."""
        return QuantWeight(np.ascontiguousarray(self.blocks[index]), self.fmt, self.k)

    def permute_rows(self, perm) -> QuantWeight:
        perm = np.asarray(perm)
        if not np.array_equal(np.sort(perm), np.arange(self.n)):
            raise ValueError(f"not a permutation of {self.n} rows")
        return self.take_rows(perm)

    @property
    def shape(self) -> tuple[int, int]:
        return self.n, self.k

    @property
    def nbytes(self) -> int:
        return self.n * (self.k // BLOCK) * TYPE_SIZE[self.fmt]

    def dequantize(self) -> np.ndarray:
        """The float32 (n, k) values (bitwise those of gguf.quants.dequantize)."""
        *scales, qs = split_fields(self.blocks, self.fmt, self.k)
        d = scales[0].astype(np.float32)[..., None]
        if self.fmt == "Q8_0":
            w = qs.view(np.int8).astype(np.float32) * d
        else:
            q = np.concatenate([qs & np.uint8(15), qs >> np.uint8(4)], axis=2)
            w = d * (q.astype(np.int8) - np.int8(8)).astype(np.float32) if self.fmt == "Q4_0" else \
                d * q.astype(np.float32) + scales[1].astype(np.float32)[..., None]
        return w.reshape(self.n, self.k)

    def packed(self) -> tuple[np.ndarray, np.ndarray]:
        """The kernel's layout (tasc.accel.blocks.pack_layout), built once; the GGUF bytes are
        dropped then."""
        if self._packed is None:
            self._packed, self._blocks = pack_layout(self.blocks, self.fmt, self.k), None
        return self._packed

    def _place(self, qs: np.ndarray, sc: np.ndarray) -> None:
        """Take ``qs`` and ``sc``, holding a copy of this weight's layout, as the layout; a
        concat's parts take their views of them (as :meth:`concat` gives them)."""
        self._packed, self._pointers = (qs, sc), None
        q_at = s_at = 0
        for part in self._parts or ():
            q, s = part._packed
            part._place(qs[q_at : q_at + q.size], sc[s_at : s_at + s.size])
            q_at, s_at = q_at + q.size, s_at + s.size

    def _run(self, fn: str, x, out: np.ndarray, threads: int | None, isa_name: str | None) -> None:
        if not (type(x) is np.ndarray and x.dtype == np.float32 and x.flags.c_contiguous):
            x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.k:
            raise ValueError(f"x must be (M, {self.k}), not {x.shape}")
        if threads is None:
            import torch

            threads = BUDGET.threads(torch.get_num_threads())
        if self._pointers is None:
            qs, sc = self.packed()
            self._pointers = qs.ctypes.data, sc.ctypes.data
        variant = default_id() if isa_name is None else ISAS.index(isa(isa_name))
        rc = getattr(library(), fn)(variant, TYPES[self.fmt], _address(x), len(x), self.k, *self._pointers,
                                    self.n, _address(out), threads)
        if rc:
            raise RuntimeError(f"{fn}: {ERRORS.get(rc, rc)}")

    def matmul(self, x, threads: int | None = None, isa: str | None = None) -> np.ndarray:
        """x float32 (M, k) -> (M, n) float32 = x @ W.T (threads: default torch's)."""
        if not available():
            return np.asarray(x, dtype=np.float32) @ self.dequantize().T
        out = np.empty((len(x), self.n), dtype=np.float32)
        if len(x):
            self._run("tasc_quant_matmul", x, out, threads, isa)
        return out

    def argmax(self, x, threads: int | None = None, isa: str | None = None) -> np.ndarray:
        """int64 (M,): per row the column of the largest output of :meth:`matmul` (ties: the
        smallest id), without the (M, n) outputs. For the tied LM head: the greedy tokens."""
        if not available():
            return self.matmul(x).argmax(axis=1)
        ids = np.empty(len(x), dtype=np.int64)
        if len(x):
            self._run("tasc_quant_argmax", x, ids, threads, isa)
        return ids

    def __call__(self, x):
        """A torch tensor (..., k) -> (..., n): the linear layer."""
        import torch

        rows = x.detach().reshape(-1, self.k).float().contiguous().numpy()
        return torch.from_numpy(self.matmul(rows)).reshape(*x.shape[:-1], self.n)

    def __repr__(self) -> str:
        return f"QuantWeight({self.fmt}, n={self.n}, k={self.k})"
