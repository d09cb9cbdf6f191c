"""Read a GGUF file's header (metadata and tensor infos) and its tensors, memory-mapped.

Why not `gguf.GGUFReader`: it builds numpy views for every element of every metadata array when the
file is opened. For a real model's 49k-token vocabulary and merges that is about 2 s per open, spent
on data that convert/merge/inspect never look at. This reader walks the same format (constants and
types from gguf-py) but keeps string arrays undecoded until a caller asks for them, and checks every
offset against the file size so that a truncated or corrupt file becomes one clear error.
`tests/fileio/test_gguf_read.py` checks it against GGUFReader. Writing stays with `gguf.GGUFWriter`.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType
from gguf.constants import GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC
from gguf.quants import dequantize

from lora2gguf.errors import Lora2GGUFError
from lora2gguf.fileio.ggml_dequantize import to_float

_SCALAR = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}
_NUMPY = {k: np.dtype(v) for k, v in _SCALAR.items()}
_NUMBER = {t for t in _SCALAR if t != GGUFValueType.BOOL}
DAMAGED = "the file is damaged: write or download it again"
MAX_ARRAY_DEPTH = 4  # arrays of arrays: gguf-py writes them, nothing we read nests deeper


class StringArray:
    """A GGUF array of strings, decoded only when iterated or indexed."""

    def __init__(self, buf: memoryview, offsets: np.ndarray, lengths: np.ndarray):
        self._buf, self._offsets, self._lengths = buf, offsets, lengths

    def __len__(self) -> int:
        return len(self._offsets)

    def __getitem__(self, i: int) -> str:
        o = int(self._offsets[i])
        return bytes(self._buf[o:o + int(self._lengths[i])]).decode("utf-8", errors="replace")

    def __iter__(self) -> Iterator[str]:
        return (self[i] for i in range(len(self)))

    def encoded(self) -> bytes:
        """The strings as the file stores them (each a u64 length, then its bytes, one after the other)."""
        if not len(self):
            return b""
        return bytes(self._buf[int(self._offsets[0]) - 8:int(self._offsets[-1] + self._lengths[-1])])


@dataclass(frozen=True)
class Field:
    """One metadata key-value: its GGUF type, the element type for arrays, and the value."""

    type: GGUFValueType
    value: Any  # python scalar / str / np.ndarray (numeric array) / StringArray / list (nested array)
    elem_type: GGUFValueType | None = None


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order (ggml ne reversed)
    type: GGMLQuantizationType
    offset: int  # absolute offset of the data in the file
    nbytes: int

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape))


class _Cursor:
    def __init__(self, buf: memoryview, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def need(self, n: int, what: str) -> None:
        if self.pos + n > len(self.buf):
            raise Lora2GGUFError(
                f"{self.path}: truncated GGUF ({what} runs past the end of the file at byte {self.pos}); "
                "the file is incomplete, download or write it again")

    def unpack(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self.need(n, what)
        v = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += n
        return v

    def string(self, what: str) -> str:
        n = self.unpack("<Q", what)
        self.need(n, what)
        s = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return s.decode("utf-8")
        except UnicodeDecodeError:
            raise Lora2GGUFError(f"{self.path}: corrupt GGUF ({what} is not UTF-8); " + DAMAGED) from None


class GGUFFile:
    """A GGUF file opened read-only and memory-mapped. Use as a context manager or call close()."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise Lora2GGUFError(f"{self.path}: no such file")
        self._fh = open(self.path, "rb")
        size = os.fstat(self._fh.fileno()).st_size
        if size < 24:
            self._fh.close()
            raise Lora2GGUFError(f"{self.path}: not a GGUF file ({size} bytes, too short for a GGUF header)")
        self._mm = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_READ)
        self.size = size
        try:
            self._parse(memoryview(self._mm))
        except Exception:
            self.close()
            raise

    def _parse(self, buf: memoryview) -> None:
        cur = _Cursor(buf, self.path)
        magic = cur.unpack("<I", "magic")
        if magic != GGUF_MAGIC:
            raise Lora2GGUFError(f"{self.path}: not a GGUF file (magic {bytes(buf[:4])!r}, expected b'GGUF')")
        self.version = cur.unpack("<I", "version")
        if self.version not in (2, 3):
            raise Lora2GGUFError(f"{self.path}: unsupported GGUF version {self.version} (expected 2 or 3)")
        n_tensors = cur.unpack("<Q", "tensor count")
        n_kv = cur.unpack("<Q", "metadata count")
        # Each entry needs at least a few bytes: absurd counts are corruption, not a 2^60-iteration loop.
        if n_tensors > self.size // 8 or n_kv > self.size // 8:
            raise Lora2GGUFError(f"{self.path}: corrupt GGUF header ({n_tensors} tensors, {n_kv} keys); " + DAMAGED)
        self.fields: dict[str, Field] = {}
        for _ in range(n_kv):
            key = cur.string("metadata key")
            vtype = self._vtype(cur.unpack("<I", f"type of {key}"), key)
            self.fields[key] = self._value(cur, vtype, key, 0)
        infos = []
        for _ in range(n_tensors):
            name = cur.string("tensor name")
            n_dims = cur.unpack("<I", f"dims of {name}")
            if n_dims > 8:
                raise Lora2GGUFError(f"{self.path}: corrupt tensor info for {name} ({n_dims} dimensions); " + DAMAGED)
            ne = [cur.unpack("<Q", f"shape of {name}") for _ in range(n_dims)]
            raw_type = cur.unpack("<I", f"type of {name}")
            try:
                ttype = GGMLQuantizationType(raw_type)
            except ValueError:
                raise Lora2GGUFError(f"{self.path}: tensor {name} has unknown GGML type {raw_type}; " + DAMAGED) from None
            infos.append((name, ne, ttype, cur.unpack("<Q", f"offset of {name}")))
        self.alignment = self.number("general.alignment", GGUF_DEFAULT_ALIGNMENT, int)
        if self.alignment <= 0 or self.alignment & (self.alignment - 1):
            raise Lora2GGUFError(f"{self.path}: corrupt GGUF (alignment {self.alignment} is not a power of two); " + DAMAGED)
        self.data_offset = -(-cur.pos // self.alignment) * self.alignment
        self.tensors: dict[str, TensorInfo] = {}
        for name, ne, ttype, off in infos:
            if name in self.tensors:
                raise Lora2GGUFError(f"{self.path}: corrupt GGUF (tensor {name} appears twice); " + DAMAGED)
            block, type_size = GGML_QUANT_SIZES[ttype]
            if not ne or ne[0] % block:
                raise Lora2GGUFError(f"{self.path}: tensor {name} shape {ne} does not fit {ttype.name} blocks of "
                                     f"{block}; " + DAMAGED)
            nbytes = ne[0] // block * type_size * math.prod(ne[1:])  # Python ints: a corrupt shape cannot wrap around
            if off % self.alignment:  # ggml refuses these too
                raise Lora2GGUFError(f"{self.path}: corrupt GGUF (tensor {name} data offset {off} is not a multiple of "
                                     f"the alignment {self.alignment}); " + DAMAGED)
            start = self.data_offset + off
            if start + nbytes > self.size:
                raise Lora2GGUFError(
                    f"{self.path}: tensor {name} data ends at byte {start + nbytes}, past the end of the file "
                    f"({self.size} bytes); the file is truncated or corrupt")
            self.tensors[name] = TensorInfo(name, tuple(reversed(ne)), ttype, start, nbytes)

    def _vtype(self, raw: int, key: str) -> GGUFValueType:
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise Lora2GGUFError(f"{self.path}: metadata {key} has unknown GGUF value type {raw}; " + DAMAGED) from None

    def _value(self, cur: _Cursor, vtype: GGUFValueType, key: str, depth: int) -> Field:
        if vtype == GGUFValueType.STRING:
            return Field(vtype, cur.string(key))
        if vtype == GGUFValueType.FLOAT32:  # shortest decimal that round-trips: 1e-05, not 9.99999974e-06
            return Field(vtype, float(str(np.float32(cur.unpack("<f", key)))))
        if vtype in _SCALAR:
            return Field(vtype, cur.unpack(_SCALAR[vtype], key))
        if vtype != GGUFValueType.ARRAY:
            raise Lora2GGUFError(f"{self.path}: metadata {key} has unsupported type {vtype}; " + DAMAGED)
        if depth >= MAX_ARRAY_DEPTH:
            raise Lora2GGUFError(f"{self.path}: corrupt GGUF (metadata {key} nests arrays {depth + 1} deep); " + DAMAGED)
        etype = self._vtype(cur.unpack("<I", key), key)
        count = cur.unpack("<Q", key)
        if etype in _NUMPY:
            dt = _NUMPY[etype]
            cur.need(count * dt.itemsize, key)
            arr = np.frombuffer(cur.buf, dtype=dt, count=count, offset=cur.pos)
            cur.pos += count * dt.itemsize
            return Field(vtype, arr, etype)
        if etype == GGUFValueType.STRING:
            if count > len(cur.buf) // 8:
                raise Lora2GGUFError(f"{self.path}: corrupt GGUF (metadata {key} claims {count} strings); " + DAMAGED)
            # String lengths must be walked one by one (decoding is deferred). This loop is most of the time
            # to open a real model (49k tokens + merges), so it is kept tight: one bounds check at the end.
            offsets, lengths = [0] * count, [0] * count
            read_len, pos, size = struct.Struct("<Q").unpack_from, cur.pos, len(cur.buf)
            try:
                for i in range(count):
                    n = read_len(cur.buf, pos)[0]
                    offsets[i], lengths[i] = pos + 8, n
                    pos += 8 + n
            except (struct.error, OverflowError):
                pos = size + 1
            if pos > size:
                cur.need(size + 1 - cur.pos, key)  # raises: truncated
            cur.pos = pos
            return Field(vtype, StringArray(cur.buf, np.array(offsets, np.int64), np.array(lengths, np.int64)), etype)
        if count > len(cur.buf) // 12:  # each nested array takes at least 12 bytes (type, count)
            raise Lora2GGUFError(f"{self.path}: corrupt GGUF (metadata {key} claims {count} arrays); " + DAMAGED)
        return Field(vtype, [self._value(cur, etype, key, depth + 1).value for _ in range(count)], etype)

    # -- metadata ---------------------------------------------------------------------------------
    def get(self, key: str, default: Any = None) -> Any:
        f = self.fields.get(key)
        return default if f is None else f.value

    def number(self, key: str, default: Any = None, kind: type = float) -> Any:
        """A numeric metadata value as `kind` (float or int), `default` when absent; a value of another
        type, or one that is not finite, is a corrupt file and an error naming the key."""
        f = self.fields.get(key)
        if f is None:
            return default
        if f.type not in _NUMBER:
            what = f"an array of {f.elem_type.name.lower()}" if f.elem_type is not None else f"a {f.type.name.lower()}"
            raise Lora2GGUFError(f"{self.path}: metadata {key} is {what}, not a number; the file is corrupt or "
                                 "was written by a broken tool")
        if not math.isfinite(f.value) or (kind is int and f.value != int(f.value)):
            raise Lora2GGUFError(f"{self.path}: metadata {key} is {f.value}, not a finite "
                                 f"{'integer' if kind is int else 'number'}; the file is corrupt")
        return kind(f.value)

    def string(self, key: str, default: Any = None) -> Any:
        """A string metadata value, `default` when absent; any other type is an error naming the key."""
        f = self.fields.get(key)
        if f is None:
            return default
        if f.type != GGUFValueType.STRING:
            raise Lora2GGUFError(f"{self.path}: metadata {key} is a {f.type.name.lower()}, not a string; the file "
                                 "is corrupt or was written by a broken tool")
        return f.value

    # -- tensors ----------------------------------------------------------------------------------
    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as a uint8 view into the mapped file (no copy)."""
        t = self.tensors[name]
        return np.frombuffer(self._mm, dtype=np.uint8, count=t.nbytes, offset=t.offset)

    def release(self, prefix: str) -> None:
        """Drop this map's pages of the tensors named `prefix`… from the process (they stay in the page cache):
        once read, a layer's pages would otherwise count in the resident set until the map closes, twice
        where llama.cpp maps the same file in the same process (verify: the reference beside llama.cpp)."""
        page = mmap.PAGESIZE
        for t in self.tensors.values():
            if t.name.startswith(prefix) and t.nbytes:
                start = t.offset // page * page
                self._mm.madvise(mmap.MADV_DONTNEED, start, t.offset + t.nbytes - start)

    def tensor(self, name: str) -> np.ndarray:
        """The tensor as float32 in numpy order (a copy, never a view of the file), decoded by `decode`."""
        if name not in self.tensors:
            raise Lora2GGUFError(f"{self.path}: tensor {name} not found")
        t = self.tensors[name]
        return decode(self.raw(name), t.type, t.shape, f"{self.path}: tensor {name}", copy=True)

    def close(self) -> None:
        mm, self._mm = getattr(self, "_mm", None), None
        if mm is not None:
            try:
                mm.close()
            except BufferError:  # a numpy view still points into the map; the OS frees it with the views
                pass
        if getattr(self, "_fh", None):
            self._fh.close()

    def __enter__(self) -> "GGUFFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- tensor data read outside a memory map: the one row reader and decoder ---------------------------------

def row_bytes(qtype: GGMLQuantizationType, ne0: int) -> int:
    """Stored bytes of one row of ne0 values."""
    block, size = GGML_QUANT_SIZES[qtype]
    return ne0 // block * size


def decode(raw: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, ...], what: str = "tensor",
           copy: bool = False) -> np.ndarray:
    """float32 values of `shape` (numpy order; -1 allowed) from stored bytes of whole blocks, as gguf-py
    dequantizes them: F32 viewed in place (copied with copy=True), F16 upcast by numpy, any other type by
    ggml's own conversion (fileio.ggml_dequantize: the same bits, many times faster), or by
    gguf.quants.dequantize where ggml has none. Elementwise, so a block of rows decodes to those rows of the
    whole tensor."""
    if qtype == GGMLQuantizationType.F32:
        out = raw.view(np.float32).reshape(shape)
        return out.copy() if copy else out
    if qtype == GGMLQuantizationType.F16:
        return raw.view(np.float16).reshape(shape).astype(np.float32)
    out = to_float(raw, qtype)
    if out is not None:
        return out.reshape(shape)
    try:
        out = dequantize(raw.reshape(1, -1), qtype)
    except NotImplementedError:
        raise Lora2GGUFError(f"{what} has type {qtype.name}, which gguf-py cannot dequantize") from None
    return out.astype(np.float32, copy=False).reshape(shape)


def file_identity(file: int | str | os.PathLike) -> tuple:
    """What says two reads saw the same file contents (an open fd or a path): device, inode, size, mtime.
    Keys the work reused within a process (quantized tensors, verify's views of a base)."""
    st = os.fstat(file) if isinstance(file, int) else os.stat(file)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def pread(fd: int, offset: int, n: int, what: str = "tensor data") -> np.ndarray:
    """n bytes from `offset` of an open file, read into fresh memory (freed after use, unlike the pages of a
    memory map, which stay resident)."""
    buf = np.empty(n, np.uint8)
    view, got = memoryview(buf), 0
    while got < n:
        k = os.preadv(fd, [view[got:]], offset + got)
        if not k:  # the header was checked against the size at open: the file shrank since
            raise Lora2GGUFError(f"{_path_of(fd)}: {what}: the file ended early at byte {offset + got} (was it "
                                 "changed while being read?); it is truncated")
        got += k
    return buf


def _path_of(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "the file"
