"""Fine-tuning on the tiny model: masking, loss going down, resume, config checks, divergence."""

from __future__ import annotations

import json

import numpy as np
import pytest

import tasc.train.finetune as ft
from tasc.ft.expand import expand_tokenizer, resize_and_init
from tasc.ft.rounds import count_output_tokens, plateau
from tasc.train.config import FinetuneConfig, cpu_config, gpu_config
from tasc.train.finetune import DivergedError, ResumeError, finetune
from tasc.train.io import collate, encode_rows
from tests.test_vocab import snips_completions

TOKENS = ['{"intent": "', '", "slots": {"', '"}}']


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    out = []
    for c in snips_completions(24):
        obj = json.loads(c)
        out.append({"prompt": f"Parse: {' '.join(map(str, obj['slots'].values()))}", "completion": c})
    return out


@pytest.fixture(scope="module")
def new_tokenizer(tiny_tokenizer):
    return expand_tokenizer(tiny_tokenizer, TOKENS)


def fresh_model(tiny_model_dir, tiny_tokenizer, new_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    resize_and_init(model, tiny_tokenizer, new_tokenizer, TOKENS)
    return model


def small(**kw) -> FinetuneConfig:
    base = dict(lr=3e-3, warmup_steps=2, max_steps=6, batch_size=4, max_seq_len=96, eval_every=100,
                save_every=100, device="cpu", max_eval_rows=8, cpu_threads=1)
    return FinetuneConfig(**{**base, **kw})


def run(tiny_model_dir, tiny_tokenizer, new_tokenizer, rows, out_dir, config):
    model = fresh_model(tiny_model_dir, tiny_tokenizer, new_tokenizer)
    return finetune(model, new_tokenizer, rows[:20], rows[20:], config, out_dir, progress=False)


def test_prompt_is_masked_and_eos_appended(new_tokenizer, rows):
    ex = encode_rows(new_tokenizer, rows[:2], chat_template=True, system_prompt="Be brief.", max_seq_len=512)
    batch = collate(ex, new_tokenizer.pad_token_id)
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    n = len(ex[0].ids)
    prompt = new_tokenizer.decode(ids[: ex[0].n_prompt])
    assert prompt.startswith("<|im_start|>system\nBe brief.") and prompt.endswith("<|im_start|>assistant\n")
    assert (labels[: ex[0].n_prompt] == -100).all() and (labels[ex[0].n_prompt : n] == ids[ex[0].n_prompt : n]).all()
    assert new_tokenizer.decode(ids[ex[0].n_prompt : n]) == rows[0]["completion"] + "<|im_end|>"
    assert new_tokenizer.convert_tokens_to_ids(TOKENS[0]) in ids.tolist()
    cut = encode_rows(new_tokenizer, rows[:1], chat_template=True, system_prompt=None, max_seq_len=20)[0]
    assert len(cut.ids) == 20 and cut.n_prompt >= 1


def test_a_few_steps_lower_the_loss(tiny_model_dir, tiny_tokenizer, new_tokenizer, rows, tmp_path):
    model = fresh_model(tiny_model_dir, tiny_tokenizer, new_tokenizer)
    val = encode_rows(new_tokenizer, rows[20:], True, None, 96)
    before = ft.evaluate(model, val, 4, new_tokenizer.pad_token_id, "cpu", ft.contextlib.nullcontext())
    res = finetune(model, new_tokenizer, rows[:20], rows[20:], small(max_steps=12), tmp_path, progress=False)
    assert res.steps == 12 and len(res.history) == 12 and res.val_loss < before
    assert np.mean([h["loss"] for h in res.history[-3:]]) < np.mean([h["loss"] for h in res.history[:3]])
    assert res.tokens_per_s > 0 and (res.checkpoint_dir / "config.json").exists()
    from tasc.models import load_model

    loaded = load_model(res.checkpoint_dir, device="cpu", dtype="float32")
    assert len(loaded.tokenizer) == len(new_tokenizer) == loaded.model.get_input_embeddings().weight.shape[0]


def test_lora_trains_new_rows_and_merges(tiny_model_dir, tiny_tokenizer, new_tokenizer, rows, tmp_path):
    model = fresh_model(tiny_model_dir, tiny_tokenizer, new_tokenizer)
    new_id = new_tokenizer.convert_tokens_to_ids(TOKENS[0])
    row_before = model.get_input_embeddings().weight[new_id].detach().clone()
    old_row = model.get_input_embeddings().weight[5].detach().clone()
    res = finetune(model, new_tokenizer, rows[:20], rows[20:], small(lora=True, lora_r=4, max_steps=4), tmp_path,
                   progress=False)
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(res.checkpoint_dir)
    emb = merged.get_input_embeddings().weight
    assert not np.allclose(emb[new_id].detach(), row_before) and np.allclose(emb[5].detach(), old_row)
    assert merged.get_output_embeddings().weight.data_ptr() == emb.data_ptr()


def _kill_after(monkeypatch, step: int):
    real = ft.save_checkpoint

    def save_then_die(out_dir, at, *args, **kwargs):
        path = real(out_dir, at, *args, **kwargs)
        if at == step:
            raise KeyboardInterrupt("killed")
        return path

    monkeypatch.setattr(ft, "save_checkpoint", save_then_die)


@pytest.mark.parametrize("lora", [False, True])
def test_killed_run_resumes_where_it_stopped(tiny_model_dir, tiny_tokenizer, new_tokenizer, rows, tmp_path,
                                             monkeypatch, lora):
    args = (tiny_model_dir, tiny_tokenizer, new_tokenizer, rows)
    straight = run(*args, tmp_path / "straight", small(save_every=2, lora=lora))
    with monkeypatch.context() as m:
        _kill_after(m, 4)
        with pytest.raises(KeyboardInterrupt):
            run(*args, tmp_path / "killed", small(save_every=2, lora=lora))
    assert not (tmp_path / "killed" / "final").exists()
    resumed = run(*args, tmp_path / "killed", small(save_every=2, lora=lora))
    assert resumed.resumed_from == 4 and resumed.steps == 6
    assert [h["step"] for h in resumed.history] == list(range(1, 7))
    np.testing.assert_allclose([h["loss"] for h in resumed.history], [h["loss"] for h in straight.history],
                               rtol=1e-5)
    more = run(*args, tmp_path / "killed", small(save_every=2, max_steps=8, lora=lora))  # extend the run
    assert more.resumed_from == 6 and more.steps == 8 and len(more.history) == 8
    kept = sorted(p.name for p in (tmp_path / "killed" / "checkpoints").iterdir())
    assert kept == ["step-000006", "step-000008"]


def test_changed_config_on_resume_errors(tiny_model_dir, tiny_tokenizer, new_tokenizer, rows, tmp_path):
    args = (tiny_model_dir, tiny_tokenizer, new_tokenizer, rows)
    run(*args, tmp_path, small(max_steps=2))
    with pytest.raises(ResumeError, match="lr"):
        run(*args, tmp_path, small(max_steps=4, lr=1e-2))
    model = fresh_model(tiny_model_dir, tiny_tokenizer, new_tokenizer)
    with pytest.raises(ResumeError, match="other training"):
        finetune(model, new_tokenizer, rows[:10], rows[20:], small(max_steps=4), tmp_path, progress=False)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_model_dir, tiny_tokenizer, new_tokenizer, rows,
                                                       tmp_path, monkeypatch):
    real, calls = ft.completion_loss, []

    def poisoned(model, batch, autocast):
        loss, n = real(model, batch, autocast)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 3 else loss), n

    monkeypatch.setattr(ft, "completion_loss", poisoned)
    with pytest.raises(DivergedError, match="step 3") as err:
        run(tiny_model_dir, tiny_tokenizer, new_tokenizer, rows, tmp_path, small(save_every=2))
    good = tmp_path / "checkpoints" / "step-000002"
    assert err.value.checkpoint == good and str(good) in str(err.value)
    assert json.loads((good / "state.json").read_text())["step"] == 2
    assert sorted(p.name for p in good.parent.iterdir()) == ["step-000002"]


