"""A loaded model's linear layers and LM head on quantised block weights (tasc.accel.quant).

Weight formats (``WEIGHTS``): ``gguf`` runs the blocks of the GGUF file the model came from as
they are stored (Q4_1 layers and a Q8_0 tied head for the shipped SmolLM2), with no round trip
through fp32; ``q8_0``, ``q4_0`` and ``q4_1`` quantise the model's fp32 weights at load (any
Hugging Face folder, a TASC-ft model after fine-tuning). A GGUF tensor of a type the kernels do
not run is quantised from the model's fp32 copy to Q8_0 instead, with a one-line notice.

Each quantised ``nn.Linear`` keeps its fp32 weight (training and the fallbacks below read it;
for a model decoded on its GGUF blocks it stays mapped from the model file, tasc.models) and gets
the quantised copy beside it; its ``forward`` runs the quantised kernel for inference calls of up
to ``LONG`` rows, whose every output row is computed by one fixed reduction whatever the number
of rows, so speculative verify steps emit exactly the greedy tokens. Longer calls (a prompt
through transformers' forward) run torch's BLAS on the fp32 weight; the lean decoder's fused
step (tasc.accel.fused) takes prompts ``LONG`` rows at a time instead. A call that autograd must
differentiate goes to the fp32 path; a weight changed since it was quantised is quantised again
on the next inference call, in the same format, from the fp32 values.

Where this applies: llama-family models on the CPU in float32 with the quantised kernel
library; :func:`quantize_model` returns None elsewhere and the model keeps its fp32 kernels.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np

from tasc.accel import quant, variants
from tasc.accel.gguf_index import read_tensors
from tasc.accel.packed import LONG, weight_stamp

WEIGHTS = ("gguf", "q8_0", "q4_0", "q4_1")
# The decoder layer's linears and the names llama.cpp gives their GGUF tensors.
GGUF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
              "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
FALLBACK = "Q8_0"  # for GGUF tensors of types the kernels do not run


class QuantHead:
    """Greedy ids of the quantised LM head (``QuantWeight.argmax``): the argmax of the logits
    that the head's quantised ``forward`` gives (ties: the smallest id), without writing them."""

    max_rows = LONG

    def __init__(self, module):
        self.module = module

    def __call__(self, hidden: np.ndarray) -> np.ndarray:
        return self.weight().argmax(np.ascontiguousarray(hidden, dtype=np.float32))

    def weight(self) -> quant.QuantWeight:
        """The head's quantised weight as it is now (the fused step runs it inside its call)."""
        return current_weight(self.module)


def current_weight(module) -> quant.QuantWeight:
    """The module's quantised weight, quantised again if the fp32 weight changed since."""
    stamp = weight_stamp(module.weight)
    if module._tasc_quant_stamp != stamp:
        fmt = module._tasc_quant.fmt
        module._tasc_quant = quant.QuantWeight.quantize(module.weight, fmt)
        module._tasc_quant_stamp = stamp
    return module._tasc_quant


def _quant_forward(self, x):
    """nn.Linear.forward on the quantised kernel for inference steps (see module doc)."""
    import torch

    w = self.weight
    if (x.dtype != torch.float32 or x.device.type != "cpu" or x.numel() == 0
            or (x.dim() > 1 and x.shape[-2] > LONG)
            or (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))):
        return torch.nn.functional.linear(x, w, self.bias)
    rows = x.reshape(-1, x.shape[-1]).contiguous().numpy()
    y = torch.from_numpy(current_weight(self).matmul(rows))
    if self.bias is not None:
        y = y + self.bias
    return y.reshape(*x.shape[:-1], w.shape[0])


def attach(module, weight: quant.QuantWeight) -> None:
    """Route ``module`` (an nn.Linear) through ``weight`` for inference. The kernel layout is
    built now, so that the weight's blocks go before the next weight's are made."""
    weight.packed()
    module._tasc_quant, module._tasc_quant_stamp = weight, weight_stamp(module.weight)
    module.forward = types.MethodType(_quant_forward, module)


