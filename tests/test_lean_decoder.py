"""The lean decoder forward: hidden states bitwise equal to transformers' forward (same kernels)
over prefills, one-token and k-token steps, crops and cache growth, for a grouped-query Llama and
a Qwen2 with biases and unfusable widths; weights changed in place are followed; decoding through
it emits the same tokens; models it does not fit keep transformers' forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tasc.accel import backend, packed
from tasc.accel.lean_decoder import LeanDecoder, unsupported
from tasc.decode import engine
from tasc.decode.engine import DecodeConfig
from tasc.models import load_model

pytestmark = pytest.mark.skipif(not packed.available(), reason="no AVX2/FMA CPU or no C compiler here")


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory, tiny_model_dir):
    """A tiny Qwen2 (q/k/v biases, no grouped heads, an MLP width that is not a multiple of 8)."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    out = tmp_path_factory.mktemp("tiny-qwen2")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=100, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048,
                      tie_word_embeddings=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(3)
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        for layer in model.model.layers:  # non-zero biases, so a dropped bias would show
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _reference_steps(lm, chunks):
    """Hidden states of transformers' own forward (with the same kernels), chunk after chunk;
    a negative chunk crops the cache."""
    from transformers import DynamicCache

    cache, outs = DynamicCache(config=lm.model.config), []
    with torch.inference_mode():
        for c in chunks:
            if isinstance(c, int):
                cache.crop(c)
                continue
            out = lm.model.base_model(input_ids=torch.tensor([c]), cache=cache, use_cache=True)
            outs.append(out.last_hidden_state[0])
    return outs


def _lean_steps(lean: LeanDecoder, chunks, capacity=8):
    cache, outs = lean.new_cache(capacity), []
    for c in chunks:
        if isinstance(c, int):
            cache.crop(c)
            continue
        outs.append(lean.forward(c, cache))
    return outs


def _chunks(prompt_len: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = lambda n: rng.integers(0, 700, n).tolist()  # noqa: E731
    return [ids(prompt_len), ids(1), ids(5), -3, ids(1), ids(9), -9, ids(2), ids(1), ids(13), ids(1)]


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("prompt_len", [90, 20])  # a BLAS prefill (over LONG tokens) and a packed one
def test_lean_forward_equals_transformers_bitwise(kind, prompt_len, tiny_model_dir, qwen2_dir):
    lm = load_model(str(tiny_model_dir if kind == "llama" else qwen2_dir), dtype="float32", device="cpu",
                    kernels="auto")
    assert lm.kernels.endswith("lean-decoder")
    lean = lm.model._tasc_lean
    chunks = _chunks(prompt_len)
    want, got = _reference_steps(lm, chunks), _lean_steps(lean, chunks)
    assert len(got) == len(want) == 9
    cache = lean.new_cache()
    lean.forward(chunks[0], cache)
    cache.crop(5)  # a non-negative value is the length to keep
    assert cache.length == 5
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert torch.equal(g, w), f"step {i}: max diff {(g - w).abs().max().item()}"
    if kind == "llama":  # q/k/v and gate/up fused; the modules' packed copies are views of it
        group = lean.layers[0].qkv
        assert group.packed is not None and np.shares_memory(group.modules[1]._tasc_packed, group.packed)
    else:  # gate/up widths of 100 columns: not fusable, each module runs its own packed copy
        assert lean.layers[0].gate_up.packed is None and lean.layers[0].qkv.bias is not None


def test_lean_forward_follows_weights_changed_in_place(tiny_model_dir):
    lm = load_model(str(tiny_model_dir), dtype="float32", device="cpu", kernels="auto")
    lean, chunks = lm.model._tasc_lean, _chunks(30, seed=1)
    before = _lean_steps(lean, chunks)
    with torch.no_grad():
        lm.model.model.layers[1].mlp.up_proj.weight.mul_(1.5)
        lm.model.model.layers[0].self_attn.k_proj.weight.add_(0.05)
    lean.refresh()  # what engine._Forward does at the start of every request
    after, want = _lean_steps(lean, chunks), _reference_steps(lm, chunks)
    assert not torch.equal(after[0], before[0])
    assert all(torch.equal(a, w) for a, w in zip(after, want, strict=True))


def test_decoding_through_the_lean_forward_emits_the_same_tokens(tiny_model_dir):
    lm = load_model(str(tiny_model_dir), dtype="float32", device="cpu", kernels="auto")
    prompts = ["What is the weather in Paris?", "def f(x):", "Book a table for two at 8pm"]
    greedy, sampled = DecodeConfig(max_new_tokens=30), DecodeConfig(max_new_tokens=30, temperature=0.8, seed=5)

    def run():
        return [[o.token_ids for o in engine.generate(lm.model, lm.tokenizer, prompts, method="greedy", config=c)]
                for c in (greedy, sampled)]

    lean = lm.model._tasc_lean
    steps = lean.steps
    with_lean = run()
    assert lean.steps > steps  # the lean forward did the work
    lm.model._tasc_lean = None
    try:
        without = run()
    finally:
        lm.model._tasc_lean = lean
    assert with_lean == without


def test_models_it_does_not_fit_keep_transformers_forward(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    eager = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="eager")
    assert packed.pack_linears(eager) > 0
    assert unsupported(eager) == "attention 'eager'"
    assert "lean-decoder" not in backend.speed_up(eager) and eager._tasc_lean is None
    fast = load_model(str(tiny_model_dir), dtype="float32", device="cpu", kernels="auto").model
    assert fast._tasc_lean is not None
    packed.unpack_linears(fast)  # the lean forward runs on the packed copies: it goes too
    assert getattr(fast, "_tasc_lean", None) is None
    plain = load_model(str(tiny_model_dir), dtype="float32", device="cpu").model
    assert unsupported(plain) == "linears not packed"


def test_step_benchmark_reports_both_forwards_and_checks_equality(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import json

    from benchmarks import bench_step

    out = tmp_path / "step.json"
    monkeypatch.setattr("sys.argv", ["bench_step", "--model", str(tiny_model_dir), "--context", "40", "--reps", "2",
                                     "--json", str(out)])
    bench_step.main()
    report = json.loads(out.read_text())
    assert report["bitwise_equal"] is True and report["kernels"].endswith("lean-decoder")
    assert [r["T"] for r in report["steps"]] == list(bench_step.LENGTHS)
    assert report["steps"][0]["V"] == 1.0 and all(r["lean_ms"] > 0 for r in report["steps"])
    assert "| 8 |" in capsys.readouterr().out
