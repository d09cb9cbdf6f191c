"""llama.cpp's importance-matrix files, read and written: what `llama-imatrix` writes and `llama-quantize
--imatrix` reads.

Two forms (common/imatrix-loader.cpp reads both):
- GGUF (`general.type = imatrix`): per weight `<name>.in_sum2`, F32 ne [ne0, n_mat] (numpy (n_mat, ne0)),
  the sum of x² per input column over every token that went through that weight (per expert for a 3-D
  expert tensor, n_mat experts), and `<name>.counts`, F32 ne [1, n_mat], how many tokens that was; the
  key-values imatrix.datasets, imatrix.chunk_count, imatrix.chunk_size.
- legacy `.dat`: int32 n_entries; per entry int32 name length, the name, int32 ncall, int32 nval, nval
  float32 (mean x² times ncall); optionally int32 chunk count, int32 length and the dataset name.

`Imatrix.importance()` is the array llama-quantize hands to ggml_quantize_chunk for each weight: its
load_imatrix (tools/quantize/quantize.cpp) divides each matrix's sums by its count (counts rounded to
integers first, as the loader stores them), 1.0 where a count is 0; legacy sums are divided by ncall.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGUFReader, GGUFWriter, Keys

from lora2gguf.errors import Lora2GGUFError

SUMS, COUNTS = ".in_sum2", ".counts"
KEY_DATASETS, KEY_CHUNK_COUNT, KEY_CHUNK_SIZE = "imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"


@dataclass
class Imatrix:
    """Per weight (GGUF tensor name): sums of x², (n_mat, ne0) float32, and token counts, (n_mat,)."""

    sums: dict[str, np.ndarray] = field(default_factory=dict)
    counts: dict[str, np.ndarray] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    legacy: bool = False

    def importance(self) -> dict[str, np.ndarray]:
        """name → float32 array of n_mat·ne0 values (expert-major), as llama-quantize computes it."""
        out = {}
        for name, s in self.sums.items():
            c = self.counts[name].astype(np.float64)
            if self.legacy:
                v = s / np.float32(c[0]) if c[0] > 0 else s
            else:
                c = np.rint(c).astype(np.float32)  # std::lround into int64, then back to float
                safe = np.where(c > 0, c, np.float32(1))[:, None]
                v = np.where(c[:, None] > 0, s / safe, np.float32(1))
            out[name] = np.ascontiguousarray(v, np.float32).reshape(-1)
        return out


def read_imatrix(path: str | os.PathLike) -> Imatrix:
    """Either form, told apart by the GGUF magic (as llama.cpp's loader does)."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as e:
        raise Lora2GGUFError(f"{path}: cannot read the importance matrix ({e.strerror or e})") from None
    im = _read_gguf(path) if magic == b"GGUF" else _read_legacy(path)
    if not im.sums:
        raise Lora2GGUFError(f"{path}: the importance matrix has no entries")
    for name, s in im.sums.items():
        if not np.isfinite(s).all():
            raise Lora2GGUFError(f"{path}: entry {name} holds a non-finite value; recompute the importance matrix")
    return im


def _read_gguf(path: Path) -> Imatrix:
    try:
        r = GGUFReader(path)
    except Exception as e:  # gguf-py raises ValueError/struct.error/... on a damaged file
        raise Lora2GGUFError(f"{path}: not a readable GGUF importance matrix ({e})") from None

    def value(key):
        f = r.fields.get(key)
        return None if f is None else f.contents()

    if value(Keys.General.TYPE) not in (None, "imatrix"):
        raise Lora2GGUFError(f"{path}: a GGUF of type {value(Keys.General.TYPE)!r}, not an importance matrix "
                             "(llama-imatrix writes general.type = imatrix)")
    if any(value(k) is None for k in (KEY_DATASETS, KEY_CHUNK_COUNT, KEY_CHUNK_SIZE)):
        # llama-quantize refuses it too ("missing imatrix metadata")
        raise Lora2GGUFError(f"{path}: missing imatrix metadata ({KEY_DATASETS}, {KEY_CHUNK_COUNT}, "
                             f"{KEY_CHUNK_SIZE}); is this an importance matrix written by llama-imatrix?")
    im = Imatrix(datasets=list(value(KEY_DATASETS)), chunk_count=int(value(KEY_CHUNK_COUNT)),
                 chunk_size=int(value(KEY_CHUNK_SIZE)))
    tensors = {t.name: t for t in r.tensors}
    for name, t in tensors.items():
        if not name.endswith(SUMS):
            if not name.endswith(COUNTS):
                raise Lora2GGUFError(f"{path}: tensor {name} is neither <weight>{SUMS} nor <weight>{COUNTS}")
            continue
        weight = name[:-len(SUMS)]
        c = tensors.get(weight + COUNTS)
        if c is None:
            raise Lora2GGUFError(f"{path}: mismatched sums and counts for {weight} (no {weight}{COUNTS})")
        if t.tensor_type.name != "F32" or c.tensor_type.name != "F32":
            raise Lora2GGUFError(f"{path}: sums and counts for {weight} must be F32")
        n_mat = int(c.n_elements)
        if n_mat < 1 or t.n_elements % n_mat:
            raise Lora2GGUFError(f"{path}: {weight} has {t.n_elements} sums for {n_mat} counts")
        im.sums[weight] = np.array(t.data, np.float32).reshape(n_mat, -1)
        im.counts[weight] = np.array(c.data, np.float32).reshape(n_mat)
    for name in tensors:
        if name.endswith(COUNTS) and name[:-len(COUNTS)] not in im.sums:
            raise Lora2GGUFError(f"{path}: mismatched sums and counts for {name[:-len(COUNTS)]} (no sums)")
    return im


def _read_legacy(path: Path) -> Imatrix:
    data = path.read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        n = struct.calcsize(fmt)
        if pos + n > len(data):
            raise Lora2GGUFError(f"{path}: truncated legacy importance matrix (.dat) at byte {pos}")
        v = struct.unpack_from(fmt, data, pos)
        pos += n
        return v

    (n_entries,) = take("<i")
    if n_entries < 1:
        raise Lora2GGUFError(f"{path}: neither a GGUF nor a legacy .dat importance matrix with entries")
    im = Imatrix(legacy=True)
    for _ in range(n_entries):
        (n,) = take("<i")
        if n < 0:
            raise Lora2GGUFError(f"{path}: a negative name length at byte {pos - 4}; not an importance matrix")
        name = take(f"<{n}s")[0].split(b"\0")[0].decode("utf-8", errors="replace")
        ncall, nval = take("<ii")
        if nval < 1:
            raise Lora2GGUFError(f"{path}: entry {name} has {nval} values")
        im.sums[name] = np.array(take(f"<{nval}f"), np.float32).reshape(1, nval)
        im.counts[name] = np.array([ncall], np.float32)
    if pos + 4 <= len(data):  # the optional trailer: chunk count, dataset name
        (im.chunk_count,) = take("<i")
        if pos + 4 <= len(data):
            (n,) = take("<i")
            if n > 0 and pos + n <= len(data):
                im.datasets.append(take(f"<{n}s")[0].split(b"\0")[0].decode("utf-8", errors="replace"))
    return im


def write_imatrix(path: str | os.PathLike, im: Imatrix, arch: str) -> None:
    """The GGUF form, as llama-imatrix's save_imatrix writes it (entries sorted by name, sums and counts
    F32), through gguf-py (which also records general.architecture: the model the matrix was taken on)."""
    w = GGUFWriter(path, arch)
    w.add_type("imatrix")
    w.add_array(KEY_DATASETS, list(im.datasets))
    w.add_uint32(KEY_CHUNK_COUNT, int(im.chunk_count))
    w.add_uint32(KEY_CHUNK_SIZE, int(im.chunk_size))
    for name in sorted(im.sums):
        s = np.ascontiguousarray(im.sums[name], np.float32)
        w.add_tensor(name + SUMS, s.reshape(-1, s.shape[-1]))
        w.add_tensor(name + COUNTS, np.ascontiguousarray(im.counts[name], np.float32).reshape(-1, 1))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
