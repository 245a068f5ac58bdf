"""A lean decoder forward for CPU decoding of llama-family models (the fast path of tasc.accel.backend).

A small model's decode step spends a large share of its time in transformers' Python around
the arithmetic: module calls and keyword plumbing through every layer, the mask builder, and
the DynamicCache, which concatenates every layer's keys and values into new tensors at every
step. This runs the same layers with the same arithmetic and keeps the cache in preallocated
buffers (measurements: docs/performance.md).

Contract: each position's final hidden state from :meth:`LeanDecoder.forward` is bitwise the
same however the new tokens are split into steps (a k-token verify step or k one-token steps,
after any crops), which is what keeps greedy speculative decoding lossless. Every row-wise piece
is the model's own (its norms' ``forward``, its rotary module and ``apply_rotary_pos_emb``, its
activation); the linears are tasc's packed fp32 or quantised kernels, whose rows do not depend
on the other rows of the call; decode and verify steps (up to ``packed.LONG`` tokens) attend
row by row (tasc.accel.attention.attend_rows), since torch's attention kernels block by the
number of query rows. A prompt prefill (more tokens) runs each module as transformers would
(BLAS linears, the model's attention function), shared by greedy and speculative decoding; with
the fused quantised step (tasc.accel.fused) a prompt goes through that step LONG tokens at a time.
Against ``model.base_model(...)`` with the same linear kernels the hidden states agree up to
the rounding of attention. Linears that share an input (q/k/v, gate/up) run as one GEMM: each
output column is computed on its own, so the fused output has the same columns; with packed
fp32 weights the modules' own packed copies become views of the fused one.

Where it applies: llama, mistral and qwen2 models in float32 on the CPU with full attention
(no sliding window), SDPA or tasc's grouped SDPA, and packed linears. Elsewhere
:func:`make_lean_decoder` returns None and the backend keeps transformers' forward.
"""

from __future__ import annotations

import sys

import torch

from tasc.accel.attention import ATTENTION, attend_rows, row_invariant_available
from tasc.accel.fused import make_fused_step
from tasc.accel.packed import BLOCK, LONG, available, pack, small_gemm, weight_stamp
from tasc.accel.quant import QuantWeight
from tasc.accel.quantized import current_weight
from tasc.accel.threads import BUDGET

LEAN_MODELS = ("llama", "mistral", "qwen2")


