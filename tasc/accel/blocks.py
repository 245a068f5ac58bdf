"""GGUF block bytes at load: float weights quantised into Q8_0, Q4_0 or Q4_1 blocks, and blocks
laid out for the kernels of ``kernels/quant.c`` (16 columns a group).

Both run in C (``kernels/quant_load.c``) where a compiler is present and in numpy otherwise,
with the same bytes either way: the bytes of ``gguf.quants.quantize`` (tested against it and
against each other). The C loops take a model's load from seconds of numpy temporaries to one
pass over the bytes.
"""

from __future__ import annotations

import ctypes
from functools import cache

import numpy as np

from tasc.accel import native

BLOCK = 32  # weights a block, along K
GROUP = 16  # columns a packed group (kernels/quant.c)
TYPES = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 8}  # GGML type ids
TYPE_SIZE = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}  # bytes a block


def check_format(fmt: str) -> None:
    if fmt not in TYPES:
        raise ValueError(f"unsupported block format {fmt!r}: expected one of {', '.join(TYPES)}")


def aligned(nbytes: int) -> np.ndarray:
    """An uninitialised uint8 buffer of ``nbytes`` on a 64-byte boundary (a cache line)."""
    raw = np.empty(nbytes + 64, dtype=np.uint8)
    off = -raw.ctypes.data % 64
    return raw[off:off + nbytes]


@cache
def _library():
    """kernels/quant_load.c (ctypes), or None without a C compiler (or with TASC_NATIVE=0)."""
    lib = native.load("quant_load")
    if lib is not None:
        ptr, i32 = ctypes.c_void_p, ctypes.c_int
        lib.tasc_quantize_blocks.argtypes = [i32, ptr, ctypes.c_int64, ptr, i32]
        lib.tasc_pack_layout.argtypes = [i32, ptr, i32, i32, ptr, ptr, i32]
    return lib


def _threads() -> int:
    import torch

    from tasc.accel.threads import BUDGET

    return BUDGET.threads(torch.get_num_threads())


def quantize_blocks(blocks: np.ndarray, fmt: str, out: np.ndarray | None = None) -> np.ndarray:
    """float32 (n, 32) -> uint8 (n, TYPE_SIZE[fmt]): the bytes of gguf.quants.quantize, written
    into ``out`` (C-contiguous) where given."""
    check_format(fmt)
    blocks = np.ascontiguousarray(blocks, dtype=np.float32)
    lib = _library()
    if out is None:
        out = np.empty((len(blocks), TYPE_SIZE[fmt]), dtype=np.uint8)
    if lib is None:
        out[...] = _quantize_numpy(blocks, fmt)
    else:
        lib.tasc_quantize_blocks(TYPES[fmt], blocks.ctypes.data, len(blocks), out.ctypes.data, _threads())
    return out


def _roundf(v: np.ndarray) -> np.ndarray:  # C roundf (half away from zero), as gguf.quants
    a = np.abs(v)
    floor = np.floor(a)
    return np.sign(v) * (floor + np.floor(2 * (a - floor)))


def _quantize_numpy(blocks: np.ndarray, fmt: str) -> np.ndarray:
    """:func:`quantize_blocks` in numpy (the path without a compiler, and the C loop's reference)."""
    check_format(fmt)
    if fmt == "Q8_0":
        d = np.abs(blocks).max(axis=1, keepdims=True) / np.float32(127)
        with np.errstate(divide="ignore"):
            inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
        qs = _roundf(blocks * inv).astype(np.int8).view(np.uint8)
        return np.concatenate([d.astype(np.float16).view(np.uint8), qs], axis=1)
    if fmt == "Q4_0":
        imax = np.abs(blocks).argmax(axis=1)[:, None]
        d = np.take_along_axis(blocks, imax, axis=1) / np.float32(-8)
        with np.errstate(divide="ignore"):
            inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
        q = np.trunc(blocks * inv + np.float32(8.5)).astype(np.uint8).clip(0, 15)
        head = [d.astype(np.float16).view(np.uint8)]
    else:  # Q4_1
        lo, hi = blocks.min(axis=1, keepdims=True), blocks.max(axis=1, keepdims=True)
        d = (hi - lo) / np.float32(15)
        with np.errstate(divide="ignore"):
            inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
        q = np.trunc((blocks - lo) * inv + np.float32(0.5)).astype(np.uint8).clip(0, 15)
        head = [d.astype(np.float16).view(np.uint8), lo.astype(np.float16).view(np.uint8)]
    return np.concatenate([*head, q[:, :16] | (q[:, 16:] << np.uint8(4))], axis=1)