def test_huge_learning_rate_diverges(tiny_model_dir, tiny_tokenizer, new_tokenizer, rows, tmp_path):
    with pytest.raises(DivergedError, match="diverged") as err:
        run(tiny_model_dir, tiny_tokenizer, new_tokenizer, rows, tmp_path, small(lr=1e30, save_every=1))
    assert err.value.checkpoint is None or (err.value.checkpoint / "state.json").exists()


def test_count_output_tokens_and_plateau(new_tokenizer, tiny_tokenizer):
    texts = ['{"intent": "GetWeather", "slots": {"city": "Paris"}}', ""]
    assert count_output_tokens(new_tokenizer, texts).tolist()[1] == 0
    assert (count_output_tokens(new_tokenizer, texts) < count_output_tokens(tiny_tokenizer, texts))[0]
    assert count_output_tokens(new_tokenizer, []).dtype == np.int64
    assert not plateau([{"tokens": 100, "metric": 0.8}])
    assert not plateau([{"tokens": 100, "metric": 0.8}, {"tokens": 80, "metric": 0.8}])
    assert plateau([{"tokens": 100, "metric": 0.8}, {"tokens": 99, "metric": 0.8}])
    assert plateau([{"tokens": 100, "metric": 0.8}, {"tokens": 50, "metric": 0.7}])


