"""A model's linears on the blocks of a GGUF file (tasc.accel.quantized): the file's blocks as
stored, q/k rows put back in Hugging Face order, a tensor type the kernels do not run replaced
by Q8_0 with a one-line notice, and a damaged file named in the error."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tasc.accel import variants
from tasc.accel.quantized import GGUF_NAMES, quantize_model
from tasc.models import load_model

pytestmark = pytest.mark.skipif(not variants.available(), reason="no C compiler here")


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's conversion of a q or k projection (rotary halves interleaved per head)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(model, path, skip_type_for: str | None = None) -> None:
    import gguf

    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    for i, layer in enumerate(model.model.layers):
        for name, gname in GGUF_NAMES.items():
            w = (getattr(layer.self_attn, name, None) or getattr(layer.mlp, name)).weight.detach().numpy()
            if name == "q_proj":
                w = _permute(w, cfg.num_attention_heads)
            elif name == "k_proj":
                w = _permute(w, cfg.num_key_value_heads)
            key = f"blk.{i}.{gname}.weight"
            if key == skip_type_for:  # stored as F16, which the kernels do not run
                writer.add_tensor(key, w.astype(np.float16))
                continue
            q = gguf.quants.quantize(np.ascontiguousarray(w, dtype=np.float32), gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(key, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    head = model.get_output_embeddings().weight.detach().numpy()
    q = gguf.quants.quantize(np.ascontiguousarray(head), gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("token_embd.weight", q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_blocks_run_as_stored_with_q_and_k_rows_in_model_order(tiny_model_dir, tmp_path, capsys):
    """The GGUF's Q8_0 blocks (q/k permuted as llama.cpp stores them) give the same logits as
    the model's own weights quantised to Q8_0 at load: the blocks are the same bytes once the
    rows are back in order. One F16 tensor falls back to Q8_0 with a notice."""
    path = tmp_path / "tiny.gguf"
    fp32 = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    _write_gguf(fp32.model, path, skip_type_for="blk.1.ffn_down.weight")
    ref = load_model(str(tiny_model_dir), dtype="q8_0", device="cpu", kernels="auto")
    model = load_model(str(tiny_model_dir), dtype="float32", device="cpu").model
    released = []
    label = quantize_model(model, "gguf", path, release=released.append)
    assert label == "gguf Q8_0, head Q8_0"
    # Each fp32 weight, and the GGUF bytes of each, are released once quantised (loading hands
    # their file pages back then).
    linears = [m.weight for m in model.modules() if "_tasc_quant" in m.__dict__]
    assert len(linears) == 7 * len(model.model.layers) + 1
    assert sorted(id(t) for t in released if isinstance(t, torch.Tensor)) == sorted(map(id, linears))
    blocks = [a for a in released if isinstance(a, np.ndarray)]
    assert len(blocks) == len(linears) and all(a.dtype == np.uint8 and not a.flags.writeable for a in blocks)
    assert "blk.1.ffn_down.weight: F16 is not a kernel format; quantised to Q8_0" in capsys.readouterr().err
    for mine, theirs in zip(model.model.layers, ref.model.model.layers, strict=True):
        for name in ("q_proj", "k_proj", "down_proj"):
            a = (getattr(mine.self_attn, name, None) or getattr(mine.mlp, name))._tasc_quant
            b = (getattr(theirs.self_attn, name, None) or getattr(theirs.mlp, name))._tasc_quant
            assert np.array_equal(a.blocks, b.blocks), name
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    with torch.inference_mode():
        assert torch.equal(model(input_ids=ids).logits, ref.model(input_ids=ids).logits)


def test_quantising_at_load_releases_each_weight_as_it_goes(tiny_model_dir):
    """Quantised at load, every row of every fp32 weight is released in slices as it is
    quantised, then the weight itself (loading hands their file pages back)."""
    model = load_model(str(tiny_model_dir), dtype="float32", device="cpu").model
    released = []
    assert quantize_model(model, "q8_0", release=released.append) == "q8_0"
    weights = [m.weight for m in model.modules() if "_tasc_quant" in m.__dict__]
    assert [id(t) for t in released if isinstance(t, torch.Tensor)] == [id(w) for w in weights]
    rows, at = {}, 0
    for t in released:
        if isinstance(t, torch.Tensor):
            rows[id(t)] = at
            at = 0
        else:
            assert t.dtype == np.float32 and t.ndim == 2
            at += len(t)
    assert all(rows[id(w)] == w.shape[0] for w in weights)


def test_a_tensor_type_unknown_to_the_gguf_package_falls_back_with_a_notice(tiny_model_dir, tmp_path, capsys):
    from tests.test_gguf_index import retype_tensor

    path = tmp_path / "tiny.gguf"
    fp32 = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    _write_gguf(fp32.model, path, skip_type_for="blk.1.ffn_down.weight")
    path.write_bytes(retype_tensor(path.read_bytes(), "blk.1.ffn_down.weight", 199))
    model = load_model(str(tiny_model_dir), dtype="float32", device="cpu").model
    assert quantize_model(model, "gguf", path) == "gguf Q8_0, head Q8_0"
    assert "blk.1.ffn_down.weight: type 199 is not a kernel format; quantised to Q8_0" in capsys.readouterr().err


def test_a_damaged_gguf_fails_naming_the_file(tiny_model_dir, tmp_path):
    path = tmp_path / "cut.gguf"
    fp32 = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    _write_gguf(fp32.model, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    model = load_model(str(tiny_model_dir), dtype="float32", device="cpu").model
    with pytest.raises(ValueError, match="cut.gguf: not a readable GGUF file"):
        quantize_model(model, "gguf", path)


def _mapped_file(t: torch.Tensor) -> str | None:
    """The file whose mapping holds ``t``'s data, or None (anonymous memory, the heap)."""
    at = t.data_ptr()
    for line in open("/proc/self/maps"):
        span, *rest = line.split()
        lo, hi = (int(v, 16) for v in span.split("-"))
        if lo <= at < hi:
            return rest[4] if len(rest) > 4 and rest[4].startswith("/") else None
    return None


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/maps"), reason="needs /proc")
@pytest.mark.parametrize("weights", ["gguf", "q8_0", "float32"])
def test_fp32_weights_stay_mapped_where_the_kernels_decode_on_copies(tiny_model_dir, tmp_path, weights):
    """A model decoded on quantised weights, or on tasc's packed fp32 copies, leaves its fp32
    linears and embedding mapped from the folder's safetensors file (copy-on-write), not
    copied into memory. Its weights read back as loaded (after their pages were handed back,
    where quantised), and it decodes the same as a fully copied model. A weight changed in
    place changes the outputs and leaves the file as it was."""
    import hashlib
    import shutil

    gguf_path = tmp_path / "tiny.gguf"
    fp32 = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    _write_gguf(fp32.model, gguf_path)
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    if weights == "gguf":
        (folder / "SOURCE").write_text(f"converted from {gguf_path}\n")
    lm = load_model(str(folder), dtype="float32" if weights == "float32" else "auto", device="cpu", kernels="auto")
    assert lm.weights == {"gguf": "gguf Q8_0, head Q8_0", "q8_0": "q8_0", "float32": "float32"}[weights]
    file = folder / "model.safetensors"
    digest = hashlib.sha256(file.read_bytes()).hexdigest()
    base = lm.model.model
    assert _mapped_file(base.layers[0].mlp.down_proj.weight) == str(file)
    assert _mapped_file(base.layers[1].self_attn.q_proj.weight) == str(file)
    assert _mapped_file(base.embed_tokens.weight) == str(file)
    assert _mapped_file(base.layers[0].input_layernorm.weight) is None  # read every step: copied
    with open("/proc/self/maps") as f:  # packed, the GGUF blocks let the file go
        assert str(gguf_path) not in f.read()

    ref = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    for p in ref.model.parameters():
        assert _mapped_file(p) is None
    # Pages handed back after quantisation (tasc.accel.resident.page_out) read back as they were.
    for (name, a), b in zip(lm.model.named_parameters(), ref.model.parameters(), strict=True):
        assert torch.equal(a, b), name
    from tasc.accel.backend import Backend

    ref_backend = Backend.accelerated(ref.model, weights, gguf_path)
    ids = [5, 17, 42, 99, 3, 8]
    mine, theirs = lm.backend.start(reuse_prefix=False), ref_backend.start(reuse_prefix=False)
    assert torch.equal(mine.step(ids, 6), theirs.step(ids, 6))
    assert mine.argmax([11, 12], 2) == theirs.argmax([11, 12], 2)

    with torch.no_grad():
        before = lm.backend.start(reuse_prefix=False).step(ids, 1)
        base.layers[0].mlp.down_proj.weight.mul_(-1.0)
        after = lm.backend.start(reuse_prefix=False).step(ids, 1)
    assert not torch.equal(before, after)
    assert hashlib.sha256(file.read_bytes()).hexdigest() == digest


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/maps"), reason="needs /proc")
def test_file_spans_are_whole_pages_of_file_mappings_only(tmp_path):
    import mmap

    from tasc.accel.resident import file_spans

    page = mmap.PAGESIZE
    path = tmp_path / "blob.bin"
    path.write_bytes(bytes(range(256)) * (3 * page // 256))
    mapped = np.memmap(path, dtype=np.uint8, mode="r")
    assert int(mapped[: 3 * page].astype(np.int64).sum()) == 3 * page // 256 * sum(range(256))
    assert file_spans([mapped]) == [(mapped.ctypes.data, mapped.ctypes.data + 3 * page)]
    inner = mapped[10 : 2 * page + 10]  # two pages' bytes, one whole page inside
    assert file_spans([inner]) == [(mapped.ctypes.data + page, mapped.ctypes.data + 2 * page)]
    assert file_spans([np.ones(4 * page, dtype=np.uint8)]) == []  # anonymous memory: not handed back
    assert file_spans([torch.ones(4 * page)]) == []


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/maps"), reason="needs /proc")
def test_the_releaser_hands_back_file_pages_only_and_sees_files_mapped_later(tmp_path):
    import mmap

    from tasc.accel.native import MADV_PAGEOUT, madvise
    from tasc.accel.resident import Releaser

    page = mmap.PAGESIZE
    first, second = tmp_path / "a.bin", tmp_path / "b.bin"
    for p in (first, second):
        p.write_bytes(b"\x07" * (4 * page))
    release = Releaser()
    a = np.memmap(first, dtype=np.uint8, mode="r")
    handed = release(a)
    if handed == 0 and not madvise(a.ctypes.data, page, MADV_PAGEOUT):
        pytest.skip("this kernel has no MADV_PAGEOUT")
    assert handed == 4 * page
    assert release(np.ones(4 * page, dtype=np.uint8)) == 0  # anonymous memory: never
    b = np.memmap(second, dtype=np.uint8, mode="r")  # mapped after the first look
    assert release(b[page:]) == 3 * page
    assert int(a.sum()) == int(b.sum()) == 7 * 4 * page  # read back from the files


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/pagemap"), reason="needs /proc")
def test_a_page_written_since_it_was_mapped_keeps_its_contents_when_released(tmp_path):
    """Released pages that are still the file's are dropped (they read back from it); a page
    written in a copy-on-write mapping is a private copy, whose contents must survive."""
    import mmap

    from tasc.accel.resident import Releaser, _only_file_pages

    page = mmap.PAGESIZE
    path = tmp_path / "w.bin"
    path.write_bytes(b"\x01" * (4 * page))
    w = np.memmap(path, dtype=np.uint8, mode="c")  # copy-on-write, as safetensors maps weights
    assert int(w.sum()) == 4 * page
    start = w.ctypes.data
    assert _only_file_pages(start, start + 4 * page)
    w[page + 5] = 9  # page 1 becomes a private copy
    assert not _only_file_pages(start, start + 4 * page)
    assert _only_file_pages(start + 2 * page, start + 4 * page)
    Releaser()(w)
    assert w[page + 5] == 9 and int(w.sum()) == 4 * page + 8
    assert path.read_bytes() == b"\x01" * (4 * page)
