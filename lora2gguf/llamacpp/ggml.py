"""llama.cpp's quantizer, tensor by tensor in this process: a quantized GGUF written from float32 rows, with
no intermediate model file, byte-identical to what `llama_model_quantize` writes from that model.

`llama_model_quantize` (llamacpp.quantize.llama_quantize) needs its input as a file: for a merge that is a copy of
the base with the merged tensors in F32 (~29 GB extra for an all-linear adapter on an 8B model). This module
does what llama-quant.cpp's main loop does, with the input given as a list of `Tensor`s instead (name,
shape, the type the tensor would have in that input file, and callbacks that produce its float32 rows or
its stored bytes a chunk at a time):

- Per-tensor target types come from llama.cpp itself: `llama_model_quantize` with `dry_run` (no file is
  written) on a *probe*, a GGUF with the input's metadata and tensor list whose shapes keep what type
  selection reads (ne[0], how many dimensions, ne[2] > 1) but whose other dimensions are cut to at most 2:
  a few KB of data instead of the model. Its log gives the order of the tensors (llama.cpp's loader
  sorts them by layer, then name) and each one's target type, fallbacks for odd shapes included. Why not
  `llama_quant_compute_types` (src/llama-ext.h): its symbols are C++-mangled, and the mock model it
  quantizes for (`llama_quant_model_from_metadata`) infers LLM_TYPE_70B only for llama, where the real
  loader sets it for qwen2/olmo/deci 80-layer models too (q3_k/q4_k attn_v then becomes Q5_K); the dry
  run goes through the same loader and `llama_tensor_get_type` as the real run.
- The header is built with ggml's own gguf API, as llama-quant.cpp does: the input's key-values copied
  (`gguf_set_kv`), general.quantization_version and general.file_type set, split keys removed, tensors
  added in the loader's order with their new types. Its offsets and padding are the ones llama.cpp writes.
- Tensor data: a tensor whose target type is its input type is copied as is; the others are quantized
  with `ggml_quantize_chunk` in row chunks on a thread pool (ctypes releases the GIL; rows are
  independent without an importance matrix, so the bytes do not depend on the chunking or the threads)
  and checked with `ggml_validate_row_data`, as llama.cpp checks its input and output.

These C functions have no Python binding (llama-cpp-python binds llama.h, not gguf.h or ggml's quantizer;
gguf-py writes GGUF but quantizes no K-quants), so they are declared here through ctypes, from the
libraries llama-cpp-python ships (libllama, libggml-base: one copy of ggml in the process).

Importance matrix (`Importance`): what `llama-quantize --imatrix FILE` hands llama_model_quantize, passed to
the dry run too (llama.cpp picks some types differently when it has one) and to ggml_quantize_chunk per
expert slice; the quantize.imatrix.* keys it records are set in the header. The types that need one
(IQ1/IQ2, IQ3_XXS, Q2_K_S's Q2_K tensors) are refused without it, as llama.cpp refuses them. The IQ types
that only need ggml's lookup tables (iq3_s/iq3_m/iq4_nl/iq4_xs) need none: `ggml_quantize_chunk`
initialises those tables itself.

What stays with `llamacpp.quantize.llama_quantize` (llama_model_quantize in a child process): quantizing a
whole file as is (file in, file out), and merge's `intermediate=True`, the path this module replaces and is
tested against.

Interrupts: the C calls are short (a chunk of rows each) and run on worker threads while the main thread
waits on them in Python, so Ctrl-C / SIGTERM stop a write within one chunk; the caller's atomic_output
removes the partial file.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import functools
import hashlib
import os
import re
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import llama_cpp
import numpy as np
from gguf import GGML_QUANT_SIZES, GGML_QUANT_VERSION, GGMLQuantizationType, GGUFWriter, LlamaFileType

from lora2gguf.errors import Lora2GGUFError
from lora2gguf.fileio.atomic import atomic_output
from lora2gguf.fileio.ggml_dequantize import ggml_base, to_float
from lora2gguf.fileio.gguf_read import GGUFFile, file_identity, pread, row_bytes
from lora2gguf.fileio.gguf_write import PlannedTensor, f32_copy_writer, nbytes_of, write_streaming
from lora2gguf.fileio.imatrix import Imatrix, read_imatrix

F32, F16 = GGMLQuantizationType.F32, GGMLQuantizationType.F16
ALIGN = 32  # GGUF_DEFAULT_ALIGNMENT: llama-quant.cpp pads every tensor's data to it
TASK_ELEMENTS = 1 << 18  # float32 elements per quantization task (1 MB in)
SLAB_BYTES = 1 << 24  # bytes per read of a stored tensor (copies, dequantization)


@dataclass
class Tensor:
    """One tensor of the model llama.cpp would read: its GGUF name, shape (numpy order: ggml ne reversed), the
    type it has in that input, `rows()` its values as float32 arrays of whole rows (n, ne[0]), in order, a
    chunk at a time (what llama.cpp dequantizes the input to), and `raw()` its stored bytes in order, a chunk
    at a time (copied when the target type is the input type). raw may be None for F32/F16 inputs: the bytes
    are then the rows in that type."""

    name: str
    shape: tuple[int, ...]
    type: GGMLQuantizationType
    rows: Callable[[], Iterable[np.ndarray]]
    raw: Callable[[], Iterable[np.ndarray]] | None = None
    origin: tuple | None = None  # (fileio file_identity, name) when rows() is that stored tensor as it is

    @property
    def n_rows(self) -> int:
        return int(np.prod(self.shape[:-1], dtype=np.int64))

    def stored(self) -> Iterator[np.ndarray]:
        if self.raw is not None:
            return iter(self.raw())
        if self.type not in (F32, F16):
            raise AssertionError(f"{self.name}: a {self.type.name} tensor needs raw()")
        dt = np.float32 if self.type == F32 else np.float16
        return (np.ascontiguousarray(r).astype(dt, copy=False) for r in self.rows())


@dataclass
class Importance:
    """An importance matrix as llama-quantize hands it to llama_model_quantize: per weight the float32 array
    that ggml_quantize_chunk weighs each column's error by (n_expert·ne0 values, expert-major; from
    fileio.imatrix.Imatrix.importance()), and what it records in the output: the file as named on its
    command line, the first dataset, the number of entries and of chunks."""

    values: dict[str, np.ndarray]
    file: str
    dataset: str | None = None
    chunks: int = 0

    @classmethod
    def of(cls, file: str | os.PathLike, im: Imatrix | None = None) -> Importance:
        """What `llama-quantize --imatrix FILE` hands llama.cpp (FILE as typed; `im`: its contents, if read)."""
        im = im if im is not None else read_imatrix(file)
        return cls(im.importance(), str(file), im.datasets[0] if im.datasets else None, im.chunk_count)

    def key_values(self) -> list[tuple[str, str | int]]:
        """The quantize.imatrix.* keys, in llama-quantize's order (strings cut to its 127-byte buffer)."""
        cut = lambda v: v.encode()[:127].decode(errors="ignore")  # noqa: E731
        kv = [("quantize.imatrix.file", cut(self.file))]
        if self.dataset is not None:
            kv.append(("quantize.imatrix.dataset", cut(self.dataset)))
        kv.append(("quantize.imatrix.entries_count", len(self.values)))
        if self.chunks > 0:
            kv.append(("quantize.imatrix.chunks_count", self.chunks))
        return kv

    def c_array(self):
        """llama_model_quantize_params.imatrix: a {name, data, size} array ending in a NULL name (it points
        into `values`, which must outlive it)."""
        items = [llama_cpp.llama_model_imatrix_data(n.encode(), v.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                                                    v.size) for n, v in self.values.items()]
        items.append(llama_cpp.llama_model_imatrix_data(None, None, 0))
        return (llama_cpp.llama_model_imatrix_data * len(items))(*items)

    def for_tensor(self, t: Tensor) -> np.ndarray | None:
        """This tensor's array, checked as llama-quant.cpp checks it: n_expert·ne0 values (a size mismatch is
        an error, except on token_embd, quantized without), none for a weight the matrix lacks."""
        v = self.values.get(t.name)
        n_expert = t.shape[-3] if len(t.shape) >= 3 else 1
        if v is not None and v.size != t.shape[-1] * n_expert:
            if t.name in TOKEN_EMBD:
                return None
            raise Lora2GGUFError(f"tensor {t.name}: the importance matrix has {v.size} values for it, the tensor "
                                 f"needs {t.shape[-1] * n_expert}; it was computed on another model")
        return v


