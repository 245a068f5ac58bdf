"""Prompt prefix reuse: a new prompt starts from the KV rows of the longest prefix it shares
with a recent prompt, and only the rest goes through the model.

A task's prompts share most of their tokens (system prompt, instructions, the chat template),
and the prefill of those tokens is a large part of a short request. :class:`PrefixStore` keeps
the KV rows of the last few prompts (copies, so a request's later steps cannot touch them);
:meth:`PrefixStore.restore` copies the longest shared prefix into a new request's cache.

Contracts
  - Lossless only where a prompt's KV rows do not depend on how the prompt is split into passes:
    the fused quantised step (tasc.accel.fused), which computes every row on its own, bitwise
    the same in any split. The backend creates a store only there (:func:`reuses_prefixes`);
    elsewhere (fp32 prefill through BLAS and SDPA) rows differ in their last bits with the split.
  - Rows are valid for the weights they were computed with: every call passes the weights'
    ``signature``, and a store whose signature differs forgets everything first.
  - At least ``keep`` tokens of a prompt are left to compute (the pass must produce their
    predictions); a prefix shorter than ``min_tokens`` is not worth the copy and is not used.
  - Bounded: at most ``entries`` prompts and ``max_bytes`` of rows in all (SmolLM2-135M: 46 KB
    a token); the least recently used prompt goes first.
  - Safe to share between threads serving requests of one backend (one lock).
"""

from __future__ import annotations

import threading
from collections.abc import Hashable, Sequence

import numpy as np
import torch


def shared_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """The number of leading tokens ``a`` and ``b`` have in common."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


class PrefixStore:
    """The KV rows of recent prompts of one backend (see module doc)."""

    def __init__(self, entries: int = 4, max_bytes: int = 64 << 20, min_tokens: int = 4):
        self.entries, self.max_bytes, self.min_tokens = entries, max_bytes, min_tokens
        self._prompts: list[tuple[np.ndarray, torch.Tensor, torch.Tensor]] = []  # most recent last
        self._signature: Hashable = None
        self._lock = threading.Lock()
        self.hits = self.reused = 0  # statistics: prompts that reused a prefix, rows reused

    def clear(self) -> None:
        with self._lock:
            self._prompts.clear()

    def nbytes(self) -> int:
        """Bytes of stored rows."""
        return sum(k.nbytes + v.nbytes for _, k, v in self._prompts)

    def _check(self, signature: Hashable) -> None:
        if signature != self._signature:
            self._prompts.clear()
            self._signature = signature

    def restore(self, ids: Sequence[int], cache, signature: Hashable, keep: int = 1) -> int:
        """Copy into the empty ``cache`` (a tasc.accel.lean_decoder.LeanCache) the KV rows of the
        longest stored prefix of ``ids``, at most ``len(ids) - keep`` tokens; returns how many
        (0: nothing reused, the cache untouched)."""
        with self._lock:
            return self._restore(np.asarray(ids, dtype=np.int64), cache, signature, keep)

    def _restore(self, tokens: np.ndarray, cache, signature: Hashable, keep: int) -> int:
        self._check(signature)
        if cache.length or not self._prompts:
            return 0
        best, at = 0, -1
        for i, (stored, _, _) in enumerate(self._prompts):
            n = shared_prefix(tokens, stored)
            if n > best:
                best, at = n, i
        best = min(best, len(tokens) - keep)
        if best < self.min_tokens:
            return 0
        stored, keys, values = self._prompts.pop(at)
        self._prompts.append((stored, keys, values))  # most recently used
        cache.reserve(best)
        cache.keys[:, :, :, :best] = keys[:, :, :, :best]
        cache.values[:, :, :, :best] = values[:, :, :, :best]
        cache.length = best
        self.hits, self.reused = self.hits + 1, self.reused + best
        return best

    def add(self, ids: Sequence[int], cache, signature: Hashable) -> None:
        """Keep the rows of prompt ``ids``, the first ``len(ids)`` rows of ``cache`` (a prompt
        whose rows alone exceed ``max_bytes`` is not kept)."""
        n, tokens = len(ids), np.asarray(ids, dtype=np.int64)
        if n < self.min_tokens or cache.length < n:
            return
        keys, values = cache.keys[:, :, :, :n], cache.values[:, :, :, :n]
        if keys.nbytes + values.nbytes > self.max_bytes:
            return
        keys, values = keys.clone(), values.clone()
        with self._lock:
            self._check(signature)
            # A stored prompt that is a prefix of this one adds nothing once this one is kept.
            self._prompts = [p for p in self._prompts if shared_prefix(tokens, p[0]) < len(p[0])]
            self._prompts.append((tokens, keys, values))
            while len(self._prompts) > self.entries or self.nbytes() > self.max_bytes:
                self._prompts.pop(0)


def reuses_prefixes(lean) -> bool:
    """Whether prompt prefixes may be reused losslessly on ``lean`` (a LeanDecoder or None): its
    fused step takes whole prompts, each row computed on its own (see module doc)."""
    return lean is not None and lean.fused is not None and lean.fused.vectorised
