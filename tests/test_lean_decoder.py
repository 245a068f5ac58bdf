"""The lean decoder forward: each position's hidden state bitwise the same however the tokens are
split into steps (fp32 and quantised weights); equal to transformers' forward (same linear
kernels; attention up to float rounding) over prefills, one-token and k-token steps, crops and
cache growth, for a grouped-query Llama and a Qwen2 with biases and unfusable widths; weights
changed in place are followed; decoding through it emits the same tokens; models it does not fit
keep transformers' forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tasc.accel import packed
from tasc.accel.backend import Backend
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
def test_lean_forward_equals_transformers(kind, prompt_len, tiny_model_dir, qwen2_dir):
    lm = load_model(str(tiny_model_dir if kind == "llama" else qwen2_dir), dtype="float32", device="cpu",
                    kernels="auto")
    assert lm.kernels.endswith("lean-decoder")
    lean = lm.backend.lean
    chunks = _chunks(prompt_len)
    want, got = _reference_steps(lm, chunks), _lean_steps(lean, chunks)
    assert len(got) == len(want) == 9
    cache = lean.new_cache()
    lean.forward(chunks[0], cache)
    cache.crop(5)  # a non-negative value is the length to keep
    assert cache.length == 5
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        # Decode and verify steps attend row by row (tasc.accel.attention), transformers with SDPA.
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5, msg=f"step {i}")
    if kind == "llama":  # q/k/v and gate/up fused; the modules' packed copies are views of it
        group = lean.layers[0].qkv
        assert group.packed is not None and np.shares_memory(group.modules[1]._tasc_packed, group.packed)
    else:  # gate/up widths of 100 columns: not fusable, each module runs its own packed copy
        assert lean.layers[0].gate_up.packed is None and lean.layers[0].qkv.bias is not None


def test_lean_forward_follows_weights_changed_in_place(tiny_model_dir):
    lm = load_model(str(tiny_model_dir), dtype="float32", device="cpu", kernels="auto")
    lean, chunks = lm.backend.lean, _chunks(30, seed=1)
    before = _lean_steps(lean, chunks)
    with torch.no_grad():
        lm.model.model.layers[1].mlp.up_proj.weight.mul_(1.5)
        lm.model.model.layers[0].self_attn.k_proj.weight.add_(0.05)
    lean.refresh()  # what Backend.start does at the start of every request
    after, want = _lean_steps(lean, chunks), _reference_steps(lm, chunks)
    assert not torch.equal(after[0], before[0])
    for a, w in zip(after, want, strict=True):
        torch.testing.assert_close(a, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "q8_0", "q4_1", "q4_0"])
def test_rows_do_not_depend_on_how_the_steps_split_them(dtype, tiny_model_dir):
    """The property lossless speculative decoding rests on: a k-token verify step gives bitwise
    the hidden states of k one-token steps, after crops too, with fp32 and quantised weights."""
    lm = load_model(str(tiny_model_dir), dtype=dtype, device="cpu", kernels="auto")
    assert "lean-decoder" in lm.kernels and (dtype == "float32") == ("quant" not in lm.kernels)
    lean = lm.backend.lean
    rng = np.random.default_rng(5)
    prompt, tokens = rng.integers(0, 700, 30).tolist(), rng.integers(0, 700, 17).tolist()
    one = lean.new_cache(8)
    lean.forward(prompt, one)
    singles = torch.cat([lean.forward([x], one) for x in tokens])
    for split in ([17], [4, 13], [1, 8, 8], [9, 3, 5]):
        cache = lean.new_cache(8)
        lean.forward(prompt, cache)
        lean.forward(rng.integers(0, 700, 6).tolist(), cache)  # a rejected draft, then cropped
        cache.crop(-6)
        got, start = [], 0
        for n in split:
            got.append(lean.forward(tokens[start:start + n], cache))
            start += n
        assert torch.equal(torch.cat(got), singles), f"split {split}"


def test_decoding_through_the_lean_forward_emits_the_same_tokens(tiny_model_dir):
    lm = load_model(str(tiny_model_dir), dtype="float32", device="cpu", kernels="auto")
    prompts = ["What is the weather in Paris?", "def f(x):", "Book a table for two at 8pm"]
    greedy, sampled = DecodeConfig(max_new_tokens=30), DecodeConfig(max_new_tokens=30, temperature=0.8, seed=5)

    def run(backend):
        return [[o.token_ids for o in engine.generate(backend, lm.tokenizer, prompts, method="greedy", config=c)]
                for c in (greedy, sampled)]

    lean = lm.backend.lean
    steps = lean.steps
    with_lean = run(lm.backend)
    assert lean.steps > steps  # the lean forward did the work
    steps = lean.steps
    without = Backend(lm.model, head=lm.backend.head)  # transformers' forward, same kernels
    assert run(without) == with_lean
    assert lean.steps == steps


def test_models_it_does_not_fit_keep_transformers_forward(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    eager = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="eager")
    assert packed.pack_linears(eager) > 0
    assert unsupported(eager) == "attention 'eager'"
    accelerated = Backend.accelerated(eager)
    assert "lean-decoder" not in accelerated.kernels and accelerated.lean is None
    assert Backend.for_model(eager) is accelerated
    fast = load_model(str(tiny_model_dir), dtype="float32", device="cpu", kernels="auto")
    assert fast.backend.lean is not None and Backend.for_model(fast.model) is fast.backend
    packed.unpack_linears(fast.model)  # the lean forward runs on the packed copies: it goes too
    assert Backend.for_model(fast.model).lean is None and Backend.for_model(fast.model).kernels == "torch"
    plain = load_model(str(tiny_model_dir), dtype="float32", device="cpu").model
    assert unsupported(plain) == "linears neither packed nor quantised"


def test_step_benchmark_reports_both_forwards_and_checks_equality(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import json

    from benchmarks import bench_step

    out = tmp_path / "step.json"
    monkeypatch.setattr("sys.argv", ["bench_step", "--model", str(tiny_model_dir), "--context", "40", "--reps", "2",
                                     "--json", str(out)])
    bench_step.main()
    report = json.loads(out.read_text())
    assert report["max_abs_diff"] < 1e-4 and report["kernels"].endswith("lean-decoder")
    assert [r["T"] for r in report["steps"]] == list(bench_step.LENGTHS)
    assert report["steps"][0]["V"] == 1.0 and all(r["lean_ms"] > 0 for r in report["steps"])
    assert "| 8 |" in capsys.readouterr().out


def test_the_fused_step_computes_what_the_op_by_op_lean_forward_does(tiny_model_dir):
    """The quantised decoder step in one C call (tasc.accel.fused) against the same layers run op
    by op: equal up to the int8 rounding of activations, which a last-bit difference upstream
    can move by one step."""
    lm = load_model(str(tiny_model_dir), dtype="q8_0", device="cpu", kernels="auto")
    lean = lm.backend.lean
    assert lean.fused is not None and lm.kernels.endswith("lean-decoder+fused-step")
    rng = np.random.default_rng(2)
    prompt, more = rng.integers(0, 700, 20).tolist(), rng.integers(0, 700, 4).tolist()
    fused = lean.new_cache(8)
    want = [lean.forward(prompt, fused), lean.forward(more, fused)]
    lean.fused, fused_step = None, lean.fused
    try:
        plain = lean.new_cache(8)
        got = [lean.forward(prompt, plain), lean.forward(more, plain)]
    finally:
        lean.fused = fused_step
    for g, w in zip(got, want, strict=True):
        assert ((g - w).norm() / w.norm()).item() < 0.05
    # Only the 24 written positions: the rest of a cache is uninitialised memory.
    written, fused_written = plain.keys[:, :, :, :24], fused.keys[:, :, :, :24]
    assert (written - fused_written).abs().max() < 0.05 * written.abs().max()


def test_the_portable_decoder_build_gives_the_avx2_builds_results_bitwise(tiny_model_dir, monkeypatch):
    """A CPU without AVX2 (ARM among them) gets kernels/decoder.c built with lane-by-lane
    stand-ins for the intrinsics: attention and whole fused steps come out bitwise as on AVX2,
    so TASC-spec stays lossless there and a model decodes the same tokens on either."""
    from tasc.accel import attention, fused, native

    if native.load("decoder") is None or native.load("decoder_portable") is None:
        pytest.skip("needs both builds (an AVX2 CPU and a C compiler)")
    real, rng = attention.decoder_library, np.random.default_rng(3)
    for d, past, t in ((64, 37, 5), (72, 3, 9), (8, 0, 1)):  # head dims over and under 64 lanes
        q = torch.from_numpy(rng.standard_normal((6, t, d)).astype(np.float32))
        k, v = (torch.from_numpy(rng.standard_normal((2, past + t + 3, d)).astype(np.float32)) for _ in range(2))
        outs = []
        for build in ("decoder", "decoder_portable"):
            monkeypatch.setattr(attention, "decoder_library", lambda b=build: real(b))
            outs.append(attention.attend_rows(q, k, v, past, 0.125, 2))
        assert torch.equal(outs[0], outs[1]), (d, past, t)
        assert torch.isfinite(outs[0]).all()
    lm = load_model(str(tiny_model_dir), dtype="q4_1", device="cpu", kernels="auto")
    lean, chunks = lm.backend.lean, _chunks(20, seed=4)
    results = []
    for build in ("decoder", "decoder_portable"):
        monkeypatch.setattr(fused, "decoder_library", lambda b=build: real(b))
        results.append(_lean_steps(lean, chunks))
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


def test_the_fused_steps_embeddings_and_rotary_rows_are_the_models(tiny_model_dir):
    """The fused step reads embeddings and rotary rows from tables instead of the model's
    modules (no torch op a step): the same values as the modules give, and a position's rotary
    row is the same in a table grown later."""
    lm = load_model(str(tiny_model_dir), dtype="q8_0", device="cpu", kernels="auto")
    lean = lm.backend.lean
    step, base = lean.fused, lean.base
    ids = [5, 17, 300, 5]
    want = base.embed_tokens(torch.tensor([ids]))[0]
    assert torch.equal(torch.from_numpy(step.embeddings()[ids]), want)
    cos, sin = step.rope_rows(8)
    want_cos, want_sin = base.rotary_emb(want[None], torch.tensor([[5, 6, 7]]))
    assert torch.allclose(torch.from_numpy(cos[5:8]), want_cos[0], atol=1e-6)
    assert torch.allclose(torch.from_numpy(sin[5:8]), want_sin[0], atol=1e-6)
    rows, row7 = len(cos), cos[7].copy()
    grown, _ = step.rope_rows(rows + 3)
    assert len(grown) > rows and np.array_equal(grown[7], row7)


def test_the_fused_step_ends_in_the_heads_argmax_of_its_rows_and_rejects_unknown_ids(tiny_model_dir):
    """A greedy step in one C call (layers, then the quantised head's argmax of the kept rows)
    gives the ids the head gives for the rows of the plain fused step, alone and for several
    requests at once; a token id outside the embedding table fails before the cache moves."""
    lm = load_model(str(tiny_model_dir), dtype="q4_1", device="cpu", kernels="auto")
    lean, head = lm.backend.lean, lm.backend.head
    rng = np.random.default_rng(6)
    prompts = [rng.integers(0, 700, n).tolist() for n in (9, 3, 14)]
    plain = [lean.new_cache(8) for _ in prompts]
    want = [head(lean.forward(p, c)[-k:].numpy()).tolist() for p, c, k in zip(prompts, plain, (1, 3, 5), strict=True)]
    one = lean.new_cache(8)
    assert lean.argmax_many([(prompts[0], one, 1)], head.weight()) == [want[0]]
    together = [lean.new_cache(8) for _ in prompts]
    got = lean.argmax_many([(p, c, k) for p, c, k in zip(prompts, together, (1, 3, 5), strict=True)], head.weight())
    assert got == want
    for a, b in zip(plain, together, strict=True):
        assert a.length == b.length and torch.equal(a.keys[:, :, :, : a.length], b.keys[:, :, :, : b.length])
    vocab = lean.base.embed_tokens.weight.shape[0]
    with pytest.raises(IndexError, match="token id out of range"):
        lean.argmax_many([([3, vocab], one, 1)], head.weight())
    assert one.length == 9


def test_a_long_prompt_goes_through_the_fused_step_with_rows_independent_of_the_split(tiny_model_dir):
    """A prompt over packed.LONG tokens on quantised weights runs through the fused step LONG
    tokens at a time: each position's hidden state is bitwise what steps of any other length
    give, and the fused step did the work (not the dequantised weights' BLAS path)."""
    lm = load_model(str(tiny_model_dir), dtype="q8_0", device="cpu", kernels="auto")
    lean = lm.backend.lean
    long = packed.LONG
    ids = np.random.default_rng(5).integers(0, 700, long * 2 + 13).tolist()
    calls, real = [], lean.fused
    if not real.vectorised:
        pytest.skip("the portable C kernel leaves long prompts to BLAS")

    class Counting:  # the fused step, counting the tokens of each call
        vectorised = real.vectorised

        def __call__(self, chunk, cache):
            calls.append(len(chunk))
            return real(chunk, cache)

    lean.fused = Counting()
    try:
        whole = lean.forward(ids, lean.new_cache(8))
    finally:
        lean.fused = real
    assert calls == [long, long, 13]
    pieces, cache = [], lean.new_cache(8)
    for i in range(0, len(ids), 10):
        pieces.append(lean.forward(ids[i : i + 10], cache))
    assert torch.equal(whole, torch.cat(pieces))


def test_the_fused_step_without_tables_computes_what_it_does_with_them(tiny_model_dir, tmp_path, monkeypatch):
    """Rotary types whose frequencies depend on the sequence length (dynamic) get their rows from
    the model's module each step, and an embedding that is not a plain float32 table from its
    module: the fused step then gives the same ids as the op-by-op forward and the head, and
    with the embedding module the same hidden states bitwise as with the table."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cfg = AutoConfig.from_pretrained(tiny_model_dir)
    cfg.rope_parameters = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    torch.manual_seed(4)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path)
    lm = load_model(str(tmp_path), dtype="q8_0", device="cpu", kernels="auto")
    lean, head = lm.backend.lean, lm.backend.head
    assert lean.fused is not None and not lean.fused.rope_table
    ids = np.random.default_rng(7).integers(0, 700, 12).tolist()
    fused_cache = lean.new_cache(8)
    got = lean.argmax_many([(ids, fused_cache, 3)], head.weight())[0]
    step, lean.fused = lean.fused, None
    try:
        plain = lean.forward(ids, lean.new_cache(8))
    finally:
        lean.fused = step
    assert got == head(plain[-3:].numpy()).tolist()
    with_table = lean.forward(ids, lean.new_cache(8))
    monkeypatch.setattr(step, "embeddings", lambda: None)
    assert torch.equal(lean.forward(ids, lean.new_cache(8)), with_table)
