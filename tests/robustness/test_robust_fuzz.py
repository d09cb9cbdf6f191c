"""Fuzzing the loaders with hypothesis: mutate the bytes of a small valid GGUF LoRA and of a small
safetensors adapter, and require that every load either gives a valid result or raises Lora2GGUFError —
never any other exception (which the CLI would show as a traceback). Derandomized: CI sees the same
examples every run."""

from __future__ import annotations

import itertools
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from robust_corpus import BASE, build_valid, gguf_layout

from lora2gguf.errors import Lora2GGUFError

# a warning (numpy overflow, ...) would be an extra stderr line beside the CLI's one error line
pytestmark = pytest.mark.filterwarnings("error")

EXAMPLES = 500  # per target; ~5-10 ms each
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def work():
    d = Path(tempfile.mkdtemp(prefix="lora2gguf-fuzz-"))
    yield d, build_valid(d / "valid")
    shutil.rmtree(d, ignore_errors=True)


_n = itertools.count()


def mutations(size: int, hot: int):
    """Edits of a file of `size` bytes: single bytes, or 4/8-byte integers chosen to hit counts, lengths,
    types and offsets (0, 1, all ones, huge, about the file size), mostly in the first `hot` bytes (header,
    metadata, tensor infos), plus an optional truncation."""
    pos = st.one_of(st.integers(0, max(0, hot - 1)), st.integers(0, size - 1))
    value = st.sampled_from([0, 1, 2, 3, 7, 8, 31, 255, 256, size // 2, size, size + 1, 2**31 - 1, 2**32 - 1,
                             2**62, 2**63, 2**64 - 1])
    edit = st.one_of(st.tuples(pos, st.integers(0, 255)).map(lambda t: (t[0], bytes([t[1]]))),
                     st.tuples(pos, value).map(lambda t: (t[0], struct.pack("<I", t[1] % 2**32))),
                     st.tuples(pos, value).map(lambda t: (t[0], struct.pack("<Q", t[1]))))
    return st.tuples(st.lists(edit, min_size=1, max_size=6), st.one_of(st.none(), st.integers(0, size)))


def mutate(data: bytes, edits, cut) -> bytes:
    b = bytearray(data)
    for at, chunk in edits:
        b[at:at + len(chunk)] = chunk[: max(0, len(b) - at)]
    return bytes(b[:cut] if cut is not None else b)


def _spec():
    from lora2gguf.weights.base_model import GGUFBase

    with GGUFBase(BASE) as b:
        return b.spec


def test_fuzz_gguf_adapter(work):
    """GGUFFile, load_gguf_lora (what merge/export/verify read), describe (inspect), and the loader every
    verb uses against a base (load_for_base: shapes and the base fingerprint check)."""
    from lora2gguf.adapters.gguf_lora import describe_gguf_adapter, load_gguf_lora
    from lora2gguf.adapters.load import load_for_base
    from lora2gguf.fileio.gguf_read import GGUFFile
    from lora2gguf.weights.base_model import GGUFBase

    d, v = work
    good = v.gguf.read_bytes()
    lay = gguf_layout(v.gguf)
    spec = _spec()
    outcomes = {"loaded": 0, "refused": 0}
    base = GGUFBase(BASE)

    @FUZZ
    @given(m=mutations(len(good), lay["data"]))
    def run(m):
        p = d / f"m{next(_n)}.gguf"  # a fresh name each time: no mapping of an earlier file is ever reused
        p.write_bytes(mutate(good, *m))
        try:
            with GGUFFile(p) as f:
                describe_gguf_adapter(f)
            a = load_gguf_lora(p, spec)
            load_for_base(p, base)
        except Lora2GGUFError as e:
            assert str(e).startswith(str(p)), e  # names the file
            outcomes["refused"] += 1
        else:
            for m_ in a.modules.values():
                assert np.isfinite(m_.A).all() and np.isfinite(m_.B).all() and np.isfinite(m_.scale)
                assert m_.A.shape[0] == m_.B.shape[1] == m_.r >= 1
            outcomes["loaded"] += 1
        finally:
            p.unlink()

    try:
        run()
    finally:
        base.close()
    assert outcomes["refused"] > EXAMPLES // 4 and outcomes["loaded"] > 0, outcomes  # both paths exercised


def test_fuzz_safetensors_adapter(work):
    """The PEFT loader (read_safetensors_f32 through the safetensors library's validation, then PEFT's
    layout checks) on mutated adapter_model.safetensors files."""
    from lora2gguf.adapters.peft import load_peft

    d, v = work
    good = (v.peft / "adapter_model.safetensors").read_bytes()
    header_end = 8 + struct.unpack("<Q", good[:8])[0]
    outcomes = {"loaded": 0, "refused": 0}

    @FUZZ
    @given(m=mutations(len(good), header_end))
    def run(m):
        a_dir = d / f"a{next(_n)}"
        a_dir.mkdir()
        shutil.copy(v.peft / "adapter_config.json", a_dir)
        (a_dir / "adapter_model.safetensors").write_bytes(mutate(good, *m))
        try:
            a = load_peft(a_dir)
        except Lora2GGUFError as e:
            assert str(a_dir) in str(e), e
            outcomes["refused"] += 1
        else:
            for m_ in a.modules.values():
                assert m_.A.dtype == m_.B.dtype == np.float32
                assert np.isfinite(m_.A).all() and np.isfinite(m_.B).all()
                assert m_.A.shape[0] == m_.B.shape[1] == m_.r
            outcomes["loaded"] += 1
        finally:
            shutil.rmtree(a_dir)

    run()
    assert outcomes["refused"] > EXAMPLES // 4 and outcomes["loaded"] > 0, outcomes


def test_fuzz_gguf_base_header(work):
    """A base model's header (metadata, tensor infos: what every verb reads first), through GGUFBase: the
    spec, every tensor's presence and shape, and the fingerprint sample convert records."""
    from lora2gguf.weights import fingerprint
    from lora2gguf.weights.base_model import GGUFBase

    d, _ = work
    good = BASE.read_bytes()
    lay = gguf_layout(BASE)
    outcomes = {"loaded": 0, "refused": 0}

    @settings(FUZZ, max_examples=EXAMPLES // 2)
    @given(m=mutations(lay["data"], lay["data"]))  # edits in the header only: the data is all values
    def run(m):
        p = d / f"b{next(_n)}.gguf"
        p.write_bytes(mutate(good, *m))
        try:
            with GGUFBase(p) as b:
                fingerprint.fingerprint(b)
                assert b.spec.n_layer >= 1 and b.spec.n_head >= 1
        except Lora2GGUFError as e:
            assert str(e).startswith(str(p)), e
            outcomes["refused"] += 1
        else:
            outcomes["loaded"] += 1
        finally:
            p.unlink()

    run()
    assert outcomes["refused"] > EXAMPLES // 8 and outcomes["loaded"] > 0, outcomes