# tensor_name_match_token_embd / _output_weight and tensor_requires_imatrix in llama-quant.cpp: the types whose
# quantization without an importance matrix llama.cpp refuses ("the result will be garbage")
TOKEN_EMBD = ("token_embd.weight", "per_layer_token_embd.weight")
_NEEDS_IMATRIX = {GGMLQuantizationType.IQ3_XXS, GGMLQuantizationType.IQ2_XXS, GGMLQuantizationType.IQ2_XS,
                  GGMLQuantizationType.IQ2_S, GGMLQuantizationType.IQ1_M, GGMLQuantizationType.IQ1_S}


def requires_imatrix(name: str, new: GGMLQuantizationType, ftype: LlamaFileType) -> bool:
    if name in TOKEN_EMBD or name == "output.weight":
        return False
    return new in _NEEDS_IMATRIX or (new == GGMLQuantizationType.Q2_K and ftype == LlamaFileType.MOSTLY_Q2_K_S)


# -- quantizations reused within a process ------------------------------------------------------------

@dataclass
class _Reused:
    kept: dict  # (origin, target type, importance digest) → the tensor's quantized bytes
    left: int  # bytes that may still be kept


_REUSE: _Reused | None = None  # while reuse_quantizations is on


@contextlib.contextmanager
def reuse_quantizations(max_bytes: int = 512 << 20):
    """Within this block, a tensor read unchanged from a file and quantized again to the same type with the
    same importance values is not quantized again: its bytes are the ones this process computed the first
    time (ggml quantizes row by row, so they are the same bytes). For a merge followed by its verify: the
    floor's base quantized with the merge's importance matrix shares every tensor the adapter leaves alone
    with the merged file. At most max_bytes are kept; the first write of each tensor fills them. Nested
    blocks share the outer one's."""
    global _REUSE
    outer = _REUSE
    _REUSE = outer or _Reused({}, max_bytes)
    try:
        yield
    finally:
        _REUSE = outer