def unsupported(model, weights: str, gguf: Path | None) -> str | None:
    """Why ``model`` cannot run on quantised weights here, or None when it can."""
    import torch

    if weights not in WEIGHTS:
        return f"unknown weight format {weights!r} (one of {', '.join(WEIGHTS)})"
    if weights == "gguf" and gguf is None:
        return "no GGUF file behind this model"
    if not variants.available() or variants.isa() is None:
        return "no quantised kernel here (no C compiler?)"
    base = getattr(model, "base_model", model)
    if base is model or not hasattr(base, "layers"):
        return "no decoder stack"
    p = next(model.parameters())
    if p.dtype != torch.float32 or p.device.type != "cpu":
        return "not float32 on the CPU"
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or head.weight.shape[1] % quant.BLOCK:
        return "no linear LM head with a width that is a multiple of 32"
    for layer in base.layers:
        for name in GGUF_NAMES:
            mod = getattr(layer.self_attn, name, None) or getattr(layer.mlp, name, None)
            if not isinstance(mod, torch.nn.Linear) or mod.weight.shape[1] % quant.BLOCK:
                return f"layer linear {name} missing or not a multiple of 32 wide"
    return None


def layer_linears(model):
    """(GGUF tensor name, nn.Linear) of every linear in ``model``'s decoder layers."""
    for i, layer in enumerate(model.base_model.layers):
        for name, gname in GGUF_NAMES.items():
            yield f"blk.{i}.{gname}.weight", getattr(layer.self_attn, name, None) or getattr(layer.mlp, name)


def _gguf_weight(tensors: dict, name: str, module, config, notices: list[str]) -> quant.QuantWeight:
    t = tensors.get(name)
    if t is None:
        raise ValueError(f"tensor {name} is not in the GGUF file")
    if t.tensor_type.name not in quant.TYPES:
        notices.append(f"{name}: {t.tensor_type.name} is not a kernel format; quantised to {FALLBACK}")
        return quant.QuantWeight.quantize(module.weight, FALLBACK)
    w = quant.QuantWeight.from_gguf(t)
    if w.shape != tuple(module.weight.shape):
        raise ValueError(f"tensor {name}: shape {w.shape} does not match the model's {tuple(module.weight.shape)}")
    # llama.cpp's conversion interleaves the rotary halves of q and k per head: undo it.
    if name.endswith("attn_q.weight"):
        w = w.permute_rows(quant.unpermute_rows(w.n, config.num_attention_heads))
    elif name.endswith("attn_k.weight"):
        w = w.permute_rows(quant.unpermute_rows(w.n, config.num_key_value_heads))
    return w


def quantize_model(model, weights: str, gguf: Path | None = None, release=None) -> str | None:
    """Put the layer linears and the LM head of ``model`` on quantised weights (see module doc);
    returns a label for reports (e.g. "gguf Q4_1, head Q8_0", "q8_0") or None where
    :func:`unsupported` names a reason. Raises ValueError for a GGUF file that does not match
    the model, naming the file and tensor. ``release``, where given, is called with what each
    quantised copy was made from once it is made: the module's fp32 weight (and, quantising at
    load, each slice of its rows as it goes) and the GGUF blocks (tasc.models takes their
    file pages out of the process then, so that loading never holds a whole file)."""
    if unsupported(model, weights, gguf) is not None:
        return None
    config, head = model.config, model.get_output_embeddings()
    notices: list[str] = []
    if weights == "gguf":
        tensors = read_tensors(gguf)  # a truncated or corrupted file fails naming it

        def make(name, module):
            return _gguf_weight(tensors, name, module, config, notices)

        head_name = "output.weight" if "output.weight" in tensors else "token_embd.weight"
    else:
        fmt = weights.upper()

        def make(name, module):
            return quant.QuantWeight.quantize(module.weight, fmt, release)

        head_name = "lm_head"
    for name, module in [*layer_linears(model), (head_name, head)]:
        attach(module, make(name, module))
        if release is not None:
            release(module.weight)
            if weights == "gguf" and name in tensors:
                release(tensors[name].data)  # the blocks just packed
    for line in notices:
        print(f"notice: {gguf}: {line}", file=sys.stderr)
    formats = sorted({m._tasc_quant.fmt for m in model.modules() if "_tasc_quant" in m.__dict__ and m is not head})
    if weights == "gguf":
        return f"gguf {'+'.join(formats)}, head {head._tasc_quant.fmt}"
    return weights


def make_quant_head(model) -> QuantHead | None:
    head = model.get_output_embeddings()
    return QuantHead(head) if "_tasc_quant" in getattr(head, "__dict__", {}) else None
