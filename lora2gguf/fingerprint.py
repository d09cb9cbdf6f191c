"""A fingerprint of a base model that survives requantization: which base was this adapter made for?

Computed without reading the whole file: a hash of the tensor names and shapes (the structure), plus
a small deterministic sample of weight values in HF layout (a few rows of the embedding, the head and
the projections of the first, middle and last layer, dequantized). Two bases match when the structures
are equal and every sampled tensor correlates strongly: the same model at F16, Q8_0 or Q4_K correlates
> 0.99 with its F32 copy, an unrelated model of the same shapes near 0. A fine-tune whose weights moved
less than quantization noise would also match: the sample recognises the weights, not a byte-identical
file (the digest, taken at float16 precision, says that).
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np


PER_TENSOR = 128  # sampled values per tensor
MIN_CORRELATION = 0.8  # Q2_K keeps ~0.9 per tensor; unrelated weights stay below ~0.3 at 128 values
KEY_DIGEST, KEY_STRUCTURE, KEY_SAMPLE = "lora2gguf.base.fingerprint", "lora2gguf.base.structure", "lora2gguf.base.sample"


@dataclass(frozen=True)
class Fingerprint:
    structure: str  # sha256 over arch, HF tensor names and shapes
    sample: np.ndarray  # float32 (n_sampled_tensors * PER_TENSOR,)

    @property
    def digest(self) -> str:
        """Short id of this exact base (structure + sample at float16 precision)."""
        h = hashlib.sha256(self.structure.encode() + self.sample.astype(np.float16).tobytes())
        return h.hexdigest()[:16]

    def to_fields(self) -> dict[str, object]:
        return {KEY_DIGEST: self.digest, KEY_STRUCTURE: self.structure, KEY_SAMPLE: self.sample}


def from_gguf_fields(f) -> Fingerprint | None:
    """The fingerprint recorded in an adapter's metadata (a gguf_file.GGUFFile), if any."""
    s, v = f.get(KEY_STRUCTURE), f.get(KEY_SAMPLE)
    if s is None or v is None:
        return None
    return Fingerprint(str(s), np.asarray(v, np.float32))


