"""Exact greedy token ids from an int8 screen of the LM head (kernels/small_gemm.c).

A greedy step needs only the argmax of ``hidden @ W.T``; screening with an int8 copy of W and
an error bound per token, then recomputing the few candidates with the packed kernel's fp32 FMA
chain, gives the full fp32 argmax bitwise at a quarter of the head's memory traffic.
"""

from __future__ import annotations

import numpy as np

from tasc.accel.packed import BLOCK, available, library, pack, weight_stamp
from tasc.accel.threads import BUDGET

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
    the accumulators kept in registers its arithmetic grows slowly with the rows (timings in
    docs/performance.md)."""

    max_rows = 17

    def __init__(self, weight):
        self.weight = weight  # torch (N, K) float32 on the CPU, kept by reference
        self.stamp = None
        self.rescored = 0  # columns recomputed in fp32 (statistics)
        self.rows = 0

    def _build(self) -> None:
        w = np.ascontiguousarray(self.weight.detach().numpy())
        n, k = w.shape
        q, maxabs, err = np.empty((n, k), dtype=np.int8), np.empty(n), np.empty(n)
        scale = np.empty(n, dtype=np.float32)
        step = max(1, (1 << 20) // k)  # rows at a time: float64 temporaries of MBs, not 8x the head
        for i in range(0, n, step):
            rows = slice(i, i + step)
            w64 = w[rows].astype(np.float64)
            maxabs[rows] = np.abs(w64).max(axis=1)
            scale[rows] = np.where(maxabs[rows] > 0, maxabs[rows] / 127.0, 1.0)
            rows_q = np.clip(np.rint(w64 / scale[rows, None]), -127, 127)
            err[rows] = np.abs(w64 - rows_q * scale[rows, None].astype(np.float64)).max(axis=1)
            q[rows] = rows_q
        # |exact - screened| <= ||x||_1 * coef: the quantisation error plus the rounding of both
        # K-term fp32 sums (gamma_K per unit of sum |x| |w|) and of the final scaling.
        u = 2.0**-24
        gamma = (k + 2) * u / (1 - (k + 2) * u)
        coef = err + (2 * gamma + 4 * u) * (maxabs + 127.0 * scale)
        width = (n + BLOCK - 1) // BLOCK * BLOCK
        self.q = pack(q)
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
        self.rescored += library().tasc_head_argmax(
            x.ctypes.data, m, self.k, self.q.ctypes.data, self.scale.ctypes.data, self.coef.ctypes.data,
            self.w.ctypes.data, self.width, self.n, ids.ctypes.data, approx.ctypes.data, BUDGET.threads(torch.get_num_threads()))
        self.rows += m
        return ids


def make_argmax_head(model) -> ArgmaxHead | None:
    """An :class:`ArgmaxHead` over ``model``'s output embedding for the greedy steps of
    tasc.accel.backend, or None where the model or the CPU does not allow it."""
    import torch

    head = model.get_output_embeddings()
    ok = (available() and getattr(model.config, "model_type", None) in ARGMAX_MODELS
          and isinstance(head, torch.nn.Linear) and head.bias is None and head.weight.dtype == torch.float32
          and head.weight.device.type == "cpu" and model.base_model is not model)
    return ArgmaxHead(head.weight) if ok else None
