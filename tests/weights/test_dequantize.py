"""lora2gguf.weights.dequantize against gguf-py's numpy dequantizer, bit for bit: random blocks (every byte pattern
of the packed fields, scales spanning f16's range), llama.cpp's own quantizations of random floats (and
its own dequantizer as a second reference), the fixture GGUFs, and (slow) every tensor of real models."""

from __future__ import annotations

import ctypes
import importlib.util
import mmap
import warnings
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES

from conftest import ARCHS, fixture
from lora2gguf.weights.dequantize import SUPPORTED, dequantize
from lora2gguf.errors import Lora2GGUFError
from lora2gguf.fileio.gguf_read import GGUFFile

Q = gguf.GGMLQuantizationType
ALL = sorted(SUPPORTED)
BLOCK_TYPES = [t for t in ALL if t not in (Q.F32, Q.F16, Q.BF16)]
# Byte offsets of the f16 scale fields in each block (gguf/quants.py's hsplits; ggml-common.h's block_*).
F16_FIELDS = {Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2), Q.Q8_0: (0,), Q.Q2_K: (80, 82),
              Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}
SEEDS = (0, 1, 2)
# f16 bit patterns a scale must be right for: ±0, the smallest and largest subnormals, the smallest normal,
# 1, the largest finite (65504)
F16_SPECIAL = np.array([0x0000, 0x8000, 0x0001, 0x8001, 0x03FF, 0x0400, 0x3C00, 0x7BFF, 0xFBFF], np.uint16)


def finite_f16(rng, n: int) -> np.ndarray:
    """n finite f16 bit patterns: uniform over the bits (so every exponent, subnormals included, about
    equally often), with one in eight replaced by a special value."""
    bits = rng.integers(0, 1 << 16, size=n, dtype=np.uint16)
    bits = np.where((bits & 0x7C00) == 0x7C00, bits ^ 0x4000, bits)  # inf/NaN exponent → a finite one
    special = rng.random(n) < 1 / 8
    return np.where(special, rng.choice(F16_SPECIAL, size=n), bits).astype(np.uint16)


