"""fileio.ggml_dequantize (ggml's own to_float, what fileio.gguf_read.decode uses for quant blocks) against
gguf-py's numpy dequantizer, bit for bit: llama.cpp's quantizations of random floats in every type both
convert, every tensor of the fixture GGUFs through decode, and decode's fallback to gguf-py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES

from conftest import ARCHS, fixture
from lora2gguf.fileio import ggml_dequantize, gguf_read
from lora2gguf.fileio.gguf_read import GGUFFile, decode
from lora2gguf.llamacpp.ggml import _libs

Q = gguf.GGMLQuantizationType


def gguf_py(raw: np.ndarray, qtype) -> np.ndarray:
    return gguf.quants.dequantize(np.ascontiguousarray(raw), qtype).astype(np.float32).reshape(-1)


def gguf_py_converts(qtype) -> bool:
    try:
        gguf.quants.dequantize(np.zeros(GGML_QUANT_SIZES[qtype][1], np.uint8), qtype)
        return True
    except (NotImplementedError, KeyError, ValueError):
        return False


BLOCK_TYPES = [t for t in Q if t in GGML_QUANT_SIZES and t not in (Q.F32, Q.F16, Q.BF16) and gguf_py_converts(t)]


def llama_cpp_blocks(qtype, rows: int = 16, n_cols: int = 1024) -> np.ndarray:
    """ggml_quantize_chunk of random floats (per-row magnitudes 1e-4..1e2, a zero row, outliers), with a
    random importance matrix for the types that need one."""
    _, g = _libs()
    rng = np.random.default_rng(int(qtype))
    x = (rng.standard_normal((rows, n_cols)) * np.exp(rng.uniform(-9, 5, size=(rows, 1)))).astype(np.float32)
    x[5] = 0.0
    x[6, ::97] *= 1000.0
    block, size = GGML_QUANT_SIZES[qtype]
    raw = np.empty(rows * n_cols // block * size, np.uint8)
    imatrix = rng.uniform(0.1, 2.0, n_cols).astype(np.float32)
    g.ggml_quantize_chunk(int(qtype), x.ctypes.data, raw.ctypes.data, 0, rows, n_cols, imatrix.ctypes.data)
    return raw


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
def test_llama_cpp_quantizations_same_bits_as_gguf_py(qtype):
    raw = llama_cpp_blocks(qtype)
    ours = ggml_dequantize.to_float(raw, qtype)
    assert ours is not None, f"ggml has no to_float for {qtype.name}"
    want = gguf_py(raw, qtype)
    assert ours.dtype == np.float32 and ours.shape == want.shape
    assert np.array_equal(ours.view(np.uint32), want.view(np.uint32)), qtype.name
    assert np.any(ours != 0)


def test_fixture_tensors_through_decode():
    seen = set()
    for arch in ARCHS:
        for kind in ("q8_0", "q4_k_m"):
            with GGUFFile(fixture(arch, kind)) as f:
                for t in f.tensors.values():
                    if t.type in (Q.F32, Q.F16):
                        continue
                    got = f.tensor(t.name)
                    assert got.shape == t.shape
                    assert np.array_equal(got.reshape(-1).view(np.uint32), gguf_py(f.raw(t.name), t.type).view(np.uint32))
                    seen.add(t.type)
    assert seen == {Q.Q8_0, Q.Q5_0, Q.Q4_K, Q.Q6_K}


def test_decode_falls_back_to_gguf_py(monkeypatch):
    raw = llama_cpp_blocks(Q.Q4_K)
    fast = decode(raw, Q.Q4_K, (-1, 1024))
    monkeypatch.setattr(gguf_read, "to_float", lambda raw, qtype: None)
    slow = decode(raw, Q.Q4_K, (-1, 1024))
    assert np.array_equal(fast.view(np.uint32), slow.view(np.uint32))


def test_partial_blocks_are_refused():
    with pytest.raises(ValueError, match="not whole Q4_K blocks"):
        ggml_dequantize.to_float(np.zeros(100, np.uint8), Q.Q4_K)


MAPPED = """
import sys
from lora2gguf.fileio.ggml_dequantize import ggml_base
if sys.argv[1] == "llama_cpp first":
    import llama_cpp
assert ggml_base() is not None
import llama_cpp
print(len({ln.split()[-1] for ln in open("/proc/self/maps") if "libggml-base" in ln}))
"""


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/self/maps (Linux)")
@pytest.mark.parametrize("order", ["llama_cpp first", "ours first"])
def test_one_copy_of_ggml_in_the_process(order):
    """The handle is the library libllama links (one set of ggml's global state), whichever loads first."""
    out = subprocess.run([sys.executable, "-c", MAPPED, order], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1", out


@pytest.mark.parametrize("threads", [2, 3, 7])
def test_threads_and_out_give_the_same_values(threads):
    raw = llama_cpp_blocks(Q.Q4_K, rows=13)
    want = ggml_dequantize.to_float(raw, Q.Q4_K)
    out = np.full(want.size, np.nan, np.float32)
    got = ggml_dequantize.to_float(raw, Q.Q4_K, out, threads=threads)
    assert got.ctypes.data == out.ctypes.data and np.array_equal(got.view(np.uint32), want.view(np.uint32))
    with pytest.raises(ValueError, match="out must be"):
        ggml_dequantize.to_float(raw, Q.Q4_K, np.empty(3, np.float32))
