"""Benchmark methods as runners over loaded models.

* ``greedy``: plain greedy decoding with a KV cache (engine.decode, no draft).
* ``pld``: transformers' own prompt-lookup decoding (``prompt_lookup_num_tokens``), the
  first peer to beat.
* ``tasc-spec``: the TASC draft (task n-grams mixed with context n-grams) verified by the
  model, cost-gated with the measured verify-cost table.
* ``ft-only`` / ``tasc-ft``: greedy with the fine-tuned model (base vocabulary) / with the
  TASC-ft model (expanded vocabulary); ``tasc-ft+spec``: TASC-spec on the TASC-ft model.
Each runner takes a corpus row (or a plain prompt), renders it with tasc.data.prompts (the
task's chat template, the row's ``system`` and earlier ``messages``) and returns an engine.Output.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import numpy as np
import torch

from tasc.data.prompts import Row, encode_prompts
from tasc.decode.draft import BoundDraft
from tasc.decode.engine import DecodeConfig, Output, RequestStats, decode, eos_ids
from tasc.decode.proposer import Proposer, ProposerConfig, new_trust


class _PassCounter:
    """Counts forward passes of a model while in use, whoever calls it (also transformers' generate)."""

    def __init__(self, model):
        self.model = model
        self.n = 0

    def _hook(self, *_):
        self.n += 1

    def __enter__(self):
        self.n = 0
        self.handle = self.model.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def engine_runner(lm, cfg: DecodeConfig, system_prompt: str | None, chat_template: bool,
                  draft: BoundDraft | None = None, cost: Sequence[float] | None = None,
                  proposer_config: ProposerConfig | None = None, speculative: bool = True):
    """A runner over engine.decode; ``speculative=False`` gives plain greedy. The proposers
    of one runner share their calibration (see tasc.decode.proposer). Every prompt is computed
    in full, without the prefix cache, as transformers' and llama.cpp's runs compute theirs:
    with it, the second method on a prompt would find the whole prompt cached by the first
    (benchmarks/bench_prefix.py measures the cache on its own)."""
    trust = new_trust()
    cfg = dataclasses.replace(cfg, prefix_cache=False)

    def run(row: Row) -> Output:
        ids = encode_prompts(lm.tokenizer, [row], system_prompt, chat_template)[0]
        proposer = Proposer(draft, proposer_config, cost, trust) if speculative else None
        return decode(lm.model, lm.tokenizer, ids, proposer, cfg)

    return run


def pld_runner(lm, cfg: DecodeConfig, system_prompt: str | None, chat_template: bool, lookup_tokens: int = 10):
    """transformers' prompt-lookup decoding (assisted generation with n-grams of the prompt)."""
    counter = _PassCounter(lm.model)
    stops = sorted(eos_ids(lm.model, lm.tokenizer))

    @torch.inference_mode()
    def run(row: Row) -> Output:
        t0 = time.perf_counter()
        ids = encode_prompts(lm.tokenizer, [row], system_prompt, chat_template)[0]
        x = torch.tensor([ids], device=lm.model.device)
        kw = {"stop_strings": list(cfg.stop), "tokenizer": lm.tokenizer} if cfg.stop else {}
        with counter:
            out = lm.model.generate(
                input_ids=x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=cfg.max_new_tokens,
                prompt_lookup_num_tokens=lookup_tokens, eos_token_id=stops, pad_token_id=lm.tokenizer.pad_token_id,
                **kw,
            )
        new = out[0, len(ids):].tolist()
        while new and new[-1] in stops:
            new.pop()
        text = lm.tokenizer.decode(new, skip_special_tokens=True)
        for s in cfg.stop:
            if s in text:
                text = text[: text.index(s)]
        st = RequestStats(prompt_tokens=len(ids), new_tokens=len(new), chars=len(text),
                          forward_passes=counter.n, latency_s=time.perf_counter() - t0)
        return Output(text=text, token_ids=new, stats=st)

    return run


def verify_cost_summary(cost: np.ndarray) -> dict:
    """V(k) for the report: the cost of a k-token verify relative to a one-token step."""
    return {f"V{k}": float(cost[k]) for k in (2, 4, 8, 16) if k < len(cost)}


METHOD_NAMES = ("greedy", "pld", "tasc-spec", "tasc-spec-ref", "context-only", "ft-only", "tasc-ft", "tasc-ft+spec",
                "llama.cpp", "llama.cpp-lookup")
# Peers run by llama.cpp on the model's GGUF file (tasc.eval.llamacpp), not by tasc's engine.
LLAMA_CPP_METHODS = ("llama.cpp", "llama.cpp-lookup")
MODEL_OF = {"ft-only": "ft-only", "tasc-ft": "tasc-ft", "tasc-ft+spec": "tasc-ft"}


def parse_methods(methods: str) -> list[str]:
    """A comma-separated list of method names: ``"greedy, pld,tasc-spec"`` -> three names."""
    return [m.strip() for m in methods.split(",") if m.strip()]


def base_method(name: str) -> str:
    """The method without its proposer settings: ``tasc-spec@max_len=24`` -> ``tasc-spec``."""
    return name.split("@", 1)[0]


def needs_draft(name: str) -> bool:
    """The method verifies a task draft (tasc-spec, tasc-spec-ref, tasc-ft+spec) or builds its
    lookup cache from one (llama.cpp-lookup), so the benchmark needs drafts built for it."""
    base = base_method(name)
    return base.startswith("tasc-spec") or base.endswith("+spec") or base == "llama.cpp-lookup"


def needs_ft_draft(name: str) -> bool:
    """The method verifies with the TASC-ft model: its draft is bound to that model's expanded
    tokenizer and is best built from that model's own outputs."""
    base = base_method(name)
    return base.endswith("+spec") and MODEL_OF.get(base) == "tasc-ft"


def registered_method(tasc_ft: bool) -> str:
    """The benchmark method whose numbers a registered model carries: TASC-spec on the model
    that is registered (the TASC-ft one when there is one)."""
    return "tasc-ft+spec" if tasc_ft else "tasc-spec"


def _other_model(name: str, models: dict | None):
    key = MODEL_OF[name]
    if not models or key not in models:
        raise ValueError(f"method {name!r} needs the {key!r} model (bench --ft-model / --ft-only-model)")
    return models[key]


def _method_options(name: str) -> tuple[str, ProposerConfig | None]:
    """"tasc-spec@context_prior=0.1@max_len=24" -> ("tasc-spec", ProposerConfig(...))."""
    base, *opts = name.split("@")
    if not opts:
        return base, None
    fields = {f.name: f.type for f in dataclasses.fields(ProposerConfig)}
    values = {}
    for opt in opts:
        key, sep, raw = opt.partition("=")
        if not sep or key not in fields:
            raise ValueError(f"method {name!r}: {opt!r} is not field=value of ProposerConfig ({', '.join(fields)})")
        kind = type(getattr(ProposerConfig(), key))
        values[key] = raw.lower() in ("1", "true", "yes") if kind is bool else kind(raw)
    return base, ProposerConfig(**values)


def build_methods(names: Sequence[str], lm, cfg: DecodeConfig, system_prompt: str | None, chat_template: bool,
                  drafts: dict[str, BoundDraft | None], cost: Sequence[float], models: dict | None = None,
                  llama_cpp: dict | None = None) -> list:
    """Benchmark methods by name over one loaded model, plus TASC-ft models.

    drafts: bound drafts by role, "main" (on-policy where available), "references" and
    "tasc-ft" (the main draft's text bound to the tasc-ft tokenizer with
    ``BoundDraft.from_corpus(draft, tok)``; a draft bound to another tokenizer would not fit).
    models: extra LoadedModels, "ft-only" (fine-tuned, base vocabulary) and "tasc-ft"
    (expanded vocabulary). ``ft-only`` and ``tasc-ft`` decode greedily with their model;
    ``tasc-ft+spec`` verifies the "tasc-ft" draft with the tasc-ft model (lossless).

    A speculative method may carry proposer settings after ``@``, to compare them side by side:
    ``tasc-spec@context_prior=0.1@max_len=24`` (fields of ProposerConfig).

    llama_cpp: for the llama.cpp peers, ``bin_dir``, ``gguf``, ``threads`` and, for
    ``llama.cpp-lookup``, ``static_cache`` (see tasc.eval.llamacpp)."""
    from tasc.eval.harness import Method

    made = []
    for name in names:
        base, pc = _method_options(name)
        if base in MODEL_OF:
            other = _other_model(base, models)
            speculative = base.endswith("+spec")
            made.append(Method(name, engine_runner(other, cfg, system_prompt, chat_template,
                                                   drafts.get("tasc-ft") if speculative else None, cost, pc,
                                                   speculative=speculative)))
            continue
        if base in LLAMA_CPP_METHODS:
            from tasc.eval.llamacpp import LlamaCppRunner

            if not llama_cpp:
                raise ValueError(f"method {name!r} needs llama.cpp and the model's GGUF file")
            cache = llama_cpp["static_cache"] if base == "llama.cpp-lookup" else None
            made.append(Method(name, LlamaCppRunner(llama_cpp["bin_dir"], llama_cpp["gguf"], lm.tokenizer, cfg,
                                                    system_prompt, chat_template, llama_cpp["threads"], cache),
                               note="llama.cpp on the GGUF file; token ids not comparable"))
            continue
        if base == "greedy":
            run = engine_runner(lm, cfg, system_prompt, chat_template, speculative=False)
        elif base == "pld":
            run = pld_runner(lm, cfg, system_prompt, chat_template)
        elif base == "tasc-spec":
            run = engine_runner(lm, cfg, system_prompt, chat_template, drafts.get("main"), cost, pc)
        elif base == "tasc-spec-ref":
            run = engine_runner(lm, cfg, system_prompt, chat_template, drafts.get("references"), cost, pc)
        elif base == "context-only":
            run = engine_runner(lm, cfg, system_prompt, chat_template, None, cost, pc)
        else:
            raise ValueError(f"unknown method {name!r}; known: {', '.join(METHOD_NAMES)}")
        made.append(Method(name, run))
    return made