def random_rows(qtype, lead: tuple[int, ...], n_cols: int, rng) -> np.ndarray:
    """Random bytes (..., row_bytes) of whole blocks, the float fields made finite."""
    block, type_size = GGML_QUANT_SIZES[qtype]
    n_blocks = int(np.prod(lead)) * (n_cols // block)
    raw = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    if qtype == Q.F32:  # no inf/NaN: flip one exponent bit where all are set
        w = raw.view(np.uint32)
        w[:] = np.where((w & 0x7F800000) == 0x7F800000, w ^ 0x40000000, w)
    elif qtype == Q.BF16:
        h = raw.view(np.uint16)
        h[:] = np.where((h & 0x7F80) == 0x7F80, h ^ 0x4000, h)
    elif qtype == Q.F16:
        raw.view(np.uint16)[:] = finite_f16(rng, raw.size // 2).reshape(raw.shape[0], -1)
    else:
        for off in F16_FIELDS[qtype]:
            raw[:, off:off + 2] = finite_f16(rng, n_blocks).view(np.uint8).reshape(-1, 2)
    return raw.reshape(*lead, n_cols // block * type_size)


def n_cols_for(qtype, blocks_per_row: int) -> int:
    return GGML_QUANT_SIZES[qtype][0] * blocks_per_row


def assert_bits_equal(ours: torch.Tensor, ref: np.ndarray, what: str = "") -> None:
    """Same shape, and the same float32 bit patterns (so -0.0 vs 0.0 or a last-bit rounding difference
    fails, where allclose would pass)."""
    ref = np.ascontiguousarray(ref, dtype=np.float32)
    assert ours.dtype == torch.float32 and tuple(ours.shape) == ref.shape, (what, ours.dtype, ours.shape, ref.shape)
    a, b = ours.contiguous().numpy().view(np.int32), ref.view(np.int32)
    bad = np.argwhere(a != b)
    assert bad.size == 0, (f"{what}: {len(bad)} of {a.size} values differ, first at {tuple(bad[0])}: "
                           f"{ours.numpy()[tuple(bad[0])]!r} vs gguf-py {ref[tuple(bad[0])]!r}")


def reference(raw: np.ndarray, qtype) -> np.ndarray:
    return gguf.quants.dequantize(np.ascontiguousarray(raw), qtype)


# --- random blocks ---------------------------------------------------------------------------------------

def layouts(raw: np.ndarray, rng):
    """(name, torch input, the numpy rows it holds) for the ways a caller hands rows over."""
    t = torch.from_numpy(raw)
    yield "as is", t, raw
    idx = rng.integers(0, raw.shape[0], size=2 * raw.shape[0] + 1)  # a gathered subset, repeats included
    yield "gathered rows", t[torch.from_numpy(idx)], raw[idx]
    yield "every other row (a strided view)", t[::2], raw[::2]


SHAPES = {"one row": ((1,), 2), "many rows": ((37,), 3), "leading dims": ((2, 3, 5), 2)}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("qtype", ALL, ids=lambda t: t.name)
def test_random_blocks_bit_identical(qtype, shape):
    lead, blocks_per_row = SHAPES[shape]
    n_cols = n_cols_for(qtype, blocks_per_row * (8 if qtype in (Q.F32, Q.F16, Q.BF16) else 1))
    for seed in SEEDS:
        rng = np.random.default_rng([seed, int(qtype)])
        raw = random_rows(qtype, lead, n_cols, rng)
        before = raw.copy()
        flat = raw.reshape(-1, raw.shape[-1])
        for name, t, rows in layouts(flat, rng):
            got = dequantize(t, qtype, n_cols)
            assert_bits_equal(got, reference(rows, qtype), f"{qtype.name} seed {seed} {name}")
        # leading dims kept as given
        got = dequantize(torch.from_numpy(raw), qtype, n_cols)
        assert_bits_equal(got, reference(raw, qtype), f"{qtype.name} {shape}")
        assert np.array_equal(raw, before), "dequantize wrote into its input"


@pytest.mark.parametrize("qtype", [Q.F16, Q.BF16], ids=lambda t: t.name)
def test_every_16_bit_pattern(qtype):
    """All 65536 f16 / bf16 bit patterns, infinities and NaNs with their payloads included. One known
    difference: torch's f16 → f32 conversion (like x86's F16C) quiets a signaling NaN (f16 exponent all ones,
    top mantissa bit 0, payload nonzero: 1022 patterns); numpy keeps it signaling. Same sign and payload."""
    raw = np.arange(1 << 16, dtype=np.uint16).view(np.uint8).reshape(64, 2048)
    ours = dequantize(torch.from_numpy(raw), qtype, 1024).numpy().view(np.uint32).ravel()
    ref = reference(raw, qtype).view(np.uint32).ravel()
    h = np.arange(1 << 16, dtype=np.uint32)
    snan = ((h & 0x7C00) == 0x7C00) & ((h & 0x0200) == 0) & ((h & 0x03FF) != 0) if qtype == Q.F16 else h < 0
    assert np.array_equal(ours[~snan], ref[~snan])
    assert np.array_equal(ours[snan], ref[snan] | 0x00400000)  # the f32 quiet bit set, nothing else changed
    assert snan.sum() == (1022 if qtype == Q.F16 else 0)


@pytest.mark.parametrize("qtype", ALL, ids=lambda t: t.name)
def test_read_only_mmap_at_any_offset(qtype, tmp_path):
    """torch.frombuffer over a read-only mmap (what the training layer holds), at an aligned offset and an
    odd one (every multi-byte field then sits at an odd address)."""
    rng = np.random.default_rng(int(qtype))
    n_cols = n_cols_for(qtype, 2 if qtype in BLOCK_TYPES else 16)
    raw = random_rows(qtype, (9,), n_cols, rng)
    path = tmp_path / "rows.bin"
    for offset in (32, 3):
        path.write_bytes(b"\0" * offset + raw.tobytes())
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "The given buffer is not writable"
                t = torch.frombuffer(mm, dtype=torch.uint8, count=raw.size, offset=offset).view(raw.shape)
            out = dequantize(t, qtype, n_cols)
            out2 = dequantize(t[torch.tensor([8, 0, 8])], qtype, n_cols)
            del t
        assert_bits_equal(out, reference(raw, qtype), f"{qtype.name} offset {offset}")
        assert_bits_equal(out2, reference(raw[[8, 0, 8]], qtype), f"{qtype.name} offset {offset} gathered")


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
def test_chunked_fill(qtype, monkeypatch):
    """Big tensors are filled in chunks of blocks (not of rows): with a chunk of 3 blocks, boundaries fall
    inside rows and the last chunk is short; float32 output and the bf16 path through the scratch buffer."""
    import lora2gguf.weights.dequantize as module

    block = GGML_QUANT_SIZES[qtype][0]
    monkeypatch.setattr(module, "CPU_CHUNK", 3 * block)
    n_cols = n_cols_for(qtype, 4)
    raw = random_rows(qtype, (5,), n_cols, np.random.default_rng(int(qtype)))  # 20 blocks: 6 chunks + 2
    t = torch.from_numpy(raw)
    assert_bits_equal(dequantize(t, qtype, n_cols), reference(raw, qtype), qtype.name)
    monkeypatch.undo()
    whole = dequantize(t, qtype, n_cols)
    monkeypatch.setattr(module, "CPU_CHUNK", 3 * block)
    assert torch.equal(dequantize(t, qtype, n_cols, torch.bfloat16).view(torch.int16),
                       whole.to(torch.bfloat16).view(torch.int16))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("qtype", ALL, ids=lambda t: t.name)
def test_other_dtypes_are_the_float32_result_cast(qtype, dtype):
    rng = np.random.default_rng(int(qtype) + 100)
    n_cols = n_cols_for(qtype, 4 if qtype in BLOCK_TYPES else 64)
    raw = torch.from_numpy(random_rows(qtype, (6,), n_cols, rng))
    got = dequantize(raw, qtype, n_cols, dtype=dtype)
    want = dequantize(raw, qtype, n_cols).to(dtype)
    assert got.dtype == dtype and got.shape == want.shape
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))


@pytest.mark.parametrize("qtype", ALL, ids=lambda t: t.name)
def test_result_never_shares_the_inputs_memory(qtype):
    """Even where no arithmetic is needed (F32 → float32, BF16 → bfloat16): a caller may write into the
    result, and the input may be a read-only mmap."""
    n_cols = n_cols_for(qtype, 8)
    raw = torch.from_numpy(random_rows(qtype, (2,), n_cols, np.random.default_rng(5)))
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        out = dequantize(raw, qtype, n_cols, dtype=dtype)
        lo, hi = raw.data_ptr(), raw.data_ptr() + raw.numel()
        assert not (lo <= out.data_ptr() < hi), (qtype.name, dtype)


def test_a_fused_multiply_add_would_give_the_same_bits():
    """Why the result does not depend on FMA contraction (CPU vector code, CUDA): every product in these
    formats is exact in float32 (an f16 scale has 11 significant bits, a sub-block scale at most 8, a value
    at most 6: 11+6+5 = 22 bits for Q5_K's d*sc*q, within float32's 24), so only the final add or subtract
    rounds, once, fused or not. Checked here on random Q4_1 and Q4_K blocks: the value rounded once from the
    exact float64 expression equals gguf-py's two-rounding result. We still use separate ops, like gguf-py."""
    rng = np.random.default_rng(0)
    raw = random_rows(Q.Q4_1, (64,), 256, rng).reshape(-1, 20)
    d, m = (raw[:, o:o + 2].copy().view(np.float16).astype(np.float64) for o in (0, 2))
    q = (raw[:, 4:].reshape(-1, 1, 16) >> np.array([0, 4], np.uint8).reshape(1, 2, 1)) & 0x0F
    once = (d * q.reshape(-1, 32) + m).astype(np.float32)
    assert_bits_equal(torch.from_numpy(once), reference(raw, Q.Q4_1), "Q4_1 rounded once")

    raw = random_rows(Q.Q4_K, (64,), 256, rng).reshape(-1, 144)
    d, dmin = (raw[:, o:o + 2].copy().view(np.float16).astype(np.float64) for o in (0, 2))
    sc, mn = gguf.quants.Q4_K.get_scale_min(raw[:, 4:16])
    q = (raw[:, 16:].reshape(-1, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & 0x0F
    dl, dm = (d * sc).reshape(-1, 8, 1), (dmin * mn).reshape(-1, 8, 1)
    once = (dl * q.reshape(-1, 8, 32) - dm).astype(np.float32).reshape(-1, 256)
    assert_bits_equal(torch.from_numpy(once), reference(raw, Q.Q4_K), "Q4_K rounded once")


# --- real quantizations -----------------------------------------------------------------------------------

def test_gguf_py_quantizations():
    """gguf-py's own quantizers (round-to-nearest, the llama.cpp reference algorithms for these types) on
    random floats with per-row magnitudes from 1e-4 to 1e2."""
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((24, 512)) * np.exp(rng.uniform(-9, 5, size=(24, 1)))).astype(np.float32)
    x[3] = 0.0  # an all-zero row: d = 0
    for qtype in (Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0):
        raw = np.ascontiguousarray(gguf.quants.quantize(x, qtype)).view(np.uint8)
        assert_bits_equal(dequantize(torch.from_numpy(raw), qtype, 512), reference(raw, qtype), qtype.name)


class _Traits(ctypes.Structure):  # struct ggml_type_traits (ggml.h)
    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64), ("blck_size_interleave", ctypes.c_int64),
                ("type_size", ctypes.c_size_t), ("is_quantized", ctypes.c_bool),
                ("to_float", ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)),
                ("from_float_ref", ctypes.c_void_p)]