class LeanCache:
    """Keys and values of one request: (layers, 1, H_kv, capacity, D) float32 buffers, grown by
    doubling; ``length`` tokens are valid. Cropping is a length change."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, capacity: int = 256):
        self.keys = torch.empty(layers, 1, kv_heads, capacity, head_dim)
        self.values = torch.empty_like(self.keys)
        self.length = 0

    def reserve(self, n: int) -> None:
        """Make room for ``n`` more tokens."""
        need, cap = self.length + n, self.keys.shape[3]
        if need <= cap:
            return
        while cap < need:
            cap *= 2
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = old.new_empty(*old.shape[:3], cap, old.shape[4])
            new[:, :, :, : self.length] = old[:, :, :, : self.length]
            setattr(self, name, new)

    def crop(self, max_length: int) -> None:
        """Keep the first ``max_length`` tokens; a negative value drops that many from the end
        (rejected draft tokens), as ``DynamicCache.crop`` does."""
        keep = self.length + max_length if max_length < 0 else max_length
        self.length = max(0, min(keep, self.length))


class _Group:
    """nn.Linear modules that read the same input, multiplied as one packed GEMM (fp32) or one
    quantised matmul (tasc.accel.quantized): each output column is computed on its own, so the
    fused outputs equal the modules' own."""

    def __init__(self, modules):
        self.modules = list(modules)
        self.widths = [m.weight.shape[0] for m in self.modules]
        self.fusable = all(w % BLOCK == 0 for w in self.widths)
        self.packed, self.quant, self.bias, self.stamps = None, None, None, None

    def refresh(self) -> None:
        """Repack when a weight changed (training, resizing) since the last pack."""
        # The stamps _packed_forward checks, so the modules accept the views set below.
        stamps = [weight_stamp(m.weight) for m in self.modules]
        if stamps == self.stamps:
            return
        biases = [m.bias for m in self.modules]
        self.bias = None if all(b is None for b in biases) else torch.cat(
            [b.detach() if b is not None else torch.zeros(w) for b, w in zip(biases, self.widths, strict=True)])
        if all("_tasc_quant" in m.__dict__ for m in self.modules):
            self.quant = QuantWeight.concat([current_weight(m) for m in self.modules])
            self.stamps = stamps
            return
        if not self.fusable:
            self.stamps = stamps
            return
        self.packed = pack(torch.cat([m.weight.detach() for m in self.modules]).numpy())
        start = 0
        for m, w, stamp in zip(self.modules, self.widths, stamps, strict=True):
            blocks = w // BLOCK
            # The module's own packed copy becomes a view of the fused one (see tasc.accel.packed).
            m._tasc_packed, m._tasc_stamp = self.packed[start : start + blocks], stamp
            start += blocks
        self.stamps = stamps

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x (T, K) float32 -> one (T, N_i) output per module."""
        if x.shape[0] > LONG or (self.packed is None and self.quant is None):
            return [m(x) for m in self.modules]
        if self.quant is not None:
            y = torch.from_numpy(self.quant.matmul(x.contiguous().numpy()))
        else:
            y = torch.from_numpy(small_gemm(x.contiguous().numpy(), self.packed, sum(self.widths),
                                            BUDGET.threads(torch.get_num_threads())))
        if self.bias is not None:
            y = y + self.bias
        return list(y.split(self.widths, dim=-1))


class _Layer:
    def __init__(self, layer):
        attn, mlp = layer.self_attn, layer.mlp
        self.attn = attn
        self.norm1, self.norm2 = layer.input_layernorm.forward, layer.post_attention_layernorm.forward
        self.qkv = _Group([attn.q_proj, attn.k_proj, attn.v_proj])
        self.o = _Group([attn.o_proj])
        self.gate_up = _Group([mlp.gate_proj, mlp.up_proj])
        self.down = _Group([mlp.down_proj])
        self.act = mlp.act_fn
        self.rotary = sys.modules[type(attn).__module__].apply_rotary_pos_emb

    def groups(self):
        return (self.qkv, self.o, self.gate_up, self.down)


def unsupported(model) -> str | None:
    """Why the lean forward cannot stand in for ``model``'s forward, or None when it can."""
    cfg = model.config
    impl = getattr(cfg, "_attn_implementation", None)
    if getattr(cfg, "model_type", None) not in LEAN_MODELS:
        return f"model type {getattr(cfg, 'model_type', None)!r}"
    if not available():
        return "no packed kernel"
    if impl not in ("sdpa", ATTENTION):
        return f"attention {impl!r}"
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        return "sliding-window attention"
    if any(t != "full_attention" for t in getattr(cfg, "layer_types", None) or ()):
        return "layers other than full attention"
    base = model.base_model
    if base is model or not hasattr(base, "layers") or not hasattr(base, "rotary_emb"):
        return "no decoder stack"
    p = next(model.parameters())
    if p.dtype != torch.float32 or p.device.type != "cpu":
        return "not float32 on the CPU"
    for layer in base.layers:
        mods = [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
                layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj]
        if any("_tasc_stamp" not in m.__dict__ and "_tasc_quant" not in m.__dict__ for m in mods):
            return "linears neither packed nor quantised"
    return None


