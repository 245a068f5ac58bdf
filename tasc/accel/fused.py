"""The lean decoder's decode and verify steps in one C call, for quantised weights.

Run op by op from Python, a small model's step costs more in per-operation overhead than in
arithmetic once its weights are quantised. :class:`FusedStep` hands the whole layer stack of a
step (up to ``packed.LONG`` tokens) to ``kernels/decoder.c``: the embedding rows, RMSNorm, the
fused q/k/v, output, gate/up and down linears on the quantised kernel (tasc.accel.quant), rotary
rows the model's own rotary module computed, the KV cache writes, the row-wise attention of
tasc.accel.attention and, for greedy steps (:meth:`FusedStep.argmax`), the quantised LM head's
argmax of the kept rows. Every piece is row-wise, so a k-token verify step still gives bitwise
the rows of k one-token steps. The Python side keeps the pointers it passes between steps: a
step streams the weights through the caches, and the interpreter's work right after one runs
from memory, so each object it makes there costs microseconds.

Where it applies: a :class:`~tasc.accel.lean_decoder.LeanDecoder` whose layer linears are all
quantised, with RMSNorm norms (weight times x / rms), SiLU-gated MLPs, no bias but on q/k/v,
and widths the kernel takes; :func:`make_fused_step` returns None elsewhere (the lean decoder
then runs its torch path).
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Sequence

import numpy as np
import torch

from tasc.accel import quant, variants
from tasc.accel.attention import decoder_library
from tasc.accel.packed import weight_stamp
from tasc.accel.quantized import current_weight
from tasc.accel.threads import BUDGET

FUSED_MODELS = ("llama", "mistral", "qwen2")


class _Linear(ctypes.Structure):
    _fields_ = [("qs", ctypes.c_void_p), ("sc", ctypes.c_void_p), ("bias", ctypes.c_void_p),
                ("type", ctypes.c_int), ("n", ctypes.c_int)]


class _Layer(ctypes.Structure):
    _fields_ = [("norm1", ctypes.c_void_p), ("norm2", ctypes.c_void_p), ("qkv", _Linear), ("o", _Linear),
                ("gate_up", _Linear), ("down", _Linear)]


class _Model(ctypes.Structure):  # kernels/decoder.c's qmodel
    _fields_ = [(name, ctypes.c_int) for name in ("L", "D", "H", "Hkv", "hd", "F", "vocab")] + [
        ("eps", ctypes.c_float), ("scale", ctypes.c_float), ("layers", ctypes.c_void_p),
        ("final_norm", ctypes.c_void_p), ("embed", ctypes.c_void_p), ("head", _Linear), ("mm", ctypes.c_void_p),
        ("am", ctypes.c_void_p), ("isa", ctypes.c_int)]


class _Step(ctypes.Structure):  # kernels/decoder.c's qstep
    _fields_ = [("T", ctypes.c_int), ("S", ctypes.c_int), ("threads", ctypes.c_int)] + [
        (name, ctypes.c_void_p) for name in ("ids", "cos", "sin")] + [("by_position", ctypes.c_int)] + [
        (name, ctypes.c_void_p) for name in ("n", "past", "cap", "keys", "values", "keep", "out")]


def _eps(norm) -> float | None:
    """The epsilon of an RMSNorm module computing weight * x / sqrt(mean(x^2) + eps), else None."""
    if not type(norm).__name__.endswith("RMSNorm") or getattr(norm, "bias", None) is not None:
        return None
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    return float(eps) if eps is not None else None


def unsupported(lean) -> str | None:
    """Why the fused step cannot run ``lean``'s layers, or None when it can."""
    cfg = lean.model.config
    if decoder_library() is None or not variants.available() or variants.isa() is None:
        return "no decoder kernel here"
    if getattr(cfg, "model_type", None) not in FUSED_MODELS or getattr(cfg, "hidden_act", None) != "silu":
        return "not a SiLU llama-family model"
    norms = [lean.base.norm] + [n for layer in lean.base.layers for n in (layer.input_layernorm,
                                                                          layer.post_attention_layernorm)]
    if any(_eps(n) is None for n in norms) or len({_eps(n) for n in norms}) != 1:
        return "norms other than one RMSNorm"
    if lean.head_dim % 8 or cfg.hidden_size % 8:
        return "widths the kernel does not take"
    for layer in lean.layers:
        if any(g.quant is None for g in layer.groups()):
            return "linears not all quantised"
        if any(g.bias is not None for g in (layer.o, layer.gate_up, layer.down)):
            return "biases outside q/k/v"
    return None