def test_presets():
    assert cpu_config().device == "cpu" and gpu_config().device == "cuda"
    assert cpu_config(max_steps=3).max_steps == 3
    assert FinetuneConfig().hash() == FinetuneConfig(max_steps=7, device="cuda").hash() != FinetuneConfig(lr=1).hash()


@pytest.mark.parametrize("lora", [False, True])
def test_embedding_warmup_trains_only_new_rows_first(tiny_model_dir, tiny_tokenizer, new_tokenizer, rows, tmp_path,
                                                     lora):
    new_id = new_tokenizer.convert_tokens_to_ids(TOKENS[0])
    cfg = small(max_steps=2, embed_warmup_steps=2, new_token_lr=1e-2, lora=lora, lora_r=4)
    model = fresh_model(tiny_model_dir, tiny_tokenizer, new_tokenizer)
    emb0 = model.get_input_embeddings().weight.detach().clone()
    layer0 = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    res = finetune(model, new_tokenizer, rows[:20], rows[20:], cfg, tmp_path / "warm", progress=False)
    from transformers import AutoModelForCausalLM

    after = AutoModelForCausalLM.from_pretrained(res.checkpoint_dir)
    emb = after.get_input_embeddings().weight.detach()
    old = [i for i in range(emb0.shape[0]) if i < len(tiny_tokenizer)]
    assert not np.allclose(emb[new_id], emb0[new_id])  # the new rows learned
    assert np.allclose(emb[old], emb0[old])  # nothing else did
    assert np.allclose(after.model.layers[0].mlp.up_proj.weight.detach(), layer0)


def test_new_rows_get_their_own_learning_rate(tiny_model_dir, tiny_tokenizer, new_tokenizer, rows, tmp_path):
    new_id = new_tokenizer.convert_tokens_to_ids(TOKENS[0])

    def moved(new_token_lr):
        model = fresh_model(tiny_model_dir, tiny_tokenizer, new_tokenizer)
        emb0 = model.get_input_embeddings().weight.detach().clone()
        res = finetune(model, new_tokenizer, rows[:20], rows[20:],
                       small(max_steps=3, warmup_steps=1, lr=1e-3, new_token_lr=new_token_lr),
                       tmp_path / str(new_token_lr), progress=False)
        emb = res and model.get_input_embeddings().weight.detach()
        return float((emb[new_id] - emb0[new_id]).norm()), float((emb[5] - emb0[5]).norm())

    new_fast, old_fast = moved(1e-2)
    new_same, old_same = moved(None)
    # Adam steps are about lr per weight: 10x the rate moves the new row about 10x as far,
    # while an old row moves the same in both runs.
    assert new_fast > 5 * new_same
    assert old_fast == pytest.approx(old_same, rel=0.05) and old_same > 0
