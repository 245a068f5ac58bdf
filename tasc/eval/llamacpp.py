"""llama.cpp as a benchmark peer: greedy decoding and lookup decoding on the same GGUF.

The CPU user's alternative to tasc is llama.cpp on the GGUF file tasc ships, so the benchmark
runs it beside tasc on the same rows, prompts (rendered by tasc.data.prompts, special tokens
parsed by llama.cpp), thread count and token budget:

* ``llama.cpp``: ``llama-completion`` at temperature 0 (plain greedy);
* ``llama.cpp-lookup``: ``llama-lookup``, llama.cpp's n-gram lookup decoding, with a static
  n-gram cache built by ``llama-lookup-create`` from the same draft texts TASC-spec uses.

Each request is one process; its time is what llama.cpp itself reports for prompt evaluation
plus decoding (model loading excluded), so a request's latency compares with tasc's, which
also counts prefill and decode only. Token ids are llama.cpp's own (not returned);
``identical_to_greedy`` compares the text with tasc greedy's, a different engine's arithmetic
on the same weights.

llama.cpp is not a dependency: :func:`find_binaries` looks in ``TASC_LLAMA_CPP``, then in the
build folder ``~/.cache/llama.cpp-bench/build/bin``, and fails with one line that says how to
build it.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from tasc.data.prompts import Row, render_prompt
from tasc.decode.engine import DecodeConfig, Output, RequestStats, cut_at_stop

DEFAULT_BIN = Path.home() / ".cache" / "llama.cpp-bench" / "build" / "bin"
TOOLS = ("llama-completion", "llama-lookup", "llama-lookup-create")
LOOKUP_DRAFT = 10  # llama-lookup --spec-draft-n-max: the most tokens it drafts a step


class LlamaCppError(RuntimeError):
    """llama.cpp is missing or a run of it failed."""


def find_binaries(path: str | os.PathLike | None = None) -> Path:
    """The folder holding llama.cpp's tools: ``path``, else ``TASC_LLAMA_CPP``, else the default build."""
    folder = Path(path or os.environ.get("TASC_LLAMA_CPP") or DEFAULT_BIN).expanduser()
    missing = [t for t in TOOLS if not (folder / t).is_file()]
    if missing:
        raise LlamaCppError(f"{folder}: no {', '.join(missing)}; build llama.cpp with "
                            f"../shared/tools/build-llama-cpp.sh, or set TASC_LLAMA_CPP to its bin/ folder")
    return folder


def _run(cmd: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=timeout)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise LlamaCppError(f"{Path(cmd[0]).name} exited {done.returncode}: {' | '.join(tail)}")
    return done


def _ms(pattern: str, log: str) -> tuple[float, int]:
    m = re.search(pattern + r"\s*=\s*([\d.]+) ms /\s*(\d+)", log)
    return (float(m.group(1)), int(m.group(2))) if m else (0.0, 0)


def build_static_cache(bin_dir: Path, gguf: Path, texts: Sequence[str], out: Path) -> Path:
    """``llama-lookup-create`` over ``texts`` (one per line): llama.cpp's static n-gram cache."""
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="utf-8") as f:
        f.write("\n".join(texts))
        corpus = f.name
    try:
        _run([str(bin_dir / "llama-lookup-create"), "-m", str(gguf), "-f", corpus, "-lcs", str(out), "-c", "0"])
    finally:
        os.unlink(corpus)
    return out


class LlamaCppRunner:
    """A benchmark runner (corpus row -> engine.Output) over one llama.cpp tool."""

    def __init__(self, bin_dir: Path, gguf: Path, tokenizer, cfg: DecodeConfig, system_prompt: str | None,
                 chat_template: bool, threads: int, static_cache: Path | None = None):
        self.bin_dir, self.gguf, self.tokenizer, self.cfg = bin_dir, gguf, tokenizer, cfg
        self.system_prompt, self.chat_template, self.threads = system_prompt, chat_template, threads
        self.static_cache = static_cache

    def _command(self, prompt_file: str) -> list[str]:
        common = ["-m", str(self.gguf), "-f", prompt_file, "-t", str(self.threads), "-tb", str(self.threads),
                  "--temp", "0", "-c", "4096"]
        n = self.cfg.max_new_tokens
        if self.static_cache is None:
            return [str(self.bin_dir / "llama-completion"), *common, "-n", str(n), "--no-warmup", "-no-cnv",
                    "--no-display-prompt", "--simple-io"]
        # llama-lookup stops once it has more than -n tokens: ask for one fewer.
        return [str(self.bin_dir / "llama-lookup"), *common, "-n", str(max(n - 1, 1)), "--spec-draft-n-max",
                str(LOOKUP_DRAFT), "-lcs", str(self.static_cache)]

    def __call__(self, row: Row) -> Output:
        prompt = render_prompt(self.tokenizer, row, self.system_prompt, self.chat_template)
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="utf-8") as f:
            f.write(prompt)
            prompt_file = f.name
        try:
            done = _run(self._command(prompt_file))
        finally:
            os.unlink(prompt_file)
        log = done.stdout + "\n" + done.stderr
        if self.static_cache is None:
            text = done.stdout
            prefill_ms, prompt_tokens = _ms(r"prompt eval time", log)
            decode_ms, runs = _ms(r"\beval time", log.replace("prompt eval time", "prompt_eval"))
            new_tokens, drafted, accepted = runs + 1, 0, 0  # the first token comes from the prompt pass
        else:
            # llama-lookup echoes the prompt before the generated text, then its statistics.
            body = done.stdout
            text = body[body.find(prompt) + len(prompt):] if prompt in body else body
            enc = re.search(r"encoded\s+(\d+) tokens in\s+([\d.]+) seconds", log)
            dec = re.search(r"decoded\s+(\d+) tokens in\s+([\d.]+) seconds", log)
            prompt_tokens, prefill_ms = (int(enc.group(1)), float(enc.group(2)) * 1e3) if enc else (0, 0.0)
            new_tokens, decode_ms = (int(dec.group(1)), float(dec.group(2)) * 1e3) if dec else (0, 0.0)
            drafted = int(m.group(1)) if (m := re.search(r"n_drafted\s*=\s*(\d+)", log)) else 0
            accepted = int(m.group(1)) if (m := re.search(r"n_accept\s*=\s*(\d+)", log)) else 0
            _, runs = _ms(r"\beval time", log.replace("prompt eval time", "prompt_eval"))
        text = text.strip("\n")
        if self.cfg.stop:
            text = cut_at_stop(text, self.cfg.stop)
        stats = RequestStats(prompt_tokens=prompt_tokens, new_tokens=new_tokens, chars=len(text),
                             forward_passes=runs + 1, drafted=drafted, accepted=accepted,
                             draft_steps=0, latency_s=(prefill_ms + decode_ms) / 1e3, first_token_s=prefill_ms / 1e3)
        return Output(text=text, token_ids=[], stats=stats)
