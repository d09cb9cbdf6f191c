"""Quant blocks → float32 with ggml's own conversion (the `to_float` of a type's traits in libggml-base, the
library llama-cpp-python ships), for every reader of GGUF tensor data.

Why not gguf-py's `gguf.quants.dequantize` alone: it is numpy over every block, 3× (Q6_K) to 100× (Q8_0)
slower than ggml's C loop here (SmolLM2's Q8_0 embedding 2.73 s vs 0.026 s, Gemma 3's 11.4 s vs 0.16 s;
`scripts/bench_dequantize.py --gguf`), and a base is dequantized on every train, verify and merge. The values
are the same bits: tests/fileio/test_ggml_dequantize.py checks llama.cpp's quantizations of every type both
read and the fixtures, tests/weights/test_dequantize.py the real models (slow); gguf-py stays the fallback
for a type ggml has no conversion for, and when the library cannot be found.

The library is found where llama-cpp-python loads it (its package's lib/, or LLAMA_CPP_LIB_PATH) without
importing llama_cpp (~0.1 s that convert and inspect do not need), and loaded on the first quantized tensor,
by the name libllama links it under: one copy of ggml in the process (tests/fileio/test_ggml_dequantize.py).
llamacpp.ggml declares its quantizer's functions on this same handle."""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType


class _TypeTraits(ctypes.Structure):  # struct ggml_type_traits (ggml.h)
    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64),
                ("blck_size_interleave", ctypes.c_int64), ("type_size", ctypes.c_size_t),
                ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p), ("from_float_ref", ctypes.c_void_p)]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


def _lib_dir() -> Path | None:
    override = os.environ.get("LLAMA_CPP_LIB_PATH")  # llama_cpp/llama_cpp.py reads the same variable
    if override:
        return Path(override)
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "lib"


@functools.lru_cache(maxsize=None)
def ggml_base() -> ctypes.CDLL | None:
    """libggml-base, by the names llama_cpp._ctypes_extensions.load_shared_library tries; None if absent."""
    d = _lib_dir()
    if d is None:
        return None
    names = {"win32": ["ggml-base.dll", "libggml-base.dll"], "darwin": ["libggml-base.so", "libggml-base.dylib"]}
    # Linux: a wheel holds libggml-base.so, .so.0 and .so.0.x.y as three copies of one file, and libllama
    # links the soname (.so.0). Loading that one shares libllama's ggml; loading libggml-base.so by its name
    # (as llama_cpp's loader would) maps a second copy with its own global state.
    sonames = sorted((p.name for p in d.glob("libggml-base.so.[0-9]*")), key=len) if d.is_dir() else []
    for name in names.get(sys.platform, sonames[:1] + ["libggml-base.so"]):
        if (d / name).exists():
            lib = ctypes.CDLL(str(d / name))
            lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
            lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
            return lib
    return None


@functools.lru_cache(maxsize=None)
def _to_float(qtype: GGMLQuantizationType):
    lib = ggml_base()
    if lib is None:
        return None
    fn = lib.ggml_get_type_traits(int(qtype)).contents.to_float
    return _TO_FLOAT(fn) if fn else None


def to_float(raw: np.ndarray, qtype: GGMLQuantizationType, out: np.ndarray | None = None,
             threads: int = 1) -> np.ndarray | None:
    """The float32 values (flat) of whole blocks of `qtype`, converted by ggml, into `out` if given (a flat
    float32 array of the right size: a reused buffer spares the page faults of fresh memory, most of the time
    for a large result); with threads > 1 split into that many runs of blocks converted side by side (ctypes
    releases the GIL). None where ggml has no conversion for the type (or the library is missing): the
    caller falls back to gguf-py."""
    fn = _to_float(qtype)
    if fn is None:
        return None
    raw = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    block, size = GGML_QUANT_SIZES[qtype]
    if raw.size % size:
        raise ValueError(f"{raw.size} bytes are not whole {qtype.name} blocks of {size} bytes")
    n_blocks = raw.size // size
    if out is None:
        out = np.empty(n_blocks * block, np.float32)
    elif out.dtype != np.float32 or out.size != n_blocks * block or not out.flags.c_contiguous:
        raise ValueError(f"out must be {n_blocks * block} contiguous float32 values")
    src, dst = raw.ctypes.data, out.ctypes.data
    cuts = [n_blocks * k // threads for k in range(threads + 1)] if threads > 1 and n_blocks >= 2 * threads else [0, n_blocks]
    if len(cuts) == 2:
        fn(src, dst, n_blocks * block)
    else:
        jobs = [_pool(threads).submit(fn, src + a * size, dst + 4 * a * block, (b - a) * block)
                for a, b in zip(cuts, cuts[1:])]
        for j in jobs:
            j.result()
    return out.reshape(-1)


@functools.lru_cache(maxsize=None)
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="to_float")
