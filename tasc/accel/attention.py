"""Grouped-query attention on CPU without copying the KV cache per query head.

Registered with transformers' attention registry as ``tasc_grouped_sdpa`` (masks as for SDPA),
so the model's own layers call it; the dot products and softmax rows are SDPA's.
"""

from __future__ import annotations

from tasc.accel.packed import LONG

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
