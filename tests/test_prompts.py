"""One prompt rendering for every stage: training, harvest (both paths), benchmark and serving
feed the model the same ids for the same corpus row, chat rows' ``system`` and earlier
``messages`` included, with the real tiny tokenizer."""

from __future__ import annotations

import json
import types

import pandas as pd
import pytest

from tasc.data.prompts import chat_messages, encode_prompts, render_prompt
from tasc.decode.engine import DecodeConfig, Output

SPEC_SYSTEM = "Answer with JSON only."
EARLIER = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"}]
ROWS = [
    {"id": "a", "prompt": "Book a table for two at 8pm", "completion": '{"intent": "BookRestaurant"}',
     "system": "You book restaurants.", "messages": json.dumps(EARLIER)},
    # As read from a Parquet corpus where this row has no chat columns: NaN, not None.
    {"id": "b", "prompt": "What is the weather in Paris?", "completion": '{"intent": "GetWeather"}',
     "system": float("nan"), "messages": "[]"},
    {"id": "c", "prompt": "Play some jazz music", "completion": '{"intent": "PlayMusic"}'},
]


def test_chat_row_renders_system_and_earlier_turns(tiny_tokenizer):
    text = render_prompt(tiny_tokenizer, ROWS[0], SPEC_SYSTEM)
    assert text == ("<|im_start|>system\nYou book restaurants.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
                    "<|im_start|>assistant\nHello! How can I help?<|im_end|>\n"
                    "<|im_start|>user\nBook a table for two at 8pm<|im_end|>\n<|im_start|>assistant\n")
    # No system column (or a missing value): the spec's system prompt; a plain string is a row.
    assert chat_messages(ROWS[1], SPEC_SYSTEM)[0] == {"role": "system", "content": SPEC_SYSTEM}
    assert render_prompt(tiny_tokenizer, ROWS[2]["prompt"], SPEC_SYSTEM) == render_prompt(tiny_tokenizer, ROWS[2],
                                                                                           SPEC_SYSTEM)
    assert render_prompt(tiny_tokenizer, ROWS[2]) == "<|im_start|>user\nPlay some jazz music<|im_end|>\n" \
                                                     "<|im_start|>assistant\n"


def test_without_a_chat_template_the_bare_prompt(tiny_tokenizer):
    assert render_prompt(tiny_tokenizer, ROWS[0], SPEC_SYSTEM, chat_template=False) == ROWS[0]["prompt"]
    plain = tiny_tokenizer.__class__.from_pretrained(tiny_tokenizer.name_or_path)
    plain.chat_template = None
    assert render_prompt(plain, ROWS[0], SPEC_SYSTEM) == ROWS[0]["prompt"]
    assert encode_prompts(plain, [ROWS[0]])[0] == plain(ROWS[0]["prompt"])["input_ids"]


def _recorder(seen: list):
    """A stand-in for the decode call of a stage: records the prompt ids it was given."""

    def decode(*args, **kw):
        seen.append(next(list(a) for a in (*args, *kw.values())
                         if isinstance(a, list) and a and all(isinstance(i, int) for i in a)))
        return Output(text="", token_ids=[])

    return decode


@pytest.fixture(scope="module")
def expected(tiny_tokenizer):
    return encode_prompts(tiny_tokenizer, ROWS, SPEC_SYSTEM, True)


def test_training_feeds_the_rendered_prompt(tiny_tokenizer, expected):
    from tasc.train.io import encode_rows

    examples = encode_rows(tiny_tokenizer, pd.DataFrame(ROWS), True, SPEC_SYSTEM, max_seq_len=512)
    assert [list(ex.ids[: ex.n_prompt]) for ex in examples] == expected
    texts = [tiny_tokenizer.decode(ids) for ids in expected]
    assert texts == [render_prompt(tiny_tokenizer, r, SPEC_SYSTEM) for r in ROWS]


def test_harvest_feeds_the_rendered_prompt(tiny_lm, expected, monkeypatch):
    from tasc.decode import harvest as harvest_mod

    seen = []
    monkeypatch.setattr(harvest_mod, "measure_verify_cost", lambda *a, **k: None)
    monkeypatch.setattr(harvest_mod, "decode", _recorder(seen))
    harvest_mod.harvest(tiny_lm, ROWS, 4, SPEC_SYSTEM, True)
    assert seen == expected

    # The batched path (a GPU): the same ids, left-padded.
    batched = []

    def generate(input_ids, attention_mask, **kw):
        batched.extend([i for i, m in zip(row.tolist(), mask.tolist(), strict=True) if m]
                       for row, mask in zip(input_ids, attention_mask, strict=True))
        return input_ids

    gpu = types.SimpleNamespace(model=types.SimpleNamespace(generate=generate, device="cpu",
                                                            generation_config=tiny_lm.model.generation_config),
                                tokenizer=tiny_lm.tokenizer, device="cuda")
    harvest_mod.harvest(gpu, ROWS, 4, SPEC_SYSTEM, True, batch_size=2)
    assert batched == expected


def test_benchmark_feeds_the_rendered_prompt(tiny_lm, expected, monkeypatch):
    from tasc.eval import methods
    from tasc.eval.harness import run_benchmark

    seen = []
    monkeypatch.setattr(methods, "decode", _recorder(seen))
    made = methods.build_methods(["greedy"], tiny_lm, DecodeConfig(max_new_tokens=4), SPEC_SYSTEM, True, {}, [0.0, 1.0])
    run_benchmark(made, ROWS, "exact_match", warmup=0)
    assert seen == expected


def test_serving_feeds_the_rendered_prompt(tiny_lm, expected, monkeypatch):
    from storage.pyfunc_model import TascModel
    from tasc.decode import engine

    seen = []
    monkeypatch.setattr(engine, "decode", _recorder(seen))
    served = TascModel()
    served.lm, served.draft, served.cost = tiny_lm, None, None
    served.config = {"system_prompt": SPEC_SYSTEM, "chat_template": True}
    frame = pd.DataFrame(ROWS)[["prompt", "system", "messages"]]
    assert served.predict(None, frame, {"method": "greedy"}) == ["", "", ""]
    assert seen == expected
    # A bare list of prompts is served like rows with only a prompt.
    seen.clear()
    served.predict(None, [ROWS[2]["prompt"]], {"method": "greedy"})
    assert seen == expected[2:]