def _reuse_key(t: Tensor, new: GGMLQuantizationType, importance: np.ndarray | None) -> tuple | None:
    if _REUSE is None or t.origin is None:
        return None
    digest = None if importance is None else hashlib.blake2b(np.ascontiguousarray(importance).tobytes()).digest()
    return t.origin, int(new), digest


# -- the C functions ------------------------------------------------------------------------------

class _GGMLInitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


class _GGUFInitParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]


@functools.lru_cache(maxsize=None)
def _libs():
    """(libllama, libggml-base) with the signatures used here."""
    llama = llama_cpp.llama_cpp._lib
    g = ggml_base()  # the copy libllama links (one ggml in the process)
    if g is None:
        raise Lora2GGUFError("llama-cpp-python's libggml-base was not found next to libllama; reinstall it")
    vp, sz, i64, cp = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int64, ctypes.c_char_p
    sigs = {
        "ggml_init": (vp, [_GGMLInitParams]), "ggml_free": (None, [vp]), "ggml_tensor_overhead": (sz, []),
        "ggml_new_tensor": (vp, [vp, ctypes.c_int, ctypes.c_int, ctypes.POINTER(i64)]),
        "ggml_set_name": (vp, [vp, cp]), "ggml_row_size": (sz, [ctypes.c_int, i64]),
        "ggml_type_name": (cp, [ctypes.c_int]),
        "ggml_quantize_chunk": (sz, [ctypes.c_int, vp, vp, i64, i64, i64, vp]),
        "ggml_quantize_requires_imatrix": (ctypes.c_bool, [ctypes.c_int]),
        "ggml_validate_row_data": (ctypes.c_bool, [ctypes.c_int, vp, sz]),
        "gguf_init_empty": (vp, []), "gguf_init_from_file": (vp, [cp, _GGUFInitParams]), "gguf_free": (None, [vp]),
        "gguf_set_kv": (None, [vp, vp]), "gguf_set_val_u32": (None, [vp, cp, ctypes.c_uint32]),
        "gguf_set_val_str": (None, [vp, cp, cp]),
        "gguf_remove_key": (i64, [vp, cp]), "gguf_add_tensor": (None, [vp, vp]),
        "gguf_get_meta_size": (sz, [vp]), "gguf_get_meta_data": (None, [vp, vp]),
        "gguf_get_n_tensors": (i64, [vp]), "gguf_get_tensor_offset": (sz, [vp, i64]),
        "gguf_get_tensor_size": (sz, [vp, i64]), "gguf_get_tensor_name": (cp, [vp, i64]),
        "gguf_get_alignment": (sz, [vp]),
    }
    for name, (res, args) in sigs.items():
        f = getattr(g, name)
        f.restype, f.argtypes = res, args
    return llama, g


