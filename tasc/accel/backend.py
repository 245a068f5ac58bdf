"""The backend of a model's decoding: what tasc.accel applied to it, and the forward passes of
one request behind a small step API.

The decoders need, per request, the logits (or only the greedy ids) of the last positions after
feeding some new tokens (the prompt, a one-token step, a k-token verify step), and to drop the
last tokens of the KV cache when a draft is rejected. :class:`Steps` gives exactly that, so the
verify loop in tasc.decode reads as the algorithm and the machinery stays here: the lean decoder
forward (tasc.accel.lean_decoder) and the exact argmax head (tasc.accel.argmax_head, C kernels)
where :meth:`Backend.accelerated` could apply them, else transformers' forward with a
``DynamicCache``. Both paths emit the same greedy tokens: the lean forward returns transformers'
hidden states bitwise, and the argmax head the argmax of the full fp32 head.

A backend from :meth:`Backend.accelerated` stays with its model (a private attribute, read only
in this package), so ``Backend.for_model(model)`` finds it again where only the torch model is
passed around.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from tasc.accel import variants
from tasc.accel.argmax_head import ArgmaxHead, make_argmax_head
from tasc.accel.attention import group_attention
from tasc.accel.lean_decoder import LeanDecoder, make_lean_decoder
from tasc.accel.packed import pack_linears
from tasc.accel.prefix import PrefixStore, reuses_prefixes
from tasc.accel.quantized import QuantHead, make_quant_head, quantize_model

# The attribute of the torch model that holds its accelerated backend; unpack_linears
# (tasc.accel.packed) drops it with the packed copies the lean decoder runs on.
ATTACHED = "_tasc_backend"


def _cache_kw(forward) -> str:
    """The KV cache keyword of a forward (renamed across transformers versions)."""
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


class Backend:
    """How one model runs the forward passes of decoding.

    ``model``: the torch model; ``kernels``: what tasc.accel applied, a label for reports such as
    "packed-linear+grouped-attention+argmax-head+lean-decoder" ("torch": nothing); ``head``: the
    exact argmax head or None; ``lean``: the lean decoder forward or None (then transformers'
    forward runs); ``prefixes``: the KV rows of recent prompts (tasc.accel.prefix), where
    reusing them is lossless, else None. :meth:`start` begins a request."""

    def __init__(self, model, kernels: str = "torch", head: ArgmaxHead | QuantHead | None = None,
                 lean: LeanDecoder | None = None):
        self.model, self.kernels, self.head, self.lean = model, kernels, head, lean
        self.quant_label: str | None = None  # the quantised weights' label (tasc.accel.quantized)
        self.cache_kw = _cache_kw(model.forward)
        # The argmax head without the lean decoder runs the decoder stack alone.
        self.base_cache_kw = _cache_kw(getattr(model, "base_model", model).forward)
        self.prefixes = PrefixStore() if reuses_prefixes(lean) else None

    @classmethod
    def for_model(cls, model) -> Backend:
        """The backend of ``model``: ``model`` itself when it is a Backend, the one
        :meth:`accelerated` attached to it, else transformers' forward ("torch")."""
        if isinstance(model, Backend):
            return model
        attached = getattr(model, ATTACHED, None)
        return attached if attached is not None else cls(model)

    @classmethod
    def accelerated(cls, model, weights: str = "float32", gguf: Path | None = None,
                    release: Callable[[torch.Tensor], object] | None = None) -> Backend:
        """Apply the CPU speed-ups that fit ``model`` and attach the backend that runs them; its
        ``kernels`` names what applied ("torch" when nothing did).

        weights: "float32" packs the fp32 linears and adds the exact int8-screened argmax head;
        a quantised format (tasc.accel.quantized.WEIGHTS: "gguf" for the blocks of the file
        ``gguf``, or "q8_0", "q4_0", "q4_1") puts the linears and the LM head on the quantised
        kernel. Both then get grouped attention and the lean decoder forward. ``release``: called
        with each fp32 weight once quantised (see :func:`quantize_model`)."""
        parts, head = [], None
        label = quantize_model(model, weights, gguf, release) if weights != "float32" else None
        if label is not None:
            parts.append(f"quant[{label}; {variants.isa()}]")
            head = make_quant_head(model)
        elif pack_linears(model):
            parts.append("packed-linear")
        if group_attention(model):
            parts.append("grouped-attention")
        if head is None:
            head = make_argmax_head(model)
        if head is not None:
            parts.append("argmax-head")
        lean = make_lean_decoder(model)  # after pack_linears: it runs on the packed copies
        if lean is not None:
            parts.append("lean-decoder")
            if lean.fused is not None:
                parts.append("fused-step")
        backend = cls(model, "+".join(parts) or "torch", head, lean)
        backend.quant_label = label
        setattr(model, ATTACHED, backend)
        return backend

    def start(self, reuse_prefix: bool = True) -> Steps:
        """A new request: an empty KV cache and a pass counter at 0. ``reuse_prefix``: its
        prompt may start from the stored rows of an earlier prompt's shared prefix (where the
        backend keeps them), and its own rows are stored for later prompts."""
        return Steps(self, reuse_prefix)


