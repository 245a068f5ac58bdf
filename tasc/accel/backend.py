"""The CPU speed-ups for one loaded model, applied together."""

from __future__ import annotations

from tasc.accel.argmax_head import attach_argmax_head
from tasc.accel.attention import group_attention
from tasc.accel.lean_decoder import attach_lean_decoder
from tasc.accel.packed import pack_linears


def speed_up(model) -> str:
    """Packed linears, grouped attention, the exact argmax head and the lean decoder forward
    (tasc.accel.lean_decoder) for CPU fp32 inference; returns a label for reports ("torch" when
    nothing applied)."""
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
