"""The lean decoder's decode and verify steps in one C call, for quantised weights.

Run op by op from Python, a small model's step costs more in per-operation overhead than in
arithmetic once its weights are quantised. :class:`FusedStep` hands the whole layer stack of a
step (up to ``packed.LONG`` tokens) to ``kernels/decoder.c``: RMSNorm, the fused q/k/v, output,
gate/up and down linears on the quantised kernel (tasc.accel.quant), rotary from the model's own
rotary module, the KV cache writes and the row-wise attention of tasc.accel.attention. Every
piece is row-wise, so a k-token verify step still gives bitwise the rows of k one-token steps.

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

from tasc.accel import quant
from tasc.accel.attention import decoder_library
from tasc.accel.threads import BUDGET

FUSED_MODELS = ("llama", "mistral", "qwen2")


class _Linear(ctypes.Structure):
    _fields_ = [("qs", ctypes.c_void_p), ("sc", ctypes.c_void_p), ("bias", ctypes.c_void_p),
                ("type", ctypes.c_int), ("n", ctypes.c_int)]


class _Layer(ctypes.Structure):
    _fields_ = [("norm1", ctypes.c_void_p), ("norm2", ctypes.c_void_p), ("qkv", _Linear), ("o", _Linear),
                ("gate_up", _Linear), ("down", _Linear)]


def _eps(norm) -> float | None:
    """The epsilon of an RMSNorm module computing weight * x / sqrt(mean(x^2) + eps), else None."""
    if not type(norm).__name__.endswith("RMSNorm") or getattr(norm, "bias", None) is not None:
        return None
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    return float(eps) if eps is not None else None


def unsupported(lean) -> str | None:
    """Why the fused step cannot run ``lean``'s layers, or None when it can."""
    cfg = lean.model.config
    if decoder_library() is None or not quant.available() or quant.isa() is None:
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
        self.eps = _eps(lean.base.norm)
        self.scale = float(lean.layers[0].attn.scaling)
        self.hidden, self.ffn = cfg.hidden_size, lean.layers[0].gate_up.quant.n // 2
        self.mm = ctypes.cast(quant.library().tasc_quant_matmul, ctypes.c_void_p).value
        self.isa = quant.ISAS.index(quant.isa())
        self.vectorised = quant.isa() != "ref"  # the portable C variant: long prompts go to BLAS
        self.stamps = None
        self.local = threading.local()  # a scratch buffer per calling thread
        rotary = lean.base.rotary_emb
        kind = str(getattr(rotary, "rope_type", "default"))
        # Frequencies that depend on the sequence length cannot come from a table (see _rotary).
        self.rope_table = not ("dynamic" in kind or kind == "longrope"
                               or not isinstance(getattr(rotary, "inv_freq", None), torch.Tensor))
        self.rope = None  # (inv_freq tensor, cos table, sin table) by position, see _rotary
        self.table = None  # (embedding weight, its numpy view), see _embed
        self.refresh()

    def _scratch(self, floats: int) -> np.ndarray:
        """This thread's scratch of at least ``floats`` float32, kept between steps: a new
        buffer every step would cost page faults on each."""
        buf = getattr(self.local, "buf", None)
        if buf is None or buf.size < floats:
            buf = self.local.buf = np.empty(floats + floats // 2, dtype=np.float32)
        return buf

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
        self._keep = []  # tensors the table points into
        layers = (_Layer * len(self.lean.layers))()
        for i, (mine, theirs) in enumerate(zip(self.lean.layers, self.lean.base.layers, strict=False)):
            n1, n2 = theirs.input_layernorm.weight.detach(), theirs.post_attention_layernorm.weight.detach()
            self._keep += [n1, n2]
            layers[i] = _Layer(n1.data_ptr(), n2.data_ptr(), self._linear(mine.qkv), self._linear(mine.o),
                               self._linear(mine.gate_up), self._linear(mine.down))
        self.final_norm = self.lean.base.norm.weight.detach()
        self.layers, self.stamps = layers, stamps

    def _embed(self, ids: list[int]) -> torch.Tensor:
        """(T, hidden) float32 embeddings, a copy. Indexed in numpy where the table is a plain
        float32 nn.Embedding: torch's own ops cost more per step than the copy, and they run on
        torch's thread pool, which stalls beside a busy neighbour (tasc.accel.threads)."""
        embed = self.lean.base.embed_tokens
        w = embed.weight
        if self.table is None or self.table[0] is not w:  # a view: in-place changes show through
            plain = type(embed) is torch.nn.Embedding and w.dtype == torch.float32 and w.is_contiguous()
            self.table = w, w.detach().numpy() if plain else None
        if self.table[1] is None:
            return embed(torch.as_tensor([ids], dtype=torch.long))[0].contiguous().clone()
        return torch.from_numpy(self.table[1][ids])

    def _rotary(self, positions: np.ndarray, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotary cos and sin rows of ``positions``, (T, head_dim) float32 each: rows of a
        table the model's rotary module computed for positions 0..n-1 (grown as needed), the
        same values bitwise (every element is its own product, cosine and sine). Rotary types
        whose frequencies depend on the sequence length are computed per step instead."""
        rotary = self.lean.base.rotary_emb
        if not self.rope_table:
            cos, sin = rotary(h[None], torch.from_numpy(positions)[None])
            return cos[0].float().contiguous(), sin[0].float().contiguous()
        need = int(positions.max()) + 1
        if self.rope is None or self.rope[0] is not rotary.inv_freq or len(self.rope[1]) < need:
            # A multiple of 512 rows: torch's elementwise loops then take every element through
            # the same vector code (a tail would go through scalar code, with other last bits).
            n = max(-(-need // 512) * 512, 2 * len(self.rope[1]) if self.rope is not None else 512)
            cos, sin = rotary(h[:1][None], torch.arange(n)[None])
            self.rope = rotary.inv_freq, cos[0].float().numpy().copy(), sin[0].float().numpy().copy()
        return torch.from_numpy(self.rope[1][positions]), torch.from_numpy(self.rope[2][positions])

    def __call__(self, ids: list[int], cache) -> torch.Tensor:
        """As LeanDecoder.forward for a step of at most ``packed.LONG`` tokens."""
        return self.many([(ids, cache)])[0]

    def many(self, batch: Sequence[tuple[Sequence[int], object]]) -> list[torch.Tensor]:
        """One step for several requests: (ids, cache) pairs, each cache its own request's ->
        each request's (len(ids), hidden) final normed hidden states. The rows share every
        linear (the weights are read once for all of them); each attends over its own cache.
        A request's rows come out bitwise as in a step of its own."""
        lean, caches = self.lean, [c for _, c in batch]
        counts = [len(ids) for ids, _ in batch]
        pasts = [c.length for c in caches]
        t = sum(counts)
        for kv, k in zip(caches, counts, strict=True):
            kv.reserve(k)
        h = self._embed([i for ids, _ in batch for i in ids])
        positions = np.concatenate([np.arange(p, p + k) for p, k in zip(pasts, counts, strict=True)])
        cos, sin = self._rotary(positions, h)
        threads = BUDGET.threads(torch.get_num_threads())
        hd, nq, nkv = lean.head_dim, lean.heads * lean.head_dim, lean.kv_heads * lean.head_dim
        longest = max(p + k for p, k in zip(pasts, counts, strict=True))
        scratch = self._scratch(t * (self.hidden + 3 * nq + 2 * nkv + 3 * self.ffn + 3) + threads * (longest + 8 + hd))
        n_req, ints, ptrs = len(batch), ctypes.c_int * len(batch), ctypes.c_void_p * len(batch)
        rc = decoder_library().tasc_decoder_step(
            t, len(lean.layers), self.hidden, lean.heads, lean.kv_heads, hd, self.ffn, self.eps, self.scale,
            h.data_ptr(), cos.data_ptr(), sin.data_ptr(), self.layers, self.final_norm.data_ptr(), n_req,
            ints(*counts), ptrs(*[c.keys.data_ptr() for c in caches]), ptrs(*[c.values.data_ptr() for c in caches]),
            ints(*[c.keys.shape[3] for c in caches]), ints(*pasts), self.mm, self.isa, threads, scratch.ctypes.data)
        if rc:
            raise RuntimeError(f"decoder step: {quant.ERRORS.get(rc, rc)}")
        for kv, p, k in zip(caches, pasts, counts, strict=True):
            kv.length = p + k
        if len(batch) == 1:
            return [h]
        ends = np.cumsum(counts).tolist()
        return [h[e - k : e] for e, k in zip(ends, counts, strict=True)]


def make_fused_step(lean) -> FusedStep | None:
    return FusedStep(lean) if unsupported(lean) is None else None