class FusedStep:
    """One call of ``kernels/decoder.c`` per decode or verify step of a :class:`LeanDecoder`."""

    def __init__(self, lean):
        cfg = lean.model.config
        self.lean = lean
        self.hidden, self.ffn = cfg.hidden_size, lean.layers[0].gate_up.quant.n // 2
        lib = variants.library()
        self.model = _Model(L=len(lean.layers), D=self.hidden, H=lean.heads, Hkv=lean.kv_heads, hd=lean.head_dim,
                            F=self.ffn, eps=_eps(lean.base.norm), scale=float(lean.layers[0].attn.scaling),
                            mm=ctypes.cast(lib.tasc_quant_matmul, ctypes.c_void_p).value,
                            am=ctypes.cast(lib.tasc_quant_argmax, ctypes.c_void_p).value,
                            isa=variants.ISAS.index(variants.isa()))
        self.vectorised = variants.isa() != "ref"  # the portable C variant: long prompts go to BLAS
        self.stamps = None
        self.local = threading.local()  # a scratch buffer per calling thread
        rotary = lean.base.rotary_emb
        kind = str(getattr(rotary, "rope_type", "default"))
        # Frequencies that depend on the sequence length cannot come from a table (see rope_rows).
        self.rope_table = not ("dynamic" in kind or kind == "longrope"
                               or not isinstance(getattr(rotary, "inv_freq", None), torch.Tensor))
        self.rope = None  # (inv_freq tensor, cos table, sin table, their addresses), see rope_rows
        self.table = None  # (embedding weight, its numpy view and address, or None), see embeddings
        self.head = None  # the QuantWeight the model's head field points into
        self.refresh()

    def _scratch(self, name: str, floats: int) -> int:
        """The address of this thread's buffer ``name`` of at least ``floats`` float32, kept
        between steps: a new buffer every step would cost page faults on each."""
        buf = getattr(self.local, name, None)
        if buf is None or buf[0].size < floats:
            array = np.empty(floats + floats // 2, dtype=np.float32)
            buf = array, array.ctypes.data
            setattr(self.local, name, buf)
        return buf[1]

    def _linear(self, group) -> _Linear:
        qs, sc = group.quant.packed()
        bias = group.bias.contiguous() if group.bias is not None else None
        self._keep.append(bias)
        return _Linear(qs.ctypes.data, sc.ctypes.data, bias.data_ptr() if bias is not None else None,
                       quant.TYPES[group.quant.fmt], group.quant.n)

    def refresh(self) -> None:
        """Rebuild the layer table after the lean decoder re-fused changed weights."""
        stamps = [id(g.quant) for layer in self.lean.layers for g in layer.groups()]
        if stamps == self.stamps:
            return
        # Every layout a step reads in one buffer on huge pages; the head's moves too, so the
        # table points at it again on the next argmax.
        head = self.lean.model.get_output_embeddings()
        heads = [current_weight(head)] if "_tasc_quant" in getattr(head, "__dict__", {}) else []
        quant.pack_together([g.quant for layer in self.lean.layers for g in layer.groups()] + heads)
        self.head = None
        self._keep = []  # tensors the table points into
        layers = (_Layer * len(self.lean.layers))()
        for i, (mine, theirs) in enumerate(zip(self.lean.layers, self.lean.base.layers, strict=False)):
            n1, n2 = theirs.input_layernorm.weight.detach(), theirs.post_attention_layernorm.weight.detach()
            self._keep += [n1, n2]
            layers[i] = _Layer(n1.data_ptr(), n2.data_ptr(), self._linear(mine.qkv), self._linear(mine.o),
                               self._linear(mine.gate_up), self._linear(mine.down))
        final_norm = self.lean.base.norm.weight.detach()
        self._keep.append(final_norm)
        self.model.layers, self.model.final_norm = ctypes.addressof(layers), final_norm.data_ptr()
        self.layers, self.stamps = layers, stamps

    def signature(self) -> tuple:
        """What a step's rows depend on besides its tokens: the identity, in-place version and
        shape of every weight (the linears' as their groups last quantised them, the norms, the
        embedding table, the rotary frequencies). Stored prompt rows are valid while it stays
        the same (tasc.accel.prefix)."""
        base = self.lean.base
        linears = tuple(tuple(g.stamps or ()) for layer in self.lean.layers for g in layer.groups())
        tensors = [*self._keep, base.embed_tokens.weight, getattr(base.rotary_emb, "inv_freq", None)]
        return linears, tuple(weight_stamp(t) for t in tensors if isinstance(t, torch.Tensor))

    def embeddings(self) -> np.ndarray | None:
        """The float32 (vocab, hidden) embedding table the step copies rows from (a view: in-place
        changes show through), or None where the embedding is not a plain float32 table; then
        the model's module computes them. Embeddings without torch ops: those cost more per step
        than the copy, and run on torch's thread pool, which stalls beside a busy neighbour
        (tasc.accel.threads)."""
        embed = self.lean.base.embed_tokens
        w = embed.weight
        if self.table is None or self.table[0] is not w:
            plain = type(embed) is torch.nn.Embedding and w.dtype == torch.float32 and w.is_contiguous()
            self.table = w, w.detach().numpy() if plain else None, w.data_ptr() if plain else None
        return self.table[1]

    def rope_rows(self, need: int) -> tuple[np.ndarray, np.ndarray]:
        """The rotary (cos, sin) tables, (rows, head_dim) float32 for positions 0..rows-1 with
        rows >= ``need``: what the model's rotary module computed for those positions, bitwise
        (every element is its own product, cosine and sine); grown as needed."""
        rotary = self.lean.base.rotary_emb
        if self.rope is None or self.rope[0] is not rotary.inv_freq or len(self.rope[1]) < need:
            # A multiple of 512 rows: torch's elementwise loops then take every element through
            # the same vector code (a tail would go through scalar code, with other last bits).
            n = max(-(-need // 512) * 512, 2 * len(self.rope[1]) if self.rope is not None else 512)
            x = torch.zeros(1, 1, self.hidden)
            cos, sin = (r[0].float().numpy().copy() for r in rotary(x, torch.arange(n)[None]))
            self.rope = rotary.inv_freq, cos, sin, cos.ctypes.data, sin.ctypes.data
        return self.rope[1], self.rope[2]

    def __call__(self, ids: list[int], cache) -> torch.Tensor:
        """As LeanDecoder.forward for a step of at most ``packed.LONG`` tokens."""
        return self.many([(ids, cache)])[0]

    def many(self, batch: Sequence[tuple[Sequence[int], object]]) -> list[torch.Tensor]:
        """One step for several requests: (ids, cache) pairs, each cache its own request's ->
        each request's (len(ids), hidden) final normed hidden states. The rows share every
        linear (the weights are read once for all of them); each attends over its own cache.
        A request's rows come out bitwise as in a step of its own."""
        counts = [len(ids) for ids, _ in batch]
        h = torch.empty(sum(counts), self.hidden)
        self._step(batch, h.data_ptr(), None, None)
        if len(batch) == 1:
            return [h]
        ends = np.cumsum(counts).tolist()
        return [h[e - k : e] for e, k in zip(ends, counts, strict=True)]

    def argmax(self, batch: Sequence[tuple[Sequence[int], object, int]], head: quant.QuantWeight) -> list[list[int]]:
        """One step for several requests, (ids, cache, keep) each, ending in the greedy ids of
        each request's last ``keep`` rows through the quantised LM head ``head``: the ids that
        ``head.argmax`` gives for the hidden states :meth:`many` returns, in the same C call."""
        if head is not self.head:
            qs, sc = head.packed()
            self.model.head = _Linear(qs.ctypes.data, sc.ctypes.data, None, quant.TYPES[head.fmt], head.n)
            self.head = head
        keeps = [keep for _, _, keep in batch]
        out = (ctypes.c_int64 * sum(keeps))()
        t = sum(len(ids) for ids, _, _ in batch)
        self._step([(ids, cache) for ids, cache, _ in batch], self._scratch("h", t * self.hidden), keeps, out)
        ids, at = list(out), 0
        return [ids[at : (at := at + keep)] for keep in keeps]

    def _step(self, batch, h: int, keeps: list[int] | None, out) -> None:
        """The C call: ``batch`` (ids, cache) pairs; at address h (T, hidden) float32 the final
        normed hidden states; with ``keeps``, in ``out`` (a ctypes int64 array) the greedy ids
        of each request's last rows. Pointers come from values kept between steps: right after
        a step the interpreter's data is out of the caches, and every object made costs."""
        lean, caches, m = self.lean, [c for _, c in batch], self.model
        counts, pasts = [len(ids) for ids, _ in batch], [c.length for c in caches]
        t, s = sum(counts), len(batch)
        for kv, k in zip(caches, counts, strict=True):
            kv.reserve(k)
        ids = [i for ids, _ in batch for i in ids]
        table = self.embeddings()
        m.embed, m.vocab = (self.table[2], len(table)) if table is not None else (None, 0)
        if table is None:
            embedded = lean.base.embed_tokens(torch.as_tensor([ids], dtype=torch.long))[0]
            ctypes.memmove(h, embedded.float().contiguous().data_ptr(), embedded.numel() * 4)
        longest = max(p + k for p, k in zip(pasts, counts, strict=True))
        if self.rope_table:
            self.rope_rows(longest)
            rope = self.rope[3:]
        else:  # rows for this step's positions only
            positions = torch.from_numpy(np.concatenate([np.arange(p, p + k) for p, k in zip(pasts, counts,
                                                                                             strict=True)]))
            rows = [r[0].float().contiguous() for r in lean.base.rotary_emb(torch.zeros(1, 1, self.hidden),
                                                                            positions[None])]
            rope = [r.data_ptr() for r in rows]
        threads = BUDGET.threads(torch.get_num_threads())
        hd, nq, nkv = lean.head_dim, lean.heads * lean.head_dim, lean.kv_heads * lean.head_dim
        scratch = self._scratch("work", t * (self.hidden + 3 * nq + 2 * nkv + 3 * self.ffn + 3)
                                + threads * (longest + 8 + hd))
        ints, ptrs = ctypes.c_int * s, ctypes.c_void_p * s
        # ctypes arrays for the step's fields, alive until the call returns
        arrays = [(ctypes.c_int * t)(*ids), ints(*counts), ints(*pasts), ints(*[c.keys.shape[3] for c in caches]),
                  ptrs(*[c.keys.data_ptr() for c in caches]), ptrs(*[c.values.data_ptr() for c in caches]),
                  ints(*keeps) if keeps is not None else None]
        address = [ctypes.addressof(a) if a is not None else None for a in arrays]
        step = _Step(t, s, threads, address[0], *rope, self.rope_table, *address[1:],
                     ctypes.addressof(out) if out is not None else None)
        rc = decoder_library().tasc_decoder_step(ctypes.byref(m), ctypes.byref(step), h, scratch)
        if rc == -5:
            raise IndexError(f"token id out of range: the embedding table has {m.vocab} rows, ids {ids}")
        if rc:
            raise RuntimeError(f"decoder step: {variants.ERRORS.get(rc, rc)}")
        for kv, p, k in zip(caches, pasts, counts, strict=True):
            kv.length = p + k


def make_fused_step(lean) -> FusedStep | None:
    return FusedStep(lean) if unsupported(lean) is None else None
