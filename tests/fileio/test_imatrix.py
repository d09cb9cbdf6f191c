"""fileio.imatrix: llama.cpp's importance-matrix files. That llama.cpp reads our GGUF form and our reading
of both forms as its loader does is proven byte for byte in tests/llamacpp/test_ggml.py (llama-quantize
--imatrix against our quantizer); here: the format round trip, the legacy layout, and the refusals."""

import struct

import numpy as np
import pytest
from gguf import GGUFReader, GGUFWriter

from lora2gguf.errors import Lora2GGUFError
from lora2gguf.fileio.imatrix import Imatrix, read_imatrix, write_imatrix


def write_legacy(path, entries: dict[str, tuple[int, np.ndarray]], chunks: int | None = None, dataset: str = ""):
    """The legacy .dat layout as llama-imatrix's save_imatrix_legacy writes it (tools/imatrix/imatrix.cpp):
    n_entries; per entry name length, name, ncall, nval, values; then the chunk count and dataset name."""
    with open(path, "wb") as f:
        f.write(struct.pack("<i", len(entries)))
        for name, (ncall, values) in entries.items():
            f.write(struct.pack("<i", len(name)) + name.encode())
            f.write(struct.pack("<ii", ncall, values.size) + np.asarray(values, "<f4").tobytes())
        if chunks is not None:
            f.write(struct.pack("<i", chunks) + struct.pack("<i", len(dataset)) + dataset.encode())
    return path


def test_gguf_round_trip_and_layout(tmp_path):
    rng = np.random.default_rng(0)
    im = Imatrix(datasets=["a.txt", "b.txt"], chunk_count=7, chunk_size=512)
    im.sums["blk.0.ffn_down_exps.weight"] = rng.random((4, 32), np.float32)  # 4 experts
    im.counts["blk.0.ffn_down_exps.weight"] = np.array([10, 0, 3, 5], np.float32)
    im.sums["blk.0.attn_q.weight"] = rng.random((1, 16), np.float32)
    im.counts["blk.0.attn_q.weight"] = np.array([20], np.float32)
    write_imatrix(tmp_path / "m.gguf", im, "llama")
    r = GGUFReader(tmp_path / "m.gguf")  # what llama-imatrix writes: ne [ne0, n_mat] and [1, n_mat], sorted
    assert r.fields["general.type"].contents() == "imatrix"
    assert [t.name for t in r.tensors] == ["blk.0.attn_q.weight.in_sum2", "blk.0.attn_q.weight.counts",
                                           "blk.0.ffn_down_exps.weight.in_sum2", "blk.0.ffn_down_exps.weight.counts"]
    assert [list(t.shape) for t in r.tensors] == [[16, 1], [1, 1], [32, 4], [1, 4]]
    back = read_imatrix(tmp_path / "m.gguf")
    assert back.datasets == ["a.txt", "b.txt"] and (back.chunk_count, back.chunk_size) == (7, 512)
    imp = back.importance()
    s, c = im.sums["blk.0.ffn_down_exps.weight"], im.counts["blk.0.ffn_down_exps.weight"]
    want = np.concatenate([s[0] / 10, np.ones(32, np.float32), s[2] / 3, s[3] / 5])  # count 0: 1.0
    np.testing.assert_array_equal(imp["blk.0.ffn_down_exps.weight"], want.astype(np.float32))
    np.testing.assert_array_equal(imp["blk.0.attn_q.weight"], im.sums["blk.0.attn_q.weight"][0] / np.float32(20))


def test_legacy_dat(tmp_path):
    v = np.arange(1, 9, dtype=np.float32)
    p = write_legacy(tmp_path / "m.dat", {"blk.0.attn_k.weight": (4, v), "blk.1.attn_k.weight": (0, v)}, 12, "wiki")
    im = read_imatrix(p)
    assert im.legacy and im.chunk_count == 12 and im.datasets == ["wiki"]
    imp = im.importance()
    np.testing.assert_array_equal(imp["blk.0.attn_k.weight"], v / np.float32(4))  # sums are mean·ncall
    np.testing.assert_array_equal(imp["blk.1.attn_k.weight"], v)  # ncall 0: as stored
    assert read_imatrix(write_legacy(tmp_path / "bare.dat", {"x.weight": (1, v)})).datasets == []


def _gguf(path, tensors: dict, kv: dict | None = None):
    w = GGUFWriter(path, "llama")
    for k, v in (kv if kv is not None else {"imatrix.datasets": ["d"], "imatrix.chunk_count": 1,
                                             "imatrix.chunk_size": 1}).items():
        if isinstance(v, list):
            w.add_array(k, v)
        else:
            w.add_uint32(k, v)
    for name, a in tensors.items():
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("case,match", [
    ("no-metadata", "missing imatrix metadata"),
    ("no-counts", "mismatched sums and counts for blk.0.attn_q.weight"),
    ("not-f32", "must be F32"),
    ("nan", "non-finite"),
    ("other-tensor", "neither"),
    ("truncated-dat", "truncated legacy"),
    ("empty", "neither a GGUF nor a legacy"),
])
def test_bad_files_are_one_line(tmp_path, case, match):
    s = np.ones((1, 8), np.float32)
    c = np.ones((1, 1), np.float32)
    p = tmp_path / "m.gguf"
    if case == "no-metadata":
        _gguf(p, {"blk.0.attn_q.weight.in_sum2": s, "blk.0.attn_q.weight.counts": c}, kv={})
    elif case == "no-counts":
        _gguf(p, {"blk.0.attn_q.weight.in_sum2": s})
    elif case == "not-f32":
        _gguf(p, {"blk.0.attn_q.weight.in_sum2": s.astype(np.float16), "blk.0.attn_q.weight.counts": c})
    elif case == "nan":
        _gguf(p, {"blk.0.attn_q.weight.in_sum2": s * np.nan, "blk.0.attn_q.weight.counts": c})
    elif case == "other-tensor":
        _gguf(p, {"blk.0.attn_q.weight": s})
    elif case == "truncated-dat":
        p.write_bytes(write_legacy(tmp_path / "x.dat", {"a.weight": (1, np.ones(8, np.float32))}).read_bytes()[:20])
    else:
        p.write_bytes(struct.pack("<i", 0))
    with pytest.raises(Lora2GGUFError, match=match) as e:
        read_imatrix(p)
    assert str(p) in str(e.value) and "\n" not in str(e.value)
