"""Attention for CPU decoding.

* :func:`attend_rows`: causal attention of a step's new query rows over the KV cache, each row
  by one fixed reduction (kernels/decoder.c), so a k-token verify step gives bitwise the rows
  of k one-token steps. The lean decoder uses it for decode and verify steps.
* :func:`grouped_sdpa`: transformers' SDPA attention without copying the KV cache per query
  head, registered as ``tasc_grouped_sdpa`` (masks as for SDPA) so the model's own layers call
  it; the dot products and softmax rows are SDPA's.
"""

from __future__ import annotations

import ctypes
from functools import cache

import numpy as np

from tasc.accel import native
from tasc.accel.packed import LONG


@cache
def decoder_library(build: str | None = None):
    """``kernels/decoder.c`` (ctypes): built for AVX2 + FMA where the CPU has them, else its
    portable build, which gives bitwise the same results; None without a C compiler (or with
    TASC_NATIVE=0). ``build`` ("decoder" or "decoder_portable") asks for one."""
    for name in [build] if build else ["decoder", "decoder_portable"]:
        lib = native.load(name)
        if lib is not None:
            break
    else:
        return None
    ptr, i32, f32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    lib.tasc_attend.argtypes = [ptr, ptr, ptr, i32, i32, i32, i32, i32, i32, f32, ptr, ptr, i32]
    lib.tasc_attend.restype = None
    lib.tasc_decoder_step.argtypes = [ptr, ptr, ptr, ptr]  # tasc.accel.fused's _Model and _Step
    lib.tasc_decoder_step.restype = i32
    return lib


def row_invariant_available() -> bool:
    """True where :func:`attend_rows` can run (a C compiler)."""
    return decoder_library() is not None


def attend_rows(q, keys, values, past: int, scale: float, threads: int):
    """q (H, T, D) float32 queries of T new positions after ``past`` cached ones; keys, values
    (H_kv, capacity, D) float32 caches holding past + T positions -> (T, H * D) float32, the
    attention output as the output projection reads it (see kernels/decoder.c)."""
    import torch

    h, t, d = q.shape
    hkv, cap, _ = keys.shape
    if d % 8 or h % hkv or not (keys.is_contiguous() and values.is_contiguous()):
        raise ValueError(f"attend_rows: head dim {d} (multiple of 8), heads {h}/{hkv}, contiguous caches")
    q = q.contiguous()
    out = torch.empty(t, h * d)
    work = np.empty(threads * (past + t + 8 + d), dtype=np.float32)
    decoder_library().tasc_attend(q.data_ptr(), keys.data_ptr(), values.data_ptr(), h, hkv, t, d, cap, past,
                           scale, out.data_ptr(), work.ctypes.data, threads)
    return out

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
