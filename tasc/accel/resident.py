"""What of a model decoded on quantised weights stays in memory.

Decoding on quantised weights reads their kernel layouts (tasc.accel.quant), the norms, and
the embedding rows of the tokens it meets; the model's fp32 linears and head are read only by a
fallback (a call autograd differentiates, the portable kernel's long prompts) or a
re-quantisation after a change. So:

- :func:`mapped_weights` names the fp32 parameters that loading leaves memory-mapped
  (copy-on-write) from the model's safetensors file instead of copying them: the layers'
  linears, the head and the embedding (of which a step reads only its tokens' rows). As with
  llama.cpp's memory-mapped GGUF files, overwriting a model folder in place under a process
  that serves it is not supported; tasc itself writes every model folder (conversions,
  fine-tunes, vocabulary rounds) by renaming a finished temporary one.
- :func:`page_out` hands back the file pages that loading read and decoding will not: those
  a copy read, and (:class:`Releaser`) each fp32 weight's once it is quantised, so that loading
  holds one weight's pages at a time, not the whole file. The kernel reads them again from the
  file if ever needed. Without ``MADV_PAGEOUT`` (not Linux, or Linux before 5.4)
  nothing is handed back; the pages then go first when memory runs short.
"""

from __future__ import annotations

import mmap
import re

from tasc.accel.native import MADV_PAGEOUT, madvise
from tasc.accel.quantized import layer_linears, unsupported


def mapped_weights(model, weights: str, gguf) -> set[int]:
    """ids of the parameters to leave mapped for a model decoded on ``weights``: a quantised
    format of tasc.accel.quantized.WEIGHTS, or "float32" with tasc's kernels, whose steps read
    packed copies and whose prompts read the mapped weights through BLAS (their pages are not
    handed back); anything else: none."""
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


def _advise_out(spans: list[tuple[int, int]]) -> int:
    total = 0
    for start, end in spans:
        if not madvise(start, end - start, MADV_PAGEOUT):
            return total  # a kernel without MADV_PAGEOUT
        total += end - start
    return total


def page_out(spans: list[tuple[int, int]]) -> int:
    """After quantisation: hand back the file pages of ``spans``, :func:`file_spans` of the
    parameters taken before loading copied the ones it keeps (the copy read their pages). Spans
    no longer in a file mapping are left alone. Returns the bytes handed back (0 where the call
    is missing)."""
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