class Steps:
    """The forward passes of one request over its KV cache (see :meth:`Backend.start`).

    Every call takes ``ids``, the new tokens after the cached ones, and the cache grows by them;
    ``passes`` counts the forward passes; ``reused``: the prompt tokens whose KV rows came from
    the backend's prefix store instead of a forward pass."""

    def __init__(self, backend: Backend, reuse_prefix: bool = True):
        self.backend = backend
        self.model, self.head, self.lean = backend.model, backend.head, backend.lean
        self.passes = self.reused = 0
        self.prefixes = backend.prefixes if reuse_prefix else None
        self._prompt: tuple[list[int], object] | None = None  # (ids, weights' signature) until stored
        if self.lean is not None:
            self.lean.refresh()  # weights may have changed since the last request
            self.cache = self.lean.new_cache()
        else:
            from transformers import DynamicCache

            self.cache = DynamicCache(config=self.model.config)

    @property
    def length(self) -> int:
        """Tokens in the cache."""
        return self.cache.length if self.lean is not None else self.cache.get_seq_length()

    def prefill(self, ids: Sequence[int], keep: int = 1) -> torch.Tensor:
        """The prompt: :meth:`step` on the empty cache."""
        if self.length:
            raise ValueError(f"prefill starts a request, but {self.length} tokens are cached")
        return self.step(ids, keep)

    @torch.inference_mode()
    def step(self, ids: Sequence[int], keep: int) -> torch.Tensor:
        """float32 logits (keep, V) of the last ``keep`` positions."""
        self.passes += 1
        if self.lean is not None:
            ids = self._begin(list(ids), keep)
            hidden = self.lean.forward(ids, self.cache)
            self._end()
            return self.model.get_output_embeddings()(hidden[-keep:]).float()
        x = torch.as_tensor([list(ids)], dtype=torch.long, device=self.model.device)
        out = self.model(input_ids=x, use_cache=True, logits_to_keep=keep, **{self.backend.cache_kw: self.cache})
        return out.logits[0, -keep:].float()

    @torch.inference_mode()
    def argmax(self, ids: Sequence[int], keep: int) -> list[int]:
        """The greedy next token after each of the last ``keep`` positions (on an empty cache:
        a prefill).

        With the exact argmax head (up to its ``max_rows``), the decoder stack runs without the
        LM head and the head picks the argmax from its int8 screen: the same ids as the argmax
        of :meth:`step`'s logits, without computing most of them."""
        if self.head is None or keep > self.head.max_rows:
            return self.step(ids, keep).argmax(dim=-1).tolist()
        self.passes += 1
        if self.lean is not None:
            ids = self._begin(list(ids), keep)
            out = _argmax_batch(self.lean, self.head, [(self, ids, keep)])[0]
            self._end()
            return out
        x = torch.as_tensor([list(ids)], dtype=torch.long, device=self.model.device)
        out = self.model.base_model(input_ids=x, use_cache=True, **{self.backend.base_cache_kw: self.cache})
        return self.head(out.last_hidden_state[0, -keep:].numpy()).tolist()

    def _begin(self, ids: list[int], keep: int) -> list[int]:
        """The ids a pass must still compute: on an empty cache (a prompt) with a prefix store,
        those after the longest stored prefix, whose rows are copied into the cache."""
        if self.prefixes is None or self.length:
            return ids
        signature = self.lean.fused.signature()
        self._prompt = ids, signature
        n = self.prefixes.restore(ids, self.cache, signature, keep)
        self.reused += n
        return ids[n:]

    def _end(self) -> None:
        """After a prompt's pass: store its rows for later prompts."""
        if self._prompt is not None:
            ids, signature = self._prompt
            self.prefixes.add(ids, self.cache, signature)
            self._prompt = None

    def crop(self, n_remove: int) -> None:
        """Forget the last ``n_remove`` cached tokens (rejected draft tokens)."""
        if n_remove > 0:
            self.cache.crop(-n_remove)


def _argmax_fused(lean: LeanDecoder, head, batch) -> list[list[int]] | None:
    """LeanDecoder.argmax_many with a quantised head (the fused step runs its argmax); None with
    another head, or where the fused step does not take the batch."""
    return lean.argmax_many(batch, head.weight()) if isinstance(head, QuantHead) else None


@torch.inference_mode()
def argmax_together(batch: Sequence[tuple[Steps, Sequence[int], int]]) -> list[list[int]]:
    """:meth:`Steps.argmax` for several requests, (steps, ids, keep) each: one forward pass for
    all where their backend's fused step runs, the rows sharing every weight read, each
    request's tokens bitwise those of its own :meth:`Steps.argmax`. Elsewhere one pass each."""
    first = batch[0][0]
    lean, head = first.lean, first.head
    if lean is None or lean.fused is None or head is None or any(s.backend is not first.backend for s, _, _ in batch):
        return [steps.argmax(ids, keep) for steps, ids, keep in batch]
    for steps, _, _ in batch:
        steps.passes += 1
    # A request's prompt starts from its stored prefix, as in Steps.argmax.
    batch = [(steps, steps._begin(list(ids), keep), keep) for steps, ids, keep in batch]
    out = _argmax_batch(lean, head, batch)
    for steps, _, _ in batch:
        steps._end()
    return out


def _argmax_batch(lean: LeanDecoder, head, batch) -> list[list[int]]:
    """The greedy pass of :meth:`Steps.argmax` and :func:`argmax_together` over (steps, ids,
    keep) with ids as lists: the fused step's argmax where it runs, else the lean forward and
    the head."""
    fused = _argmax_fused(lean, head, [(ids, steps.cache, keep) for steps, ids, keep in batch])
    if fused is not None:
        return fused
    hidden = lean.forward_many([(ids, steps.cache) for steps, ids, _ in batch])
    rows = torch.cat([h[-keep:] for h, (_, _, keep) in zip(hidden, batch, strict=True)]).numpy()
    ids = np.concatenate([head(rows[i : i + head.max_rows]) for i in range(0, len(rows), head.max_rows)])
    out, at = [], 0
    for _, _, keep in batch:
        out.append(ids[at : at + keep].tolist())
        at += keep
    return out
