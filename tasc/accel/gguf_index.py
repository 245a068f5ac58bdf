"""The tensors of a GGUF file, indexed without reading its metadata's values.

A decode on a GGUF's blocks (tasc.accel.quantized) needs each tensor's name, type, shape and
bytes. ``gguf.GGUFReader`` builds numpy arrays for every metadata value first, the tokenizer's
49,152 tokens and 48,900 merges among them for SmolLM2: about 1.3 s and 150 MB at every load.
:func:`read_tensors` steps over the values by their lengths and maps the tensor data (read
only); nothing is copied.

Layout (GGUF v2/v3, little-endian): magic ``GGUF``, version u32, tensor count u64, metadata
count u64; per metadata entry a key string (u64 length + bytes), a value type u32 and the value;
per tensor a name string, n_dims u32, dims u64 x n_dims (the fastest-varying first), type u32
and the offset u64 of its bytes from the data start, which is the end of the tensor records
rounded up to ``general.alignment`` (default 32).

Contract: a file that is not GGUF, is cut short, or whose records point outside it raises
ValueError naming the file and, where one is to blame, the tensor. A tensor of a type id the
gguf package does not know is listed with an :class:`UnknownType` and no bytes.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

if TYPE_CHECKING:
    import gguf

# Metadata value types: the fixed sizes of the scalar ones; 8 is a string, 9 an array.
_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY, _U32 = 8, 9, 4


class GGUFTensor(NamedTuple):
    """A tensor as stored: ``shape`` in GGUF order (K, N for a linear weight), ``data`` its
    bytes (uint8, a read-only view of the mapped file)."""

    name: str
    tensor_type: gguf.GGMLQuantizationType | UnknownType
    shape: tuple[int, ...]
    data: np.ndarray


class UnknownType(NamedTuple):
    """The ``tensor_type`` of a tensor whose type id the gguf package does not know (its bytes
    are not given): a loader falls back for it, as for any type its kernels do not run."""

    name: str


class _Cursor:
    def __init__(self, buf, path: Path):
        self.buf, self.at, self.path = buf, 0, path

    def take(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.at + size > len(self.buf):
            raise ValueError(f"{self.path}: not a readable GGUF file (cut short at byte {self.at})")
        out = struct.unpack_from(fmt, self.buf, self.at)
        self.at += size
        return out if len(out) > 1 else out[0]

    def string(self) -> bytes:
        n = self.take("<Q")
        if self.at + n > len(self.buf):
            raise ValueError(f"{self.path}: not a readable GGUF file (a string runs past the end at byte {self.at})")
        self.at += n
        return bytes(self.buf[self.at - n : self.at])

    def skip_value(self, kind: int, count: int = 1) -> None:
        if kind in _SCALAR:
            self.at += _SCALAR[kind] * count
        elif kind == _STRING:
            for _ in range(count):
                n = self.take("<Q")
                self.at += n
        elif kind == _ARRAY:  # arrays of arrays too
            for _ in range(count):
                inner, n = self.take("<IQ")
                self.skip_value(inner, n)
        else:
            raise ValueError(f"{self.path}: not a readable GGUF file (metadata value type {kind} at byte {self.at})")
        if self.at > len(self.buf):
            raise ValueError(f"{self.path}: not a readable GGUF file (metadata runs past the end)")


def read_tensors(path: str | Path) -> dict[str, GGUFTensor]:
    """The tensors of the GGUF file ``path`` by name (see the module doc)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType  # the type table (its import: 60 ms)

    path = Path(path)
    try:
        with open(path, "rb") as f:
            buf = memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
    except (OSError, ValueError) as e:  # unreadable, or empty
        raise ValueError(f"{path}: not a readable GGUF file ({e})") from e
    cur = _Cursor(buf, path)
    magic, version = cur.take("<4sI")
    if magic != b"GGUF" or version not in (2, 3):
        raise ValueError(f"{path}: not a readable GGUF file (magic {magic!r}, version {version})")
    n_tensors, n_fields = cur.take("<QQ")
    alignment = 32
    for _ in range(n_fields):
        key, kind = cur.string(), cur.take("<I")
        if key == b"general.alignment" and kind == _U32:
            alignment = cur.take("<I")
        else:
            cur.skip_value(kind)
    records = []
    for _ in range(n_tensors):
        name = cur.string().decode("utf-8", "replace")
        n_dims = cur.take("<I")
        if not 1 <= n_dims <= 4:
            raise ValueError(f"{path}: not a readable GGUF file (tensor {name}: {n_dims} dimensions)")
        shape = tuple(cur.take("<Q") for _ in range(n_dims))
        kind, offset = cur.take("<IQ")
        records.append((name, shape, kind, offset))
    start = -(-cur.at // alignment) * alignment
    data = np.frombuffer(buf, dtype=np.uint8)
    tensors = {}
    for name, shape, kind, offset in records:
        try:
            qtype = GGMLQuantizationType(kind)
            block, size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):  # newer than this gguf package: its size is unknown
            tensors[name] = GGUFTensor(name, UnknownType(f"type {kind}"), shape, data[:0])
            continue
        nbytes = int(np.prod(shape, dtype=np.int64)) // block * size
        begin = start + offset
        if begin + nbytes > len(data):
            raise ValueError(f"{path}: not a readable GGUF file (tensor {name}: its {nbytes} bytes at "
                             f"{begin} run past the end, {len(data)} bytes)")
        tensors[name] = GGUFTensor(name, qtype, shape, data[begin : begin + nbytes])
    return tensors
