"""Packed small-batch fp32 linear layers for CPU decoding (kernels/small_gemm.c).

A speculative verify step multiplies 1 + k rows through every weight matrix. On CPU the BLAS
sgemm behind ``torch.nn.functional.linear`` repacks the weight on every call, so a few rows
cost several times one row although the weights, not the arithmetic, are the bottleneck. This module
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

The kernel is compiled on first use (tasc.accel.native: AVX2 + FMA, OpenMP). Without a compiler,
AVX2/FMA or with ``TASC_CPU_KERNELS=0``, :func:`available` is False and models keep torch's
kernels.
"""

from __future__ import annotations

import ctypes
import os
import types
from functools import lru_cache

import numpy as np

from tasc.accel import native
from tasc.accel.threads import BUDGET

BLOCK = 8  # columns per packed block (one AVX2 register)
# Sequences longer than this (prompt prefill) go to torch's BLAS, which is faster once the
# weight packing is shared by hundreds of rows (docs/performance.md);
# decode and verify steps (1 + k <= 17 tokens a row) stay on the packed kernel.
LONG = 64


@lru_cache(maxsize=1)
def library():
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
    return library() is not None


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
    library().tasc_small_gemm(x.ctypes.data, m, k, packed.ctypes.data, width, out.ctypes.data, threads)
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
    y = torch.from_numpy(small_gemm(rows.numpy(), self._tasc_packed, w.shape[0], BUDGET.threads(torch.get_num_threads())))
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
    """Undo :func:`pack_linears` (drop the packed copies, and the backend attached with them,
    whose lean decoder runs on them: ``Backend.for_model`` then gives transformers' forward)."""
    for module in model.modules():
        module.__dict__.pop("_tasc_backend", None)  # tasc.accel.backend.ATTACHED
        if "_tasc_stamp" in module.__dict__:
            del module.forward, module._tasc_stamp, module._tasc_packed
