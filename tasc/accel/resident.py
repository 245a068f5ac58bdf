"""What of a model decoded on tasc's kernels stays in memory.

Decoding on quantised weights reads their kernel layouts (tasc.accel.quant), the norms, and
the embedding rows of the tokens it meets; the model's fp32 linears and head are read only by a
fallback (a call autograd differentiates, the portable kernel's long prompts) or a
re-quantisation after a change. Decoding in float32 reads packed copies, and only its prompts
read the fp32 linears (through BLAS). So:

- :func:`mapped_weights` names the fp32 parameters that loading leaves memory-mapped
  (copy-on-write) from the model's safetensors file instead of copying them: the layers'
  linears, the head and the embedding (of which a step reads only its tokens' rows). As with
  llama.cpp's memory-mapped GGUF files, overwriting a model folder in place under a process
  that serves it is not supported; tasc itself writes every model folder (conversions,
  fine-tunes, vocabulary rounds) by renaming a finished temporary one.
- On quantised weights, the file pages that loading read and decoding will not go out of the
  process as each weight is quantised (:class:`Releaser`), so that loading holds one weight's
  pages at a time, not the whole file, and after the load (:func:`page_out`). Pages that are
  still the file's are dropped and stay in the page cache, where the next load, or a fallback,
  finds them; a page written since it was mapped is paged out instead (``MADV_PAGEOUT``,
  Linux 5.4 on), which keeps its contents.
"""

from __future__ import annotations

import mmap
import re

import numpy as np

from tasc.accel.native import MADV_DONTNEED, MADV_PAGEOUT, madvise
from tasc.accel.quantized import layer_linears, unsupported


def mapped_weights(model, weights: str, gguf) -> set[int]:
    """ids of the parameters to leave mapped for a model decoded on ``weights``: a quantised
    format of tasc.accel.quantized.WEIGHTS, or "float32" with tasc's kernels, whose steps read
    packed copies and whose prompts read the mapped weights through BLAS (their pages stay);
    anything else: none."""
    if weights != "float32" and unsupported(model, weights, gguf) is not None:
        return set()
    if weights == "float32" and not hasattr(getattr(model, "base_model", model), "layers"):
        return set()
    modules = (model.get_input_embeddings(), model.get_output_embeddings(), *(m for _, m in layer_linears(model)))
    return {id(m.weight) for m in modules}


_FILE_MAPPING = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) \S+ \S+ \S+ \S+ +/", re.M)


def _file_ranges() -> list[tuple[int, int]]:
    """The address ranges of this process's file mappings (none without /proc)."""
    try:
        with open("/proc/self/maps") as f:
            text = f.read()
    except OSError:
        return []
    return [(int(lo, 16), int(hi, 16)) for lo, hi in _FILE_MAPPING.findall(text)]


def _whole_pages(arrays) -> list[tuple[int, int]]:
    """(start, end) of the whole pages inside each of ``arrays`` (torch tensors or numpy arrays)."""
    page, out = mmap.PAGESIZE, []
    for a in arrays:
        at, size = (a.data_ptr(), a.numel() * a.element_size()) if hasattr(a, "data_ptr") else (a.ctypes.data, a.nbytes)
        start, end = -(-at // page) * page, (at + size) // page * page
        if end > start:
            out.append((start, end))
    return out


def _inside(span: tuple[int, int], ranges: list[tuple[int, int]]) -> bool:
    return any(lo <= span[0] and span[1] <= hi for lo, hi in ranges)


def file_spans(arrays) -> list[tuple[int, int]]:
    """(start, end) of the whole pages inside each of ``arrays`` (torch tensors or numpy
    arrays) that lie in a file mapping."""
    ranges = _file_ranges()
    return [s for s in _whole_pages(arrays) if _inside(s, ranges)]


def _only_file_pages(start: int, end: int) -> bool:
    """True when no page of [start, end) is a private copy (written since it was mapped: present
    and not a file page, or swapped out), by /proc/self/pagemap (bits 63 present, 62 swapped, 61
    file page); False where that cannot be read."""
    page = mmap.PAGESIZE
    try:
        with open("/proc/self/pagemap", "rb") as f:
            f.seek(start // page * 8)
            entries = np.frombuffer(f.read((end - start) // page * 8), dtype=np.uint64)
    except OSError:
        return False
    present, swapped, file = ((entries >> np.uint64(bit)) & np.uint64(1) for bit in (63, 62, 61))
    return len(entries) == (end - start) // page and not swapped.any() and bool(file[present == 1].all())


def _advise_out(spans: list[tuple[int, int]]) -> int:
    """Take the pages of ``spans`` (in file mappings) out of this process: dropped where every
    page is still the file's (MADV_DONTNEED: they stay in the page cache, for the next load
    and for anything that reads them again), else paged out (MADV_PAGEOUT keeps a private
    copy's contents). Returns the bytes taken out."""
    total = 0
    for start, end in spans:
        advice = MADV_DONTNEED if _only_file_pages(start, end) else MADV_PAGEOUT
        if not madvise(start, end - start, advice):
            return total  # a kernel without MADV_PAGEOUT
        total += end - start
    return total


def page_out(spans: list[tuple[int, int]]) -> int:
    """After quantisation: take the pages of ``spans`` (:func:`file_spans` of the parameters,
    taken at load) out of the process, as :class:`Releaser` does weight by weight; spans no
    longer in a file mapping are left alone. Returns the bytes taken out (0 where the call is
    missing)."""
    ranges = _file_ranges()
    return _advise_out([s for s in spans if _inside(s, ranges)])


class Releaser:
    """Hands back the file pages of each weight (a tensor or array) once it is quantised: the
    ``release`` of tasc.accel.quantized.quantize_model, for one load. The process's file
    mappings are read at the first call, and again only for a weight outside them (a file mapped
    since): at every call the read cost more than the quantisation (1,600 mappings)."""

    def __init__(self):
        self.ranges: list[tuple[int, int]] | None = None

    def __call__(self, weight) -> int:
        spans = _whole_pages([weight])
        if self.ranges is None or not all(_inside(s, self.ranges) for s in spans):
            self.ranges = _file_ranges()
        return _advise_out([s for s in spans if _inside(s, self.ranges)])
