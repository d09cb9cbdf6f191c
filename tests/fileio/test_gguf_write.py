"""gguf_write's atomic outputs: the mode an ordinary file gets under the umask (servers running as another
user read them), and a dead writer's temp files removed by the next run."""

import os
import stat
import subprocess
import sys

import pytest

from conftest import fixture
from lora2gguf.fileio.atomic import atomic_output, remove_stale_parts


def mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


@pytest.fixture
def umask022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_atomic_output_mode_follows_the_umask(tmp_path):
    for umask, want in [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)]:
        old = os.umask(umask)
        try:
            with atomic_output(tmp_path / f"out-{umask:o}") as tmp:
                tmp.write_bytes(b"x")
        finally:
            os.umask(old)
        assert mode(tmp_path / f"out-{umask:o}") == want


def test_every_output_is_readable_by_others(tmp_path, umask022):
    """GGUF LoRA, merged model, PEFT export dir, training run (adapter, checkpoint, log): 0644 / 0755."""
    from lora2gguf.commands.convert import convert
    from lora2gguf.commands.export import export
    from lora2gguf.commands.merge import merge
    from lora2gguf.training.config import TrainConfig
    from lora2gguf.commands.train import train
    from peft_helpers import make_peft_adapter

    peft_dir = make_peft_adapter(fixture("llama", "hf"), tmp_path / "a", r=4, lora_alpha=8, target_modules=["q_proj"])
    lora = convert(peft_dir, fixture("llama"), tmp_path / "a.gguf")
    merged = merge(fixture("llama"), [(lora, 1.0)], tmp_path / "m.gguf", quant="q8_0")
    exported = export(lora, fixture("llama"), tmp_path / "exported")
    run = tmp_path / "run"
    train(TrainConfig(base=str(fixture("llama")), data=str(fixture("llama").parent.parent / "train" / "text.jsonl"),
                      out=str(run), steps=2, save_every=1, rank=4, seq_len=32, batch_size=1, device="cpu",
                      progress=False))
    files = [lora, merged, *exported.iterdir(), *[p for p in run.rglob("*") if p.is_file()]]
    dirs = [exported, run, *[p for p in run.rglob("*") if p.is_dir()]]
    assert any(p.name == "trainer_state.pt" for p in files)
    assert {str(p): mode(p) for p in files} == {str(p): 0o644 for p in files}
    assert {str(p): mode(p) for p in dirs} == {str(p): 0o755 for p in dirs}


def test_stale_parts_of_dead_writers_are_removed(tmp_path):
    out = tmp_path / "model.gguf"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = tmp_path / f".model.gguf.{dead}.abc123.part"
    stale_mid = tmp_path / f".model.gguf.{dead}.def456.merged.part"
    stale_dir = tmp_path / f".model.gguf.{dead}.xyz.part"
    live = tmp_path / f".model.gguf.{os.getpid()}.ghi789.part"  # a writer still running: kept
    other = tmp_path / f".other.gguf.{dead}.abc.part"  # another output's: not ours to touch
    for p in (stale, stale_mid, live, other):
        p.write_bytes(b"partial")
    stale_dir.mkdir()
    (stale_dir / "adapter_model.safetensors").write_bytes(b"partial")
    with atomic_output(out) as tmp:
        tmp.write_bytes(b"new")
    assert out.read_bytes() == b"new"
    assert not stale.exists() and not stale_mid.exists() and not stale_dir.exists()
    assert live.exists() and other.exists()
    assert remove_stale_parts(out) == []


def _kv_bytes(writer, path) -> bytes:
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.close()
    return path.read_bytes()


def test_metadata_writer_packs_arrays_as_gguf_py_does(tmp_path):
    """MetadataWriter's at-once packing of the arrays it copies (strings as stored, numbers by numpy) gives
    gguf-py's bytes: every key type, empty and non-ASCII strings, a nested array, and the fixtures' vocabularies."""
    import numpy as np
    from gguf import GGUFValueType as V
    from gguf import GGUFWriter

    from lora2gguf.fileio.gguf_read import GGUFFile
    from lora2gguf.fileio.gguf_write import MetadataWriter, copy_fields

    src = GGUFWriter(str(tmp_path / "src.gguf"), "llama")
    src.add_array("t.strings", ["", "a", "ü€𝄞", "<0x80>", "x" * 300])
    for vt, dt in ((V.UINT8, np.uint8), (V.INT8, np.int8), (V.UINT16, np.uint16), (V.INT16, np.int16),
                   (V.UINT32, np.uint32), (V.INT32, np.int32), (V.FLOAT32, np.float32), (V.UINT64, np.uint64),
                   (V.INT64, np.int64), (V.FLOAT64, np.float64), (V.BOOL, np.bool_)):
        vals = np.arange(-3, 4).astype(dt) if vt != V.BOOL else np.array([True, False, True])
        src.add_key_value(f"t.{vt.name}", vals.tolist(), V.ARRAY, sub_type=vt)
    src.add_key_value("t.nested", [[1, 2], [3]], V.ARRAY, sub_type=V.ARRAY)
    src.add_string("t.s", "plain")
    _kv_bytes(src, tmp_path / "src.gguf")
    for path in [tmp_path / "src.gguf", fixture("llama"), fixture("gemma3")]:
        with GGUFFile(path) as f:
            arch = f.get("general.architecture")
            plain, fast = GGUFWriter(None, arch), MetadataWriter(None, arch)
            copy_fields(f, plain)
            copy_fields(f, fast)
            assert _kv_bytes(fast, tmp_path / "fast.gguf") == _kv_bytes(plain, tmp_path / "plain.gguf"), path
