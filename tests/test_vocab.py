"""Token selection, tokenizer expansion and embedding initialisation on the tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tasc.data.spec import default_data_dir
from tasc.ft.expand import expand_tokenizer, resize_and_init, round_trip_report
from tasc.ft.select import SelectionConfig, TokenizerError, _Counter, select_tokens


def snips_completions(limit: int = 200) -> list[str]:
    """Canonical SNIPS JSON completions, as the snips reader writes them."""
    out: list[str] = []
    files = sorted((default_data_dir() / "snips" / "validate").glob("*.json"))
    for f in files:
        for intent, items in json.loads(f.read_bytes().decode("utf-8", errors="replace")).items():
            for item in items[: -(-limit // len(files))]:
                slots: dict = {}
                for seg in item["data"]:
                    if "entity" in seg:
                        v = seg["text"].strip()
                        old = slots.get(seg["entity"])
                        slots[seg["entity"]] = v if old is None else [*old, v] if isinstance(old, list) else [old, v]
                out.append(json.dumps({"intent": intent, "slots": slots}, ensure_ascii=False))
    return out[:limit]


def mbpp_code(limit: int = 100) -> list[str]:
    with open(default_data_dir() / "mbpp" / "mbpp.jsonl", encoding="utf-8") as fh:
        rows = [json.loads(line) for _, line in zip(range(limit), fh, strict=False)]
    return [r["code"].replace("\r\n", "\n") for r in rows]


@pytest.fixture(scope="module")
def real_slice() -> list[str]:
    return snips_completions(200) + mbpp_code(100)


@pytest.fixture(scope="module")
def selection(real_slice, tiny_tokenizer):
    return select_tokens(real_slice, tiny_tokenizer, SelectionConfig(tokens_per_round=40))


def _n_tokens(tok, text: str) -> int:
    return len(tok.encode(text, add_special_tokens=False))


def test_selection_prefers_savings_over_frequency(tiny_tokenizer):
    short, long = "zq", "xylophonequartzjk"
    assert _n_tokens(tiny_tokenizer, short) == 2 and _n_tokens(tiny_tokenizer, long) >= 6
    corpus = [short] * 60 + [long] * 20  # short: 60 x 1 saved; long: 20 x (6+ - 1) saved
    sel = select_tokens(corpus, tiny_tokenizer, SelectionConfig(tokens_per_round=1))
    assert sel.tokens == [long]
    both = select_tokens(corpus, tiny_tokenizer, SelectionConfig(tokens_per_round=2))
    assert both.tokens == [long, short]
    assert both.new_total == 80 and both.base_total == 60 * 2 + 20 * _n_tokens(tiny_tokenizer, long)


def test_selected_tokens_really_cut_tokens(selection, real_slice, tiny_tokenizer):
    t = selection.table
    assert 0 < len(t) <= 40 and t["token"].is_unique
    assert (t["measured_gain"] >= 5).all() and (t["uses"] > 0).all()
    new = expand_tokenizer(tiny_tokenizer, selection.tokens)
    lengths = [len(x) for x in new(real_slice, add_special_tokens=False)["input_ids"]]
    assert sum(lengths) == selection.new_total < selection.base_total
    assert selection.reduction > 0.2  # JSON scaffolding and code idioms compress well


def test_counter_matches_the_real_tokenizer(selection, real_slice, tiny_tokenizer):
    counter = _Counter(tiny_tokenizer.backend_tokenizer.to_str())
    counter.reset(selection.tokens)
    lengths, uses = counter.lengths(real_slice)
    new = expand_tokenizer(tiny_tokenizer, selection.tokens)
    real = new(real_slice, add_special_tokens=False)["input_ids"]
    assert lengths.tolist() == [len(x) for x in real]
    assert uses.tolist() == selection.table["uses"].tolist()


def test_round_trip_exact_and_new_tokens_used(selection, real_slice, tiny_tokenizer):
    new = expand_tokenizer(tiny_tokenizer, selection.tokens)
    report = round_trip_report(new, real_slice, base_tokenizer=tiny_tokenizer)
    assert report["exact"] and report["failures"] == []
    assert report["new_tokens"] < report["base_tokens"] == selection.base_total
    assert round_trip_report(new, real_slice)["base_tokens"] == report["base_tokens"]
    used = {i for ids in new(real_slice, add_special_tokens=False)["input_ids"] for i in ids}
    new_ids = {new.convert_tokens_to_ids(t) for t in selection.tokens}
    assert new_ids <= used and min(new_ids) >= len(tiny_tokenizer)
    assert len(tiny_tokenizer) + len(selection.tokens) == len(new)  # the input was not changed


def test_spaces_newlines_and_tabs_round_trip(tiny_tokenizer, tmp_path):
    tokens = [" the city", "\n    return", '": "', "\t\t", " café", "  "]
    new = expand_tokenizer(tiny_tokenizer, tokens)
    texts = ['{"city": "the city"}', "def f(x):\n    return x\n", "a\t\tb  c", "go to the city café now"]
    assert round_trip_report(new, texts)["exact"]
    ids = {i for t in texts for i in new.encode(t, add_special_tokens=False)}
    assert {new.convert_tokens_to_ids(t) for t in tokens} <= ids
    new.save_pretrained(tmp_path)  # the added tokens survive a save and reload
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(tmp_path)
    assert [again.encode(t, add_special_tokens=False) for t in texts] == [
        new.encode(t, add_special_tokens=False) for t in texts
    ]


def test_unsafe_or_known_tokens_are_refused(tiny_tokenizer):
    with pytest.raises(TokenizerError, match="café"):  # byte-level alphabet only: decodes as raw bytes
        expand_tokenizer(tiny_tokenizer, ["café"])
    known = next(t for t in tiny_tokenizer.get_vocab() if len(t) > 3 and t.isalpha())
    with pytest.raises(TokenizerError, match="already in the vocabulary"):
        expand_tokenizer(tiny_tokenizer, [known])


def test_tokenizer_without_fast_backend_errors():
    class SlowTokenizer:
        is_fast = False

        def get_vocab(self):
            return {}

    with pytest.raises(TokenizerError, match="no fast"):
        expand_tokenizer(SlowTokenizer(), ["abc"])
    with pytest.raises(TokenizerError, match="no fast"):
        select_tokens(["abc abc"], SlowTokenizer())


def _expanded_model(tiny_model_dir, tiny_tokenizer, tie: bool = True):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(tiny_model_dir)
    cfg.tie_word_embeddings = tie
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, config=cfg)
    if not tie:
        with torch.no_grad():
            model.lm_head.weight.normal_()
    return model


def test_embeddings_initialised_to_the_mean_and_ties_kept(tiny_model_dir, tiny_tokenizer):
    tokens = ['{"intent": "', " the city", "\n    return"]
    new = expand_tokenizer(tiny_tokenizer, tokens)
    model = _expanded_model(tiny_model_dir, tiny_tokenizer)
    before = model.get_input_embeddings().weight.detach().clone()
    added = resize_and_init(model, tiny_tokenizer, new, tokens)
    emb = model.get_input_embeddings().weight
    assert emb.shape[0] == len(new) == model.config.vocab_size
    assert added == len(tokens) * emb.shape[1]
    assert model.get_output_embeddings().weight.data_ptr() == emb.data_ptr()
    assert (emb[: before.shape[0]] == before).all()
    for t in tokens:
        pieces = tiny_tokenizer.encode(t, add_special_tokens=False)
        np.testing.assert_allclose(emb[new.convert_tokens_to_ids(t)].detach(), before[pieces].mean(0), atol=1e-6)


def test_weighted_init_and_untied_head(tiny_model_dir, tiny_tokenizer):
    tokens = ["\n    return"]
    new = expand_tokenizer(tiny_tokenizer, tokens)
    model = _expanded_model(tiny_model_dir, tiny_tokenizer, tie=False)
    head_before = model.get_output_embeddings().weight.detach().clone()
    added = resize_and_init(model, tiny_tokenizer, new, tokens, method="weighted")
    assert added == 2 * emb_width(model)
    pieces = tiny_tokenizer.encode(tokens[0], add_special_tokens=False)
    w = np.arange(len(pieces), 0, -1, dtype=np.float64)
    w /= w.sum()
    row = model.get_output_embeddings().weight[new.convert_tokens_to_ids(tokens[0])].detach().numpy()
    np.testing.assert_allclose(row, (w[:, None] * head_before[pieces].numpy()).sum(0), atol=1e-5)
    assert model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    with pytest.raises(ValueError, match="unknown init method"):
        resize_and_init(model, tiny_tokenizer, new, tokens, method="median")


def emb_width(model) -> int:
    return model.get_input_embeddings().weight.shape[1]


def test_second_round_builds_on_the_first(selection, real_slice, tiny_tokenizer):
    first = expand_tokenizer(tiny_tokenizer, selection.tokens)
    again = select_tokens(real_slice, first, SelectionConfig(tokens_per_round=20))
    assert again.base_total == selection.new_total and again.new_total < again.base_total
    assert not set(again.tokens) & set(selection.tokens)
    counter = _Counter(first.backend_tokenizer.to_str())
    counter.reset(again.tokens)
    second = expand_tokenizer(first, again.tokens)
    assert counter.lengths(real_slice)[0].tolist() == [len(x) for x in second(real_slice, add_special_tokens=False)["input_ids"]]
    assert round_trip_report(second, real_slice, base_tokenizer=tiny_tokenizer)["exact"]


def test_nothing_to_choose(tiny_tokenizer):
    sel = select_tokens(["a", "b"], tiny_tokenizer)
    assert sel.tokens == [] and sel.base_total == sel.new_total == 2 and sel.reduction == 0.0
