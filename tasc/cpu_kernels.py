"""Small-batch fp32 linear layers for CPU decoding (kernels/small_gemm.c).

A speculative verify step multiplies 1 + k rows through every weight matrix. On CPU the BLAS
sgemm behind ``torch.nn.functional.linear`` repacks the weight on every call, so 2-16 rows
cost 2-2.5x one row although the weights, not the arithmetic, are the bottleneck. This module
packs each ``nn.Linear`` weight once into 8-column blocks and multiplies up to 12 rows per
pass over them: k-token steps then cost little more than one-token steps.

Contract (stated in the C header): a row's output is bitwise the same whatever the number of
rows in the call, so one-token and k-token steps of the same model agree exactly in the
linear layers. :func:`pack_linears` changes only the inference path of a model:

- the packed copy is a plain attribute (not a parameter or buffer): ``state_dict``,
  ``save_pretrained`` and peft see the original module unchanged;
- a prompt prefill (more than ``LONG`` tokens a row) runs ``F.linear`` too;
- a call that autograd must differentiate (grad enabled and the input or the weight requires
  grad) runs the original ``F.linear``, so fine-tuning a packed model is still correct;
- a weight changed in place or replaced (training, ``resize_token_embeddings``) is repacked
  on the next call.

The kernel is compiled on first use (tasc.native: AVX2 + FMA, OpenMP). Without a compiler,
AVX2/FMA or with ``TASC_CPU_KERNELS=0``, :func:`available` is False and models keep torch's
kernels.
"""

from __future__ import annotations

import ctypes
import os
import types
from functools import lru_cache

import numpy as np

from tasc import native

BLOCK = 8  # columns per packed block (one AVX2 register)
# Sequences longer than this (prompt prefill) go to torch's BLAS, which is faster once the
# weight packing is shared by hundreds of rows (400 prompt tokens: 1.55 s vs 1.8 s here);
# decode and verify steps (1 + k <= 17 tokens a row) stay on the packed kernel.
LONG = 64


@lru_cache(maxsize=1)
def _library():
    """The kernel library (ctypes) or None where it cannot be built here."""
    if os.environ.get("TASC_CPU_KERNELS", "1") == "0":
        return None
    lib = native.load("small_gemm")
    if lib is None:
        return None
    ptr, i32 = ctypes.c_void_p, ctypes.c_int
    lib.tasc_small_gemm.argtypes = [ptr, i32, i32, ptr, i32, ptr, i32]
    lib.tasc_small_gemm.restype = None
    lib.tasc_head_argmax.argtypes = [ptr, i32, i32, ptr, ptr, ptr, ptr, i32, i32, ptr, ptr, i32]
    lib.tasc_head_argmax.restype = ctypes.c_long
    return lib


def available() -> bool:
    """True where the packed kernel can run (x86-64 with AVX2+FMA and a C compiler)."""
    return _library() is not None