def sampled_tensors(spec) -> list[str]:
    names = ["model.embed_tokens.weight"] + ([] if spec.tied_embeddings else ["lm_head.weight"])
    for i in sorted({0, spec.n_layer // 2, spec.n_layer - 1}):
        names += [f"model.layers.{i}.{m}.weight" for m in spec.arch_module.layer_linears]
    return names


def _plan(name: str, shape: tuple[int, ...]) -> tuple[list[int], int]:
    """Which rows (HF order) and how many leading columns to sample from this tensor."""
    cols = min(64, shape[1])
    k = min(shape[0], math.ceil(PER_TENSOR / cols))
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    return sorted(rng.choice(shape[0], size=k, replace=False).tolist()), cols


def _finish(values: list[np.ndarray]) -> np.ndarray:
    v = np.concatenate(values).astype(np.float32)[:PER_TENSOR]
    return np.pad(v, (0, PER_TENSOR - len(v)))


def fingerprint(base) -> Fingerprint:
    """Fingerprint of an open base (base.GGUFBase or base.HFBase)."""
    spec = base.spec
    if hasattr(base, "file"):
        shapes = {h: base.file.tensors[base.gguf_name(h)].shape for h in base.hf_names()}
        rows_of = lambda h, rows, cols: _gguf_rows(base, h, rows, cols)  # noqa: E731
    else:
        st = _SafetensorsIndex(base.path)
        shapes = {h: st.shape(h) for h in base.hf_names()}
        rows_of = st.rows
    structure = hashlib.sha256(json.dumps([spec.arch, [[h, list(s)] for h, s in shapes.items()]]).encode()).hexdigest()
    parts = []
    for h in sampled_tensors(spec):
        rows, cols = _plan(h, shapes[h])
        parts.append(_finish([r[:cols] for r in rows_of(h, rows, cols)]))
    return Fingerprint(structure, np.concatenate(parts))


def _gguf_rows(base, hf_name: str, rows: list[int], cols: int) -> list[np.ndarray]:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    f, spec = base.file, base.spec
    t = f.tensors[base.gguf_name(hf_name)]
    arch = spec.arch_module
    if arch.permutes_rows(spec, hf_name):  # GGUF row j holds HF row perm[j]
        where = np.argsort(arch.rows_to_gguf(spec, hf_name, np.arange(t.shape[0])))
        rows = [int(where[r]) for r in rows]
    block, type_size = GGML_QUANT_SIZES[t.type]
    row_bytes = t.nbytes // t.shape[0]
    n_take = -(-cols // block) * block
    raw = f.raw(t.name)
    out = []
    for r in rows:
        chunk = raw[r * row_bytes: r * row_bytes + n_take // block * type_size]
        if t.type == GGMLQuantizationType.F32:
            out.append(chunk.view(np.float32))
        elif t.type == GGMLQuantizationType.F16:
            out.append(chunk.view(np.float16).astype(np.float32))
        else:
            out.append(dequantize(chunk.reshape(1, -1), t.type).reshape(-1))
    return out


class _SafetensorsIndex:
    """Shapes and single rows of an HF model's safetensors files, read through the headers and a memory
    map (no torch: safetensors' numpy loader cannot read bf16, and only a few rows are needed)."""

    _DT = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2"}

    def __init__(self, path: Path):
        idx = path / "model.safetensors.index.json"
        files = sorted(set(json.loads(idx.read_text())["weight_map"].values())) if idx.is_file() else ["model.safetensors"]
        self.entries: dict[str, tuple[Path, dict, int]] = {}
        for name in files:
            p = path / name
            with open(p, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
            for k, info in header.items():
                if k != "__metadata__":
                    self.entries[k] = (p, info, 8 + n)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name][1]["shape"])

    def rows(self, name: str, rows: list[int], cols: int) -> list[np.ndarray]:
        p, info, start = self.entries[name]
        dt = np.dtype(self._DT[info["dtype"]])
        shape = tuple(info["shape"])
        mm = np.memmap(p, dtype=dt, mode="r", offset=start + info["data_offsets"][0], shape=shape)
        out = [np.array(mm[r, :cols]) for r in rows]
        if info["dtype"] == "BF16":
            out = [(v.astype(np.uint32) << 16).view(np.float32) for v in out]
        return [v.astype(np.float32) for v in out]


def compare(recorded: Fingerprint, actual: Fingerprint) -> dict:
    """Does `actual` look like the base `recorded` was taken from? verdict: equal at float16 precision / same
    weights at another precision or quantization / different shapes / different weights."""
    if recorded.structure != actual.structure:
        return {"match": False, "verdict": "different model (tensor names or shapes differ)", "min_correlation": None}
    if recorded.sample.shape != actual.sample.shape:
        return {"match": False, "verdict": "different fingerprint layout", "min_correlation": None}
    a = recorded.sample.reshape(-1, PER_TENSOR).astype(np.float64)
    b = actual.sample.reshape(-1, PER_TENSOR).astype(np.float64)
    corr = []
    for x, y in zip(a, b):
        if np.array_equal(x, y):
            corr.append(1.0)
        else:
            sx, sy = x.std(), y.std()
            corr.append(0.0 if sx == 0 or sy == 0 else float(((x - x.mean()) * (y - y.mean())).mean() / (sx * sy)))
    low = min(corr)
    if recorded.digest == actual.digest:
        verdict = "same weights (equal at float16 precision)"
    elif low >= MIN_CORRELATION:
        verdict = "same weights at another precision or quantization"
    else:
        verdict = "different weights (same shapes): the adapter was made for another model"
    return {"match": low >= MIN_CORRELATION, "verdict": verdict, "min_correlation": round(low, 4)}