def _layout_shapes(fmt: str, n: int, k: int) -> tuple[int, int, int, int]:
    """groups, blocks a row, quant bytes a block, fp16 fields a block."""
    n_fields = 2 if fmt == "Q4_1" else 1
    return -(-n // GROUP), k // BLOCK, TYPE_SIZE[fmt] - 2 * n_fields, n_fields


def pack_layout(blocks: np.ndarray, fmt: str, k: int) -> tuple[np.ndarray, np.ndarray]:
    """GGUF bytes (n, k/32 * TYPE_SIZE) -> the kernel's layout: quants (groups, k/32, chunks,
    16, 4) uint8 and fp16 fields (groups, k/32, [d, m], 16) uint16, zero-padded to whole
    groups, each on a cache line."""
    groups, nb, quant_bytes, n_fields = _layout_shapes(fmt, len(blocks), k)
    q_out = aligned(groups * GROUP * nb * quant_bytes)
    s_out = aligned(groups * GROUP * nb * n_fields * 2).view(np.uint16)
    lib = _library()
    if lib is None:
        _pack_numpy(blocks, fmt, k, q_out, s_out)
    else:
        blocks = np.ascontiguousarray(blocks)
        lib.tasc_pack_layout(TYPES[fmt], blocks.ctypes.data, len(blocks), k, q_out.ctypes.data,
                             s_out.ctypes.data, _threads())
    return q_out, s_out


def split_fields(blocks: np.ndarray, fmt: str, k: int) -> tuple[np.ndarray, ...]:
    """(n, k/32, .) views of GGUF bytes: fp16 scale d, [fp16 min m,] quants."""
    b = blocks.reshape(len(blocks), k // BLOCK, TYPE_SIZE[fmt])
    head = 4 if fmt == "Q4_1" else 2
    half = np.ascontiguousarray(b[:, :, :head]).view(np.float16)
    return (*np.moveaxis(half, 2, 0), b[:, :, head:])


def _pack_numpy(blocks: np.ndarray, fmt: str, k: int, q_out: np.ndarray, s_out: np.ndarray) -> None:
    n = len(blocks)
    groups, nb, quant_bytes, n_fields = _layout_shapes(fmt, n, k)
    *scales, qs = split_fields(blocks, fmt, k)
    q_groups = q_out.reshape(groups, nb, -1, GROUP, 4)
    s_groups = s_out.reshape(groups, nb, n_fields, GROUP)
    step = max(1, (1 << 22) // (GROUP * nb * quant_bytes))  # groups at a time: few MB of temporaries
    for g in range(0, groups, step):
        rows = slice(g * GROUP, min(n, (g + step) * GROUP))
        count = min(step, groups - g)
        pad = ((0, count * GROUP - (rows.stop - rows.start)), (0, 0), (0, 0))
        q = np.pad(qs[rows], pad).reshape(count, GROUP, nb, -1, 4)
        sc = np.pad(np.stack([s[rows].view(np.uint16) for s in scales], axis=2), pad)
        q_groups[g : g + count] = q.transpose(0, 2, 3, 1, 4)
        s_groups[g : g + count] = sc.reshape(count, GROUP, nb, n_fields).transpose(0, 2, 3, 1)


def unpack_layout(q_out: np.ndarray, s_out: np.ndarray, fmt: str, n: int, k: int) -> np.ndarray:
    """The GGUF bytes (n, k/32 * TYPE_SIZE) read back from a layout (the inverse of :func:`pack_layout`)."""
    groups, nb, _, n_fields = _layout_shapes(fmt, n, k)
    qs = q_out.reshape(groups, nb, -1, GROUP, 4).transpose(0, 3, 1, 2, 4).reshape(groups * GROUP, nb, -1)
    sc = s_out.reshape(groups, nb, n_fields, GROUP).transpose(0, 3, 1, 2).reshape(groups * GROUP, nb, n_fields)
    out = np.concatenate([np.ascontiguousarray(sc[:n]).view(np.uint8), qs[:n]], axis=2)
    return out.reshape(n, -1)

