"""Our header reader against gguf-py's GGUFReader, and its errors on broken files."""

import gguf
import numpy as np
import pytest

from conftest import ARCHS, fixture
from lora2gguf.errors import Lora2GGUFError
from lora2gguf.fileio.gguf_read import GGUFFile, StringArray


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", ["f32", "f16", "q8_0", "q4_k_m"])
def test_matches_gguf_reader(arch, kind):
    path = fixture(arch, kind)
    ref = gguf.GGUFReader(path)
    with GGUFFile(path) as f:
        ref_keys = [k for k in ref.fields if not k.startswith("GGUF.")]
        assert list(f.fields) == ref_keys
        for key in ref_keys:
            rf, ours = ref.fields[key], f.fields[key]
            assert ours.type == rf.types[0], key
            if isinstance(ours.value, StringArray):
                assert list(ours.value) == [rf.contents(i) for i in range(len(rf.data))], key
            elif isinstance(ours.value, np.ndarray):
                assert np.array_equal(ours.value, np.array(rf.contents())), key
            elif ours.type == gguf.GGUFValueType.FLOAT32:  # we keep the shortest decimal of the same float32
                assert np.float32(ours.value) == np.float32(rf.contents()), key
            else:
                assert ours.value == rf.contents(), key
        assert [t.name for t in ref.tensors] == list(f.tensors)
        for t in ref.tensors:
            info = f.tensors[t.name]
            assert info.type == t.tensor_type and info.nbytes == t.n_bytes
            assert info.shape == tuple(reversed([int(x) for x in t.shape]))
            assert np.array_equal(f.raw(t.name), t.data.reshape(-1).view(np.uint8)), t.name
            want = gguf.quants.dequantize(t.data, t.tensor_type).reshape(info.shape)
            assert np.array_equal(f.tensor(t.name), want), t.name


def _broken(tmp_path, data: bytes, name="broken.gguf"):
    p = tmp_path / name
    p.write_bytes(data)
    return p


def test_truncated_header_kv_and_data(tmp_path):
    good = fixture("llama").read_bytes()
    with GGUFFile(fixture("llama")) as f:
        data_offset = f.data_offset
    for cut, what in [(20, "header"), (200, "metadata"), (data_offset + 100, "tensor data")]:
        p = _broken(tmp_path, good[:cut])
        with pytest.raises(Lora2GGUFError) as e:
            GGUFFile(p)
        msg = str(e.value)
        assert str(p) in msg and ("truncated" in msg or "past the end" in msg or "too short" in msg), (what, msg)


def test_not_gguf_and_bad_version(tmp_path):
    with pytest.raises(Lora2GGUFError, match="not a GGUF file"):
        GGUFFile(_broken(tmp_path, b"PK\x03\x04" + bytes(100)))
    good = bytearray(fixture("llama").read_bytes())
    good[4:8] = (99).to_bytes(4, "little")
    with pytest.raises(Lora2GGUFError, match="unsupported GGUF version 99"):
        GGUFFile(_broken(tmp_path, bytes(good)))


def test_missing_file(tmp_path):
    with pytest.raises(Lora2GGUFError, match="no such file"):
        GGUFFile(tmp_path / "nope.gguf")


def _rss_file_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssFile"))


def test_release_drops_a_read_tensors_pages_and_keeps_its_values(tmp_path):
    """release(prefix): the pages of those tensors leave the process's resident set once read (verify's
    reference drops each layer's), the others stay, and a later read still gives the same values."""
    w = gguf.GGUFWriter(tmp_path / "t.gguf", "llama")
    rng = np.random.default_rng(0)
    values = {name: rng.standard_normal((1024, 4096)).astype(np.float32) for name in ("blk.0.a", "blk.1.a")}
    for name, v in values.items():
        w.add_tensor(name, v)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with GGUFFile(tmp_path / "t.gguf") as f:
        before = _rss_file_kb()
        sums = {name: float(f.raw(name).view(np.float32).sum()) for name in values}
        read = _rss_file_kb()
        f.release("blk.0.")
        released = _rss_file_kb()
        assert read - before >= 2 * 15_000, "both 16 MB tensors were read through the map"
        assert read - released >= 15_000 and released - before >= 15_000, "blk.0 left, blk.1 stayed"
        assert np.array_equal(f.raw("blk.0.a").view(np.float32).reshape(1024, 4096), values["blk.0.a"])
        assert sums["blk.0.a"] == float(values["blk.0.a"].sum())