def pack(weight: np.ndarray) -> np.ndarray:
    """(N, K) float32 (or int8) -> (ceil(N/8), K, 8) of the same dtype, zero-padded columns."""
    n, k = weight.shape
    padded = np.zeros(((n + BLOCK - 1) // BLOCK * BLOCK, k), dtype=weight.dtype)
    padded[:n] = weight
    return np.ascontiguousarray(padded.reshape(-1, BLOCK, k).transpose(0, 2, 1))


def small_gemm(x: np.ndarray, packed: np.ndarray, n: int, threads: int = 1) -> np.ndarray:
    """x (M, K) float32 C-contiguous, packed from :func:`pack` -> (M, n) float32 = x @ W.T."""
    m, k = x.shape
    width = packed.shape[0] * BLOCK
    out = np.empty((m, width), dtype=np.float32)
    _library().tasc_small_gemm(x.ctypes.data, m, k, packed.ctypes.data, width, out.ctypes.data, threads)
    return out[:, :n] if width != n else out


def weight_stamp(w) -> tuple:
    """Identity, in-place version and shape of a weight: a packed copy made under another stamp
    is stale (training changed it in place, or ``resize_token_embeddings`` replaced it)."""
    return (id(w), w._version, tuple(w.shape))


def _packed_forward(self, x):
    """nn.Linear.forward on the packed kernel when no gradient is needed (see module doc)."""
    import torch

    w = self.weight
    if (x.dtype != torch.float32 or w.dtype != torch.float32 or x.device.type != "cpu" or x.numel() == 0
            or (x.dim() > 1 and x.shape[-2] > LONG)
            or (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))):
        return torch.nn.functional.linear(x, w, self.bias)
    stamp = weight_stamp(w)
    if self._tasc_stamp != stamp:
        self._tasc_packed, self._tasc_stamp = pack(w.detach().numpy()), stamp
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    y = torch.from_numpy(small_gemm(rows.numpy(), self._tasc_packed, w.shape[0], torch.get_num_threads()))
    if self.bias is not None:
        y = y + self.bias
    return y.reshape(*x.shape[:-1], w.shape[0])


def pack_linears(model) -> int:
    """Route every ``nn.Linear`` of ``model`` through the packed kernel for inference.
    Returns how many layers were packed (0 where the kernel is unavailable)."""
    import torch

    if not available():
        return 0
    count = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module.weight.dtype == torch.float32:
            module._tasc_stamp, module._tasc_packed = None, None
            module.forward = types.MethodType(_packed_forward, module)
            count += 1
    return count


def unpack_linears(model) -> None:
    """Undo :func:`pack_linears` (drop the packed copies, and the lean decoder built on them)."""
    for module in model.modules():
        module.__dict__.pop("_tasc_lean", None)
        if "_tasc_stamp" in module.__dict__:
            del module.forward, module._tasc_stamp, module._tasc_packed


# ------------------------------------------------------------------ grouped-query attention

ATTENTION = "tasc_grouped_sdpa"


def grouped_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' SDPA attention without copying the KV cache for grouped-query heads.

    query (B, H, T, D), key/value (B, H_kv, S, D). transformers' sdpa path repeats key and
    value to H heads when T > 1 (a copy of the whole cache per layer and verify step on CPU);
    here the H / H_kv query heads that share a KV head are stacked along T instead, so
    attention runs on the H_kv heads as stored: query (B, H_kv, n_rep * T, D) and the mask
    repeated to match. Same dot products, same softmax rows. Other cases go to transformers."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    n_rep = getattr(module, "num_key_value_groups", 1)
    b, h, t, d = query.shape
    # A prompt prefill (t > LONG) goes to transformers too: its causal kernel skips the masked
    # half, and one copy of the keys per prefill costs little next to that.
    if (n_rep == 1 or t == 1 or t > LONG or dropout or kwargs.get("position_bias") is not None
            or query.device.type != "cpu"):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, is_causal,
                                      **kwargs)
    s = key.shape[2]
    if attention_mask is None:  # causal, aligned to the end (prefill or a verify step with a cache)
        attention_mask = torch.ones(t, s, dtype=torch.bool, device=query.device).tril(s - t)[None, None]
    mb, mh = attention_mask.shape[:2]
    if mh != 1:  # a per-head mask: leave it to transformers
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, is_causal,
                                      **kwargs)
    mask = attention_mask[:, :, None].expand(mb, 1, n_rep, t, s).reshape(mb, 1, n_rep * t, s)
    out = torch.nn.functional.scaled_dot_product_attention(query.reshape(b, h // n_rep, n_rep * t, d), key, value,
                                                           attn_mask=mask, scale=scaling)
    return out.reshape(b, h, t, d).transpose(1, 2).contiguous(), None


def group_attention(model) -> bool:
    """Switch a grouped-query model that uses SDPA to :func:`grouped_sdpa`; True if switched."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    config = model.config
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    if getattr(config, "num_key_value_heads", None) in (None, getattr(config, "num_attention_heads", None)):
        return False
    AttentionInterface.register(ATTENTION, grouped_sdpa)
    # Masks as for "sdpa": transformers builds none at all for an attention it does not know,
    # which would drop padding and per-row masks of batched decoding.
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    model.set_attn_implementation(ATTENTION)
    return True


def speed_up(model) -> str:
    """Packed linears, grouped attention, the exact argmax head and the lean decoder forward
    (tasc.lean_decoder) for CPU fp32 inference; returns a label for reports ("torch" when
    nothing applied)."""
    from tasc.lean_decoder import attach_lean_decoder

    parts = []
    if pack_linears(model):
        parts.append("packed-linear")
    if group_attention(model):
        parts.append("grouped-attention")
    if attach_argmax_head(model):
        parts.append("argmax-head")
    if attach_lean_decoder(model):
        parts.append("lean-decoder")
    return "+".join(parts) or "torch"


# ------------------------------------------------------------------ exact argmax head

# Families whose logits are the output embedding applied to the last hidden state (no bias, no
# non-monotone map after it): there the argmax of that product is the greedy token.
ARGMAX_MODELS = ("llama", "mistral", "qwen2", "qwen3")


class ArgmaxHead:
    """Greedy token ids of ``hidden @ W.T`` (W the output embedding, (N, K) float32), exact,
    from an int8 screening copy (kernels/small_gemm.c ``tasc_head_argmax``).

    A decode step reads every weight once; the head is a fifth of a 135M model's weights, and
    the int8 copy is a quarter of its bytes. Columns the screen cannot rule out (a handful) are
    recomputed with the packed kernel's own FMA chain, so the ids equal the argmax of the full
    fp32 head bitwise (ties: the smallest id). The int8 copy follows the weight if it changes.

    Used for verify steps of up to ``max_rows`` rows: the screen saves memory traffic, and with
    the accumulators kept in registers its arithmetic grows slowly with the rows (SmolLM2-135M
    on 2 cores, fastest of 15: 1 row 2.6 ms vs 5.3 ms for the fp32 head, 8 rows 4.0 vs 5.5,
    12 rows 5.6 vs 7.3, 17 rows 8.2 vs 9.5)."""

    max_rows = 17

    def __init__(self, weight):
        self.weight = weight  # torch (N, K) float32 on the CPU, kept by reference
        self.stamp = None
        self.rescored = 0  # columns recomputed in fp32 (statistics)
        self.rows = 0

    def _build(self) -> None:
        w = np.ascontiguousarray(self.weight.detach().numpy())
        n, k = w.shape
        w64 = w.astype(np.float64)
        maxabs = np.abs(w64).max(axis=1)
        scale = np.where(maxabs > 0, maxabs / 127.0, 1.0).astype(np.float32)
        q = np.clip(np.rint(w64 / scale[:, None]), -127, 127)
        err = np.abs(w64 - q * scale[:, None].astype(np.float64)).max(axis=1)
        # |exact - screened| <= ||x||_1 * coef: the quantisation error plus the rounding of both
        # K-term fp32 sums (gamma_K per unit of sum |x| |w|) and of the final scaling.
        u = 2.0**-24
        gamma = (k + 2) * u / (1 - (k + 2) * u)
        coef = err + (2 * gamma + 4 * u) * (maxabs + 127.0 * scale)
        width = (n + BLOCK - 1) // BLOCK * BLOCK
        self.q = pack(q.astype(np.int8))
        self.scale = np.zeros(width, dtype=np.float32)
        self.scale[:n] = scale
        self.coef = np.zeros(width, dtype=np.float32)
        self.coef[:n] = np.nextafter(coef.astype(np.float32), np.float32(np.inf))  # rounded up
        self.w, self.n, self.k, self.width = w, n, k, width
        self.stamp = weight_stamp(self.weight)

    def __call__(self, hidden: np.ndarray) -> np.ndarray:
        """hidden float32 (M, K) -> int64 (M,) token ids."""
        import torch

        if self.stamp != weight_stamp(self.weight):
            self._build()
        x = np.ascontiguousarray(hidden, dtype=np.float32)
        m = len(x)
        ids = np.empty(m, dtype=np.int64)
        approx = np.empty((m, self.width), dtype=np.float32)
        self.rescored += _library().tasc_head_argmax(
            x.ctypes.data, m, self.k, self.q.ctypes.data, self.scale.ctypes.data, self.coef.ctypes.data,
            self.w.ctypes.data, self.width, self.n, ids.ctypes.data, approx.ctypes.data, torch.get_num_threads())
        self.rows += m
        return ids


def attach_argmax_head(model) -> bool:
    """Give ``model`` an :class:`ArgmaxHead` (``model._tasc_argmax_head``) that engine.decode
    uses for greedy steps; False where the model or the CPU does not allow it."""
    import torch

    head = model.get_output_embeddings()
    ok = (available() and getattr(model.config, "model_type", None) in ARGMAX_MODELS
          and isinstance(head, torch.nn.Linear) and head.bias is None and head.weight.dtype == torch.float32
          and head.weight.device.type == "cpu" and model.base_model is not model)
    model._tasc_argmax_head = ArgmaxHead(head.weight) if ok else None
    return ok