@pytest.fixture(scope="module")
def ggml():
    """llama.cpp's ggml library as llama-cpp-python ships it: ggml_quantize_chunk (llama-quantize's code for
    each tensor) and each type's to_float (llama.cpp's dequantizer)."""
    spec = importlib.util.find_spec("llama_cpp")
    libs = sorted((Path(spec.origin).parent / "lib").glob("libggml-base.*")) if spec else []
    if not libs:
        pytest.skip("llama-cpp-python's libggml-base is not installed")
    lib = ctypes.CDLL(str(libs[0]))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_Traits)
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    return lib


@pytest.mark.parametrize("qtype", [t for t in ALL if t != Q.F32], ids=lambda t: t.name)
def test_llama_cpp_quantizations(ggml, qtype):
    """llama.cpp quantizes random floats (per-row magnitudes 1e-4..1e2, a zero row, outliers); ours equals
    gguf-py and llama.cpp's own dequantizer, bit for bit."""
    traits = ggml.ggml_get_type_traits(int(qtype)).contents
    block, type_size = GGML_QUANT_SIZES[qtype]
    assert (traits.type_name.decode().upper(), traits.blck_size, traits.type_size) == (qtype.name, block, type_size)
    rng = np.random.default_rng(int(qtype))
    rows, n_cols = 32, 1024
    x = (rng.standard_normal((rows, n_cols)) * np.exp(rng.uniform(-9, 5, size=(rows, 1)))).astype(np.float32)
    x[5] = 0.0
    x[6, ::97] *= 1000.0
    raw = np.empty((rows, n_cols // block * type_size), np.uint8)
    assert ggml.ggml_quantize_chunk(int(qtype), x.ctypes.data, raw.ctypes.data, 0, rows, n_cols, None) == raw.nbytes
    ours = dequantize(torch.from_numpy(raw), qtype, n_cols)
    assert_bits_equal(ours, reference(raw, qtype), f"{qtype.name} vs gguf-py")
    theirs = np.empty((rows, n_cols), np.float32)
    traits.to_float(raw.ctypes.data, theirs.ctypes.data, rows * n_cols)
    assert_bits_equal(ours, theirs, f"{qtype.name} vs llama.cpp's to_float")


def gguf_tensors_bit_identical(path: Path, chunk_rows: int = 4096) -> set:
    """Dequantize every tensor of a GGUF file (in row chunks, to bound memory) and compare with gguf-py.
    Returns the types seen."""
    seen = set()
    with GGUFFile(path) as f, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "The given NumPy array is not writable"
        for info in f.tensors.values():
            n_cols = info.shape[-1]
            rows = f.raw(info.name).reshape(info.n_elements // n_cols, -1)
            t = torch.from_numpy(rows)  # over the read-only mmap
            for i in range(0, rows.shape[0], chunk_rows):
                assert_bits_equal(dequantize(t[i:i + chunk_rows], info.type, n_cols),
                                  reference(rows[i:i + chunk_rows], info.type), f"{path.name} {info.name}")
            seen.add(info.type)
    return seen


def test_fixture_files():
    """Every tensor of every fixture GGUF (llama.cpp's F16, Q8_0 and Q4_K_M mixes: F32, F16, Q8_0, Q5_0,
    Q4_K, Q6_K)."""
    seen = set()
    for arch in ARCHS:
        for kind in ("f16", "q8_0", "q4_k_m"):
            seen |= gguf_tensors_bit_identical(fixture(arch, kind))
    assert seen == {Q.F32, Q.F16, Q.Q8_0, Q.Q5_0, Q.Q4_K, Q.Q6_K}


@pytest.mark.slow
def test_gemma3_q4_k_m_every_tensor(gemma3_q4):
    assert gguf_tensors_bit_identical(gemma3_q4) == {Q.F32, Q.Q8_0, Q.Q5_0, Q.Q4_K, Q.Q6_K}


@pytest.mark.slow
def test_smollm2_q4_1_every_tensor():
    from lora2gguf.weights.real_models import smollm2_gguf

    assert gguf_tensors_bit_identical(smollm2_gguf()) == {Q.F32, Q.Q8_0, Q.Q4_1}


# --- refusals ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("qtype", [Q.IQ4_NL, Q.IQ2_XXS, Q.TQ1_0, Q.MXFP4, Q.Q8_1], ids=lambda t: t.name)
def test_unsupported_type_is_one_clear_line(qtype):
    block, type_size = GGML_QUANT_SIZES[qtype]
    with pytest.raises(Lora2GGUFError) as e:
        dequantize(torch.zeros((2, type_size), dtype=torch.uint8), qtype, block)
    msg = str(e.value)
    assert "\n" not in msg and qtype.name in msg and "llama-quantize" in msg and "--base-weights resident" in msg
    assert qtype not in SUPPORTED


def test_unknown_type_number():
    with pytest.raises(Lora2GGUFError, match="unknown GGML tensor type 9999"):
        dequantize(torch.zeros((1, 18), dtype=torch.uint8), 9999, 32)


def test_supported_set():
    assert SUPPORTED == {Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0,
                         Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K}


@pytest.mark.parametrize("bad", ["row bytes", "partial block", "dtype"])
def test_wrong_shapes_are_refused(bad):
    raw = torch.zeros((2, 144), dtype=torch.uint8)
    n_cols = 256
    if bad == "row bytes":
        raw = raw[:, :140]
    elif bad == "partial block":
        n_cols = 255
    else:
        raw = raw.to(torch.int8)
    with pytest.raises(ValueError):
        dequantize(raw, Q.Q4_K, n_cols)


def test_integer_type_id_and_empty_input():
    raw = torch.from_numpy(random_rows(Q.Q6_K, (3,), 256, np.random.default_rng(0)))
    assert torch.equal(dequantize(raw, int(Q.Q6_K), 256), dequantize(raw, Q.Q6_K, 256))
    empty = dequantize(torch.zeros((0, 4, 210), dtype=torch.uint8), Q.Q6_K, 256)
    assert empty.shape == (0, 4, 256) and empty.dtype == torch.float32


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
def test_into_a_reused_buffer_and_without_ggml(qtype, monkeypatch):
    """`out=`: the values land in the caller's buffer (the same bits); the torch ops ggml's conversion stands
    in for on the CPU give the same bits too (fileio.ggml_dequantize unavailable)."""
    import lora2gguf.weights.dequantize as dq

    rng = np.random.default_rng(7)
    raw = torch.from_numpy(random_rows(qtype, (37,), n_cols_for(qtype, 3), rng))
    n_cols = n_cols_for(qtype, 3)
    want = reference(raw.numpy(), qtype)
    buf = torch.full((37 * n_cols,), float("nan"))
    got = dequantize(raw, qtype, n_cols, out=buf)
    assert got.data_ptr() == buf.data_ptr()
    assert_bits_equal(got, want, "into out")
    monkeypatch.setattr(dq, "to_float", lambda *a, **k: None)
    assert_bits_equal(dequantize(raw, qtype, n_cols), want, "torch ops")
    with pytest.raises(ValueError, match="out must be"):
        dequantize(raw, qtype, n_cols, out=torch.empty(5))