@functools.lru_cache(maxsize=None)
def _type_by_ggml_name() -> dict[str, GGMLQuantizationType]:
    _, g = _libs()
    return {g.ggml_type_name(int(t)).decode(): t for t in GGMLQuantizationType}


def _ptr(a: np.ndarray) -> int:
    return a.ctypes.data


def dequantize_rows(raw: np.ndarray, qtype: GGMLQuantizationType, ne0: int) -> np.ndarray:
    """float32 rows (n, ne0) from stored bytes of whole rows, with ggml's own conversion (the `to_float` of
    its type traits, what llama.cpp's quantizer uses on a quantized or F16/BF16 input)."""
    raw = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    if qtype == F32:
        return raw.view(np.float32).reshape(-1, ne0)
    out = to_float(raw, qtype)
    if out is None:
        raise Lora2GGUFError(f"ggml cannot convert {qtype.name} to float")
    return out.reshape(-1, ne0)


# -- target types: llama.cpp's dry run ------------------------------------------------------------

_LINE = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]\s+(\S+)\s+- \[[^\]]*\], type =\s*(\S+), size = [^(]*(?:\((\S+)\))?\s*$")


@contextlib.contextmanager
def _llama_log(sink: Callable[[str], None]):
    """Route llama.cpp's (and ggml's) log to sink for the duration, then give back whatever callback was set
    (llama-cpp-python's). The callback is process-wide: what llama.cpp logs meanwhile from another thread
    goes to sink too (the dry run's parser only takes its own tensor lines, checked one by one)."""
    lib = llama_cpp.llama_cpp._lib
    get, put = lib["llama_log_get"], lib["llama_log_set"]  # fresh function objects: our own argtypes
    get.argtypes, get.restype = [ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_void_p)], None
    put.argtypes, put.restype = [ctypes.c_void_p, ctypes.c_void_p], None
    old_cb, old_ud = ctypes.c_void_p(), ctypes.c_void_p()
    get(ctypes.byref(old_cb), ctypes.byref(old_ud))

    @llama_cpp.llama_log_callback
    def cb(level, text, user_data):
        sink(text.decode("utf-8", errors="replace"))

    put(ctypes.cast(cb, ctypes.c_void_p), None)
    try:
        yield
    finally:
        put(old_cb, old_ud)


_DRY_RUN_LOCK = threading.Lock()


def llama_target_types(model: str | os.PathLike, ftype: LlamaFileType, verbose: bool = False,
                       imatrix: Importance | None = None) -> list[tuple[str, GGMLQuantizationType | None]]:
    """(name, target type) for every tensor of a GGUF model, in the order llama_model_quantize writes them,
    from its own dry run (no output file). The type is None where llama.cpp keeps the input's type. With an
    importance matrix the choice changes for some types (llama-quant.cpp's has_imatrix): it is passed too."""
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype, p.dry_run, p.allow_requantize, p.nthread = int(ftype), True, True, 1
    keep = imatrix.c_array() if imatrix is not None else None
    if keep is not None:
        p.imatrix = keep
    text: list[str] = []
    with _DRY_RUN_LOCK, _llama_log(text.append):
        rc = llama_cpp.llama_model_quantize(os.fsencode(model), os.fsencode(os.devnull), ctypes.byref(p))
    log = "".join(text)
    if verbose:
        sys.stderr.write(log)
    lines = log.splitlines()
    if rc != 0:
        why = next((ln.strip() for ln in reversed(lines) if "failed" in ln or "error" in ln.lower()),
                   f"status {rc}")
        raise Lora2GGUFError(f"llama.cpp cannot quantize this model to {LlamaFileType(ftype).name} ({why})")
    if any("will require an imatrix" in ln for ln in lines):
        raise Lora2GGUFError(f"{LlamaFileType(ftype).name}: llama.cpp needs an importance matrix for this type "
                             "(--imatrix FILE or --imatrix-data DATA)")
    names = _type_by_ggml_name()
    out, total = [], None
    for ln in lines:
        m = _LINE.match(ln)
        if not m:
            continue
        i, n, name, _, new = int(m[1]), int(m[2]), m[3], m[4], m[5]
        if i != len(out) + 1 or (total is not None and n != total):
            raise Lora2GGUFError(f"unexpected llama.cpp quantizer log line: {ln!r}")
        total = n
        out.append((name, names[new] if new else None))
    if total is None or len(out) != total:
        raise Lora2GGUFError(f"llama.cpp's dry run listed {len(out)} of {total} tensors; cannot tell the types")
    return out


