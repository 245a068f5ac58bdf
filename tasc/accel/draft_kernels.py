"""kernels/draft.c through ctypes: the compiled n-gram lookups and draft walks of TASC-spec.

tasc.decode.draft holds the algorithm and its numpy references (``walk_continuations_numpy``,
``BoundDraft.continuations_numpy``, ``context_continuations`` and the proposer's incremental
context index); these calls return the same (tested) at a fraction of the Python overhead,
which matters because drafting runs between every two forward passes. Each function needs
:func:`library`, which is None without a C compiler or with ``TASC_NATIVE=0``: callers check it
and run the references instead. Outputs go into caller-owned buffers (:class:`Scratch`), so a
decode step allocates no arrays for them.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Sequence

import numpy as np

from tasc.accel import native

ROWS = 64  # the most continuation rows one fused lookup and walk takes (the scratch height)


@functools.cache
def library() -> ctypes.CDLL | None:
    """kernels/draft.c with its signatures, or None (no C compiler): the references run then."""
    lib = native.load("draft")
    if lib is None:
        return None
    p, i32, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    f64 = ctypes.c_double
    # The entry points called from Python (tasc_lookup and tasc_context_rows are C-internal).
    lib.tasc_walk.argtypes = [p, i32, i32, f64, p, p]
    lib.tasc_lookup_levels.argtypes = [p, p, p, p, i32, p, p, i64, i32, i32, p, p]
    lib.tasc_corpus_draft.argtypes = [p, p, p, p, i32, p, p, i64, i32, i32, f64, p, p, p]
    lib.tasc_context_draft.argtypes = [p, p, i64, p, i32, i32, i32, f64, i32, p, p, p, p]
    for fn in (lib.tasc_walk, lib.tasc_lookup_levels, lib.tasc_corpus_draft, lib.tasc_context_draft):
        fn.restype = i32
    return lib


class Scratch:
    """One caller's buffers for drafts up to ``width`` tokens: continuation rows int64
    (ROWS, width), then the draft's tokens int64 (width,) and probabilities float64 (width,)."""

    def __init__(self, width: int):
        self.width = width
        self.rows = np.empty((ROWS, width), dtype=np.int64)
        self.toks = np.empty(width, dtype=np.int64)
        self.probs = np.empty(width, dtype=np.float64)

    def result(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Copies of the first ``k`` draft tokens and probabilities (the buffers are reused)."""
        return self.toks[:k].copy(), self.probs[:k].copy()


class NgramIndex:
    """An n-gram index (tasc.decode.draft.BoundDraft's contract) as the compiled lookups read it:
    per level the address of its sorted keys and window ends, their lengths and the level, and
    the corpus tokens padded with SEPs. Holds the arrays, so the addresses stay valid."""

    def __init__(self, keys: Sequence[np.ndarray], ends: Sequence[np.ndarray], levels: Sequence[int],
                 padded: np.ndarray):
        self._arrays = (tuple(keys), tuple(ends), padded)
        self._key_at = np.array([k.ctypes.data for k in keys], dtype=np.uint64)
        self._end_at = np.array([e.ctypes.data for e in ends], dtype=np.uint64)
        self._sizes = np.array([len(k) for k in keys], dtype=np.int64)
        self._levels = np.array(levels, dtype=np.int32)
        # The leading arguments of tasc_lookup_levels and tasc_corpus_draft.
        self.args = (self._key_at.ctypes.data, self._end_at.ctypes.data, self._sizes.ctypes.data,
                     self._levels.ctypes.data, len(self._levels), padded.ctypes.data)


def walk(rows: np.ndarray, prior: float, toks: np.ndarray, probs: np.ndarray) -> int:
    """``tasc_walk``: the greedy walk down continuation rows int64 (R, W) C-contiguous, R <= 4096,
    into toks int64 (W,) and probs float64 (W,); returns the draft length."""
    return library().tasc_walk(rows.ctypes.data, len(rows), rows.shape[1], prior, toks.ctypes.data,
                               probs.ctypes.data)


def lookup(index: NgramIndex, context: np.ndarray, out: np.ndarray) -> tuple[int, int]:
    """``tasc_lookup_levels``: the corpus rows after the longest indexed suffix of ``context``
    (int64 (L,) C-contiguous) into out int64 (max_rows, max_len); returns (rows, n matched)."""
    matched = ctypes.c_int(0)
    rows = library().tasc_lookup_levels(*index.args, context.ctypes.data, len(context), out.shape[0], out.shape[1],
                                        out.ctypes.data, ctypes.byref(matched))
    return rows, matched.value


def corpus_draft(index: NgramIndex, context: np.ndarray, max_rows: int, prior: float, scratch: Scratch) -> int:
    """``tasc_corpus_draft``: :func:`lookup` of at most ``max_rows`` (<= ROWS) rows walked by
    :func:`walk`, in one call; the draft lands in ``scratch``, its length is returned."""
    return library().tasc_corpus_draft(*index.args, context.ctypes.data, len(context), max_rows, scratch.width,
                                       prior, scratch.rows.ctypes.data, scratch.toks.ctypes.data,
                                       scratch.probs.ctypes.data)


def context_draft(context: np.ndarray, keys: np.ndarray, levels: np.ndarray, max_rows: int, prior: float,
                  use_span: bool, scratch: Scratch) -> tuple[int, int]:
    """``tasc_context_draft``: prompt-lookup rows of ``context`` (int64 (L,)), matched on ``keys``
    (int64 (L,)) at the first of ``levels`` (int32, longest first) that matches, at most
    ``max_rows`` (<= ROWS), walked with ``prior`` scaled by n / span when ``use_span``. The draft
    lands in ``scratch``; returns (its length, span: how far the most recent occurrence matches
    the context's end, 0 without a match)."""
    span = ctypes.c_int(0)
    k = library().tasc_context_draft(context.ctypes.data, keys.ctypes.data, len(context), levels.ctypes.data,
                                     len(levels), max_rows, scratch.width, prior, int(use_span),
                                     scratch.rows.ctypes.data, scratch.toks.ctypes.data, scratch.probs.ctypes.data,
                                     ctypes.byref(span))
    return k, span.value
