"""Write GGUF files tensor by tensor (only one tensor's data in memory), into the temp file that
fileio.atomic gives, and the F32 copy of a model (dequantize_file)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from gguf import GGMLQuantizationType, GGUFEndian, GGUFValueType, GGUFWriter, LlamaFileType
from gguf.quants import quant_shape_to_byte_shape, quantize

from lora2gguf.fileio.atomic import atomic_output
from lora2gguf.fileio.gguf_read import _NUMPY, GGUFFile, StringArray, row_bytes


class MetadataWriter(GGUFWriter):
    """GGUFWriter that packs an array read by fileio.gguf_read (a StringArray, a numeric numpy array) at once:
    the strings' bytes as the source file stores them, numbers by numpy. gguf-py packs each element with a
    Python call: 0.61 s for the three 262k-entry token arrays of Gemma 3 (0.017 s here), on every merge and
    verify floor that copies them.
    The bytes are gguf-py's (tests/fileio/test_gguf_write.py)."""

    def _pack_val(self, val, vtype: GGUFValueType, add_vtype: bool, sub_type: GGUFValueType | None = None) -> bytes:
        fast = (vtype == GGUFValueType.ARRAY and self.endianess == GGUFEndian.LITTLE and len(val) > 0
                and ((isinstance(val, StringArray) and sub_type == GGUFValueType.STRING)
                     or (isinstance(val, np.ndarray) and sub_type in _NUMPY)))
        if not fast:
            return super()._pack_val(val, vtype, add_vtype, sub_type)
        head = (self._pack("I", vtype) if add_vtype else b"") + self._pack("I", sub_type) + self._pack("Q", len(val))
        if isinstance(val, StringArray):
            return head + val.encoded()
        return head + np.ascontiguousarray(val, dtype=_NUMPY[sub_type]).tobytes()


def copy_fields(src: GGUFFile, writer: GGUFWriter, skip: Callable[[str], bool] = lambda k: False) -> None:
    """Copy every metadata key of src (tokenizer, chat template, rope...) except those skip() names."""
    for key, field in src.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.alignment") or skip(key):
            continue
        value = field.value
        if isinstance(writer, MetadataWriter) and isinstance(value, (StringArray, np.ndarray)):
            pass  # packed at once by the writer
        else:
            value = _plain(value)
        writer.add_key_value(key, value, field.type, sub_type=field.elem_type)


def _plain(value):
    """A value as gguf-py's writer takes it: Python lists, nested arrays included."""
    if isinstance(value, StringArray):
        return list(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]  # numpy order
    type: GGMLQuantizationType
    nbytes: int


def nbytes_of(shape: tuple[int, ...], qtype: GGMLQuantizationType) -> int:
    return int(np.prod(shape[:-1], dtype=np.int64)) * row_bytes(qtype, shape[-1])


def write_streaming(path: Path, writer: GGUFWriter, plan: list[PlannedTensor],
                    data: Iterable[np.ndarray], progress: Callable[[PlannedTensor], None] | None = None) -> None:
    """Write header, metadata and tensor infos, then each tensor's bytes as `data` yields them (in plan
    order), so only one tensor is in memory at a time. `writer` must carry the metadata already."""
    for t in plan:
        raw = t.type not in (GGMLQuantizationType.F32, GGMLQuantizationType.F16)
        # GGUFWriter takes the *byte* shape for uint8 data (quantized, BF16) and converts it back.
        writer.add_tensor_info(t.name, quant_shape_to_byte_shape(t.shape, t.type) if raw else t.shape,
                               np.dtype(np.uint8) if raw else (
            np.dtype(np.float32) if t.type == GGMLQuantizationType.F32 else np.dtype(np.float16)),
            t.nbytes, raw_dtype=t.type)
    try:
        writer.write_header_to_file(path)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        n = 0
        for t, arr in zip(plan, data):
            arr = np.ascontiguousarray(arr)
            if arr.nbytes != t.nbytes:
                raise AssertionError(f"{t.name}: {arr.nbytes} bytes, planned {t.nbytes}")
            writer.write_tensor_data(arr)
            n += 1
            if progress:
                progress(t)
        if n != len(plan):
            raise AssertionError(f"wrote {n} of {len(plan)} tensors")
    finally:  # on a failure too: the temp file is then removed, and must not stay open
        writer.close()


def encode(arr: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """float32 array → bytes of the given type, for the types gguf-py quantizes (F32/F16/BF16/Q8_0...)."""
    if qtype == GGMLQuantizationType.F32:
        return arr.astype(np.float32, copy=False)
    if qtype == GGMLQuantizationType.F16:
        return arr.astype(np.float16)

    return quantize(arr.astype(np.float32, copy=False), qtype)


def f32_copy_writer(f: GGUFFile) -> GGUFWriter:
    """A writer carrying the metadata of dequantize_file's F32 copy of f (the base's, file type ALL_F32)."""
    w = MetadataWriter(None, f.get("general.architecture"))
    copy_fields(f, w, skip=lambda k: k == "general.file_type")
    w.add_file_type(LlamaFileType.ALL_F32)
    return w


def dequantize_file(src: str | os.PathLike, dst: str | os.PathLike, replace: dict | None = None) -> None:
    """An F32 copy of a GGUF model: same metadata, every tensor dequantized (norms stay F32 anyway); `replace`
    (GGUF name → float32 array in GGUF layout) gives some tensors other values."""
    dst = Path(dst)
    with GGUFFile(src) as f, atomic_output(dst) as tmp:
        w = f32_copy_writer(f)
        plan = [PlannedTensor(t.name, t.shape, GGMLQuantizationType.F32, 4 * t.n_elements)
                for t in f.tensors.values()]
        replace = replace or {}
        write_streaming(tmp, w, plan, (replace[t.name] if t.name in replace else f.tensor(t.name) for t in plan))