def _probe_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Keep ne[0] and which dimensions are > 1 (ggml_n_dims, ne[2] > 1: all llama.cpp's type choice reads of
    a shape), cut the other dimensions to at most 2."""
    return tuple(min(d, 2) for d in shape[:-1]) + (shape[-1],)


def _write_probe(path: Path, writer: GGUFWriter, tensors: list[Tensor]) -> None:
    plan = [PlannedTensor(t.name, s, t.type, nbytes_of(s, t.type)) for t in tensors for s in [_probe_shape(t.shape)]]

    def zeros():
        for p in plan:
            yield np.zeros(p.shape, np.float32) if p.type == F32 else (
                np.zeros(p.shape, np.float16) if p.type == F16 else np.zeros(p.nbytes, np.uint8))

    write_streaming(path, writer, plan, zeros())


# -- the writer -----------------------------------------------------------------------------------

class _GGUF:
    """A gguf_context (and a ggml context for the tensor descriptors), freed on exit."""
    def __init__(self):
        self.g = _libs()[1]
        self.ctx = self.g.gguf_init_empty()
        self.ggml = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.ggml:
            self.g.ggml_free(self.ggml)
        self.g.gguf_free(self.ctx)


def _header(kv_file: Path, ftype: LlamaFileType, order: list[tuple[Tensor, GGMLQuantizationType]],
            overrides: list[tuple[str, str | int]] = ()) -> bytes:
    """llama-quant.cpp's output header: the input's key-values, then general.quantization_version and
    general.file_type (set: moved to the end), split keys removed, then the overrides (llama-quantize's
    quantize.imatrix.* keys: strings, integers as u32); tensors in order with their new types."""
    with _GGUF() as out:
        g = out.g
        src = g.gguf_init_from_file(os.fsencode(kv_file), _GGUFInitParams(True, None))
        if not src:
            raise Lora2GGUFError(f"{kv_file}: ggml cannot read this GGUF header")
        try:
            g.gguf_set_kv(out.ctx, src)
        finally:
            g.gguf_free(src)
        g.gguf_set_val_u32(out.ctx, b"general.quantization_version", GGML_QUANT_VERSION)
        g.gguf_set_val_u32(out.ctx, b"general.file_type", int(ftype))
        for key in (b"split.no", b"split.count", b"split.tensors.count"):
            g.gguf_remove_key(out.ctx, key)
        for key, value in overrides:
            if isinstance(value, str):
                g.gguf_set_val_str(out.ctx, key.encode(), value.encode())
            else:
                g.gguf_set_val_u32(out.ctx, key.encode(), abs(int(value)))
        out.ggml = g.ggml_init(_GGMLInitParams(len(order) * g.ggml_tensor_overhead() + 1024, None, True))
        if not out.ggml:
            raise MemoryError("ggml_init")
        for t, new in order:  # ggml asserts (aborts the process) on what is checked here first
            ne = list(reversed(t.shape))
            if len(t.name.encode()) >= 64 or not 1 <= len(ne) <= 4 or ne[0] % GGML_QUANT_SIZES[new][0]:
                raise Lora2GGUFError(f"tensor {t.name}: shape {t.shape} / name cannot be a {new.name} ggml tensor")
            tensor = g.ggml_new_tensor(out.ggml, int(new), len(ne), (ctypes.c_int64 * len(ne))(*ne))
            g.ggml_set_name(tensor, t.name.encode())
            g.gguf_add_tensor(out.ctx, tensor)
        if g.gguf_get_alignment(out.ctx) != ALIGN:
            raise Lora2GGUFError(f"{kv_file}: GGUF alignment {g.gguf_get_alignment(out.ctx)}, llama.cpp's quantizer "
                                 f"pads to {ALIGN}")
        meta = ctypes.create_string_buffer(g.gguf_get_meta_size(out.ctx))
        g.gguf_get_meta_data(out.ctx, meta)
        offsets = [g.gguf_get_tensor_offset(out.ctx, i) for i in range(len(order))]
    pos = 0
    for (t, new), off in zip(order, offsets):  # where our writes will land: the offsets in the header
        if off != pos:
            raise AssertionError(f"{t.name}: header offset {off}, data written at {pos}")
        n = t.n_rows * row_bytes(new, t.shape[-1])
        pos += n + (-n % ALIGN)
    return meta.raw


def _quantize_task(qtype: GGMLQuantizationType, rows: np.ndarray, name: str,
                   importance: np.ndarray | None = None) -> np.ndarray:
    """ggml_quantize_chunk over these rows (of one expert: `importance` is that expert's ne0 values), input
    and output validated like llama.cpp does."""
    _, g = _libs()
    n, ne0 = rows.shape
    if not g.ggml_validate_row_data(int(F32), _ptr(rows), rows.nbytes):
        raise Lora2GGUFError(f"tensor {name}: the values to quantize are not finite (NaN or infinity)")
    out = np.empty(n * g.ggml_row_size(int(qtype), ne0), np.uint8)
    size = g.ggml_quantize_chunk(int(qtype), _ptr(rows), _ptr(out), 0, n, ne0,
                                 None if importance is None else _ptr(importance))
    if size != out.size or not g.ggml_validate_row_data(int(qtype), _ptr(out), size):
        raise Lora2GGUFError(f"tensor {name}: quantized {qtype.name} data failed ggml's validation")
    return out


def write_quantized(out: str | os.PathLike, ftype: LlamaFileType, kv: GGUFWriter | str | os.PathLike,
                    tensors: list[Tensor], threads: int | None = None,
                    progress: Callable[[Tensor], None] | None = None, verbose: bool = False,
                    imatrix: Importance | None = None) -> None:
    """Write `out` as llama_model_quantize(input, out, ftype) would, where the input is the model with the
    key-values of `kv` and these tensors, and never exists as a file: `kv` is a GGUFWriter carrying them (it
    is used, then closed) or the path of a GGUF file whose key-values they are (the input file itself, when
    it exists). `out` is written in place (give it a temp path: atomic_output). A few KB of probe file
    (`out` + '.types.part') exist while llama.cpp's dry run reads them. Memory: the tasks in flight (about
    2 x threads chunks of TASK_ELEMENTS floats) plus what the tensors' callbacks hold. `imatrix`: what
    llama-quantize --imatrix does with it (types chosen with it, each expert's rows weighed by its slice, its
    keys recorded)."""
    out = Path(out)
    by_name = {t.name: t for t in tensors}
    if len(by_name) != len(tensors):
        raise Lora2GGUFError("duplicate tensor names")
    overrides = imatrix.key_values() if imatrix is not None else []
    if isinstance(kv, GGUFWriter):
        probe = Path(str(out) + ".types.part")
        try:
            _write_probe(probe, kv, tensors)
            order = _order(_types_off_main_thread(probe, ftype, verbose, imatrix), by_name)
            header = _header(probe, ftype, order, overrides)
        finally:
            probe.unlink(missing_ok=True)
    else:
        order = _order(_types_off_main_thread(kv, ftype, verbose, imatrix), by_name)
        header = _header(Path(kv), ftype, order, overrides)
    n_threads = threads or os.cpu_count() or 1
    _, g = _libs()
    with open(out, "wb") as fh, ThreadPoolExecutor(n_threads, thread_name_prefix="quantize") as pool:
        fh.write(header)
        pending: collections.deque[Future] = collections.deque()
        try:
            for t, new in order:
                if new == t.type:
                    _drain(pending, fh, 0)
                    _copy(t, fh, g)
                else:
                    importance = imatrix.for_tensor(t) if imatrix is not None else None
                    if importance is None and requires_imatrix(t.name, new, ftype):
                        raise Lora2GGUFError(f"tensor {t.name}: {new.name} needs an importance matrix for it, and "
                                             "the one given has no entry for this tensor")
                    key = _reuse_key(t, new, importance)
                    if key is not None and key in _REUSE.kept:
                        _drain(pending, fh, 0)
                        fh.write(_REUSE.kept[key])
                    else:
                        parts: list[Future] | None = [] if key is not None else None
                        _quantize(t, new, pool, pending, fh, 2 * n_threads + 1, importance, parts)
                        _drain(pending, fh, 0)
                        _keep(key, parts)
                size = t.n_rows * row_bytes(new, t.shape[-1])
                fh.write(b"\0" * (-size % ALIGN))
                if progress:
                    progress(t)
        finally:
            for f in pending:
                f.cancel()


def _types_off_main_thread(model, ftype, verbose, imatrix=None):
    """llama_target_types on a worker thread. Its log callback is Python code called from C: on the main
    thread a signal handler would run inside it, where ctypes prints and drops the exception (a Ctrl-C
    lost); here the main thread waits on the result, where Ctrl-C / SIGTERM raise at once."""
    with ThreadPoolExecutor(1, thread_name_prefix="dry-run") as ex:
        return ex.submit(llama_target_types, model, ftype, verbose, imatrix).result()


def _order(types: list[tuple[str, GGMLQuantizationType | None]], by_name: dict[str, Tensor]
           ) -> list[tuple[Tensor, GGMLQuantizationType]]:
    if {n for n, _ in types} != set(by_name) or len(types) != len(by_name):
        raise Lora2GGUFError("llama.cpp's dry run saw other tensors than the ones given")
    return [(by_name[n], new or by_name[n].type) for n, new in types]


def _drain(pending: collections.deque, fh, keep: int) -> None:
    while len(pending) > keep:
        fh.write(memoryview(pending.popleft().result()))


def _copy(t: Tensor, fh, g) -> None:
    want, got = t.n_rows * row_bytes(t.type, t.shape[-1]), 0
    for chunk in t.stored():
        b = np.ascontiguousarray(chunk).view(np.uint8).reshape(-1)
        if not g.ggml_validate_row_data(int(t.type), _ptr(b), b.size):
            raise Lora2GGUFError(f"tensor {t.name} has invalid data (NaN or infinity)")
        fh.write(memoryview(b))
        got += b.size
    if got != want:
        raise AssertionError(f"{t.name}: {got} bytes, expected {want}")


def _keep(key: tuple | None, parts: list[Future] | None) -> None:
    if key is None or _REUSE is None:
        return
    size = sum(f.result().nbytes for f in parts)
    if size <= _REUSE.left:
        _REUSE.kept[key] = b"".join(memoryview(f.result()) for f in parts)
        _REUSE.left -= size


def _quantize(t: Tensor, new: GGMLQuantizationType, pool, pending: collections.deque, fh, depth: int,
              importance: np.ndarray | None = None, parts: list[Future] | None = None) -> None:
    """Tasks of whole rows in order; with an importance matrix a task never crosses an expert boundary (each
    expert's ne1 rows take its own slice, as llama-quant.cpp quantizes them)."""
    ne0, got = t.shape[-1], 0
    step = max(1, TASK_ELEMENTS // ne0)
    per_expert = t.shape[-2] if len(t.shape) >= 2 else 1
    for chunk in t.rows():
        rows = np.ascontiguousarray(chunk, np.float32).reshape(-1, ne0)
        i = 0
        while i < len(rows):
            e = (got + i) // per_expert
            j = min(i + step, len(rows), (e + 1) * per_expert - got) if importance is not None else i + step
            part = None if importance is None else importance[e * ne0:(e + 1) * ne0]
            pending.append(pool.submit(_quantize_task, new, rows[i:j], t.name, part))
            if parts is not None:
                parts.append(pending[-1])
            _drain(pending, fh, depth)
            i = j
        got += len(rows)
    if got != t.n_rows:
        raise AssertionError(f"{t.name}: {got} rows, expected {t.n_rows}")


# -- sources --------------------------------------------------------------------------------------

def stored_slabs(fd: int, info, slab: int = SLAB_BYTES) -> Iterator[np.ndarray]:
    """A stored tensor's bytes (fileio.gguf_read.TensorInfo), read in slabs of whole rows."""
    row = row_bytes(info.type, info.shape[-1])
    step = max(1, slab // row) * row
    for off in range(0, info.nbytes, step):
        yield pread(fd, info.offset + off, min(step, info.nbytes - off), f"tensor {info.name}")


def _float_slab(info, slab: int) -> int:
    """Stored bytes per read such that the float32 rows they give take about `slab` bytes (a Q4_K slab
    expands 7x)."""
    ne0 = info.shape[-1]
    return max(1, slab // (4 * ne0)) * row_bytes(info.type, ne0)


def ggml_rows(fd: int, info, slab: int = SLAB_BYTES) -> Iterator[np.ndarray]:
    """A stored tensor as float32 rows (about `slab` bytes of them at a time), converted by ggml as llama.cpp's
    quantizer converts its input."""
    for raw in stored_slabs(fd, info, _float_slab(info, slab)):
        yield dequantize_rows(raw, info.type, info.shape[-1])


def array_rows(a: np.ndarray, rows: int = TASK_ELEMENTS * 16) -> Callable[[], Iterator[np.ndarray]]:
    """rows() over an in-memory float32 array, in blocks."""
    flat = np.ascontiguousarray(a, np.float32).reshape(-1, a.shape[-1])
    step = max(1, rows // max(1, a.shape[-1]))
    return lambda: (flat[i:i + step] for i in range(0, len(flat), step))


def _replaced_rows(value) -> Callable[[], Iterator[np.ndarray]]:
    def rows():
        yield from array_rows(value() if callable(value) else value)()
    return rows


def _stored(fd: int, ident: tuple, info) -> Tensor:
    """A tensor of an open file as stored: copied where its target type is its own, else converted to float
    rows by ggml (as llama.cpp's quantizer converts its input) and quantized."""
    return Tensor(info.name, info.shape, info.type, functools.partial(ggml_rows, fd, info),
                  functools.partial(stored_slabs, fd, info), (ident, info.name))


def quantize_file(src: str | os.PathLike, dst: str | os.PathLike, ftype: LlamaFileType, threads: int | None = None,
                  verbose: bool = False, imatrix: Importance | None = None) -> Path:
    """llama_model_quantize(src, dst, ftype) in this process (allow_requantize): same bytes (with `imatrix`,
    what llama-quantize --imatrix writes)."""
    dst = Path(dst)
    with GGUFFile(src) as f, open(f.path, "rb") as fh, atomic_output(dst) as tmp:
        fd = fh.fileno()
        ident = file_identity(fd)
        tensors = [_stored(fd, ident, i) for i in f.tensors.values()]
        write_quantized(tmp, ftype, f.path, tensors, threads, verbose=verbose, imatrix=imatrix)
    return dst


def quantize_replaced(src: str | os.PathLike, dst: str | os.PathLike, ftype: LlamaFileType,
                      replace: dict[str, np.ndarray | Callable[[], np.ndarray]], threads: int | None = None,
                      imatrix: Importance | None = None) -> Path:
    """What llama_model_quantize writes from the model a merge hands it (commands.merge's quantized path),
    never a file: src's tensors as stored, except those in `replace`, F32 (GGUF layout: an array, or a
    function that makes it when the quantizer reaches that tensor, so that one replaced tensor is in memory
    at a time); src's key-values with file type ALL_F32. A tensor left alone keeps its bytes wherever its
    own type is its target type, as llama.cpp copies it."""
    dst = Path(dst)
    with GGUFFile(src) as f, open(f.path, "rb") as fh, atomic_output(dst) as tmp:
        fd = fh.fileno()
        ident = file_identity(fd)
        tensors = [Tensor(i.name, i.shape, F32, _replaced_rows(replace[i.name])) if i.name in replace
                   else _stored(fd, ident, i) for i in f.tensors.values()]
        write_quantized(tmp, ftype, f32_copy_writer(f), tensors, threads, imatrix=imatrix)
    return dst
