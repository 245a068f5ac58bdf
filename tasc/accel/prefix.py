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
  - Bounded: at most ``entries`` prompts and ``max_tokens`` rows in all; the least recently
    used prompt goes first.
"""

from __future__ import annotations

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

    def __init__(self, entries: int = 4, max_tokens: int = 8192, min_tokens: int = 4):
        self.entries, self.max_tokens, self.min_tokens = entries, max_tokens, min_tokens
        self._prompts: list[tuple[np.ndarray, torch.Tensor, torch.Tensor]] = []  # most recent last
        self._signature: Hashable = None
        self.hits = self.reused = 0  # statistics: prompts that reused a prefix, rows reused

    def clear(self) -> None:
        self._prompts.clear()

    def _check(self, signature: Hashable) -> None:
        if signature != self._signature:
            self._prompts.clear()
            self._signature = signature

    def restore(self, ids: Sequence[int], cache, signature: Hashable, keep: int = 1) -> int:
        """Copy into the empty ``cache`` (a tasc.accel.lean_decoder.LeanCache) the KV rows of the
        longest stored prefix of ``ids``, at most ``len(ids) - keep`` tokens; returns how many
        (0: nothing reused, the cache untouched)."""
        self._check(signature)
        if cache.length or not self._prompts:
            return 0
        tokens = np.asarray(ids, dtype=np.int64)
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
        """Keep the rows of prompt ``ids``, the first ``len(ids)`` rows of ``cache``."""
        self._check(signature)
        n = len(ids)
        if n < self.min_tokens or n > self.max_tokens or cache.length < n:
            return
        tokens = np.asarray(ids, dtype=np.int64)
        # A stored prompt that is a prefix of this one adds nothing once this one is kept.
        self._prompts = [p for p in self._prompts if shared_prefix(tokens, p[0]) < len(p[0])]
        self._prompts.append((tokens, cache.keys[:, :, :, :n].clone(), cache.values[:, :, :, :n].clone()))
        while len(self._prompts) > self.entries or sum(len(p[0]) for p in self._prompts) > self.max_tokens:
            self._prompts.pop(0)


def reuses_prefixes(lean) -> bool:
    """Whether prompt prefixes may be reused losslessly on ``lean`` (a LeanDecoder or None): its
    fused step takes whole prompts, each row computed on its own (see module doc)."""
    return lean is not None and lean.fused is not None and lean.fused.vectorised