class LeanDecoder:
    """The decoder stack of ``model`` run without transformers' per-call machinery (see module doc)."""

    def __init__(self, model):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        cfg = model.config
        self.model, self.base = model, model.base_model
        self.attention = ALL_ATTENTION_FUNCTIONS  # looked up per call: the model may switch
        self.layers = [_Layer(layer) for layer in self.base.layers[: cfg.num_hidden_layers]]
        attn = self.layers[0].attn
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = attn.head_dim
        self.steps = 0  # forward calls (statistics)
        self.fused = None  # tasc.accel.fused.FusedStep for decode and verify steps, where it fits

    def refresh(self) -> None:
        """Follow weights changed since the last call; call once per request."""
        for layer in self.layers:
            for group in layer.groups():
                group.refresh()
        if self.fused is not None:
            self.fused.refresh()

    def new_cache(self, capacity: int = 256) -> LeanCache:
        return LeanCache(len(self.layers), self.kv_heads, self.head_dim, capacity)

    @torch.inference_mode()
    def forward_many(self, batch: list[tuple[list[int], LeanCache]]) -> list[torch.Tensor]:
        """:meth:`forward` for several requests, each with its own cache: one pass through the
        fused step for all (each at most ``packed.LONG`` new tokens), else one forward each.
        Either way each request's rows are bitwise those of its own forward."""
        if self.fused is not None and all(len(ids) <= LONG for ids, _ in batch):
            self.steps += 1
            return self.fused.many(batch)
        return [self.forward(ids, cache) for ids, cache in batch]

    @torch.inference_mode()
    def argmax_many(self, batch: list[tuple[list[int], LeanCache, int]], head) -> list[list[int]] | None:
        """(ids, cache, keep) per request -> the greedy ids of each one's last ``keep`` rows
        through ``head`` (the quantised LM head's QuantWeight), in one call of the fused step,
        where it runs and every request brings at most ``packed.LONG`` tokens; None elsewhere
        (the caller then runs the forward and the head apart). The ids are those of
        ``head.argmax`` on :meth:`forward_many`'s rows."""
        if self.fused is None or any(len(ids) > LONG for ids, _, _ in batch):
            return None
        self.steps += 1
        return self.fused.argmax(batch, head)

    @torch.inference_mode()
    def forward(self, ids: list[int], cache: LeanCache) -> torch.Tensor:
        """ids: T new token ids after ``cache.length`` cached ones -> (T, hidden) float32, the
        final normed hidden states (the input of the LM head); the cache grows by T."""
        t, past = len(ids), cache.length
        if self.fused is not None and (t <= LONG or self.fused.vectorised):
            # A long prompt in steps of LONG tokens: SIMD int8 products beat the dequantised
            # fp32 weights' matrix products at any prompt length (docs/performance.md).
            self.steps += 1
            parts = [self.fused(ids[i : i + LONG], cache) for i in range(0, t, LONG)]
            return parts[0] if len(parts) == 1 else torch.cat(parts)
        s = past + t
        cache.reserve(t)
        h = self.base.embed_tokens(torch.as_tensor([ids], dtype=torch.long))[0]
        cos, sin = self.base.rotary_emb(h[None], torch.arange(past, s)[None])
        # The masks transformers builds for SDPA here: none when it can rely on causality (one
        # query token, or a prompt with nothing cached), else the causal boolean mask.
        mask = None if (t == 1 or past == 0) else torch.ones(t, s, dtype=torch.bool).tril(past)[None, None]
        attend = self.attention.get_interface(self.model.config._attn_implementation, None)
        rows, threads = t <= LONG and row_invariant_available(), BUDGET.threads(torch.get_num_threads())
        hd = self.head_dim
        for i, layer in enumerate(self.layers):
            x = layer.norm1(h)
            q, k, v = layer.qkv(x)
            # (T, heads * D) -> (1, heads, T, D), as the attention module views them.
            q = q.view(1, t, self.heads, hd).transpose(1, 2)
            k = k.view(1, t, self.kv_heads, hd).transpose(1, 2)
            v = v.view(1, t, self.kv_heads, hd).transpose(1, 2)
            q, k = layer.rotary(q, k, cos, sin)
            cache.keys[i, :, :, past:s] = k
            cache.values[i, :, :, past:s] = v
            if rows:  # a decode or verify step: every query row by its own fixed reduction
                out = attend_rows(q[0], cache.keys[i, 0], cache.values[i, 0], past, layer.attn.scaling, threads)
            else:  # a prompt prefill, shared by greedy and speculative decoding
                out, _ = attend(layer.attn, q, cache.keys[i, :, :, :s], cache.values[i, :, :, :s], mask,
                                dropout=0.0, scaling=layer.attn.scaling)
            (o,) = layer.o(out.reshape(t, -1))
            h = h + o
            gate, up = layer.gate_up(layer.norm2(h))
            (down,) = layer.down(layer.act(gate) * up)
            h = h + down
        cache.length = s
        self.steps += 1
        return self.base.norm(h)


def make_lean_decoder(model) -> LeanDecoder | None:
    """A :class:`LeanDecoder` for ``model`` (its linears packed), or None where
    :func:`unsupported` names a reason."""
    if unsupported(model) is not None:
        return None
    lean = LeanDecoder(model)
    lean.refresh()
    lean.fused = make_fused_step(lean)
    return lean
