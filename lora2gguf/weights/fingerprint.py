"""A fingerprint of a base model that survives requantization: which base was this adapter made for?

Computed without reading the whole file: a hash of the tensor names and shapes (the structure), plus
a small deterministic sample of weight values in HF layout (a few rows of the embedding, the head and
the projections of the first, middle and last layer, dequantized), with each sampled tensor's type.

Two bases match when the structures are equal and each sampled tensor differs by no more than the
rounding of the two types involved can explain (relative RMS difference within ROUNDING[type] of each
side, summed). So the same model at F16, Q8_0 or Q4_K matches its F32 copy, an unrelated model of the
same shapes differs by ~1.4 (√2), and a fine-tune (the instruct version of a base) differs by the size
of its weight updates: told apart whenever they exceed the rounding of the types compared (any change
at F32/F16, ~2% at Q8_0, ~25% against a Q4 file, where weights alone cannot tell). Fingerprints
recorded without types (adapters written before them) fall back to correlation. A false alarm (a base
requantized by a tool that rounds differently) is overridden with LORA2GGUF_ALLOW_BASE_MISMATCH=1.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from lora2gguf.fileio.gguf_read import decode

PER_TENSOR = 128  # sampled values per tensor
MIN_CORRELATION = 0.8  # Q2_K keeps ~0.9 per tensor; unrelated weights stay below ~0.3 at 128 values
KEY_DIGEST, KEY_STRUCTURE, KEY_SAMPLE = "lora2gguf.base.fingerprint", "lora2gguf.base.structure", "lora2gguf.base.sample"
KEY_TYPES = "lora2gguf.base.sample_types"  # GGML type of each sampled tensor
OVERRIDE = "LORA2GGUF_ALLOW_BASE_MISMATCH"
# Relative RMS error of dequantized weights vs the originals, an upper estimate per GGML type: half a
# quantization step over √3 for the levels each type has on a Gaussian-like block (F16/BF16: their
# mantissa), with room to spare. Two copies of one base differ by at most the sum for their two types.
_ROUNDING_BY_NAME = {"F32": 0.0, "F16": 5e-4, "BF16": 4e-3, "Q8_0": 0.012, "Q6_K": 0.04,
                     **dict.fromkeys(["Q5_0", "Q5_1", "Q5_K"], 0.07),
                     **dict.fromkeys(["Q4_0", "Q4_1", "Q4_K", "IQ4_NL", "IQ4_XS"], 0.13),
                     **dict.fromkeys(["Q3_K", "IQ3_S", "IQ3_XXS"], 0.25),
                     **dict.fromkeys(["Q2_K", "IQ2_XXS", "IQ2_XS", "IQ2_S"], 0.5)}
ROUNDING = {int(GGMLQuantizationType[n]): v for n, v in _ROUNDING_BY_NAME.items()}
UNKNOWN_ROUNDING = 1.0  # a type not in the table (IQ1, ternary...): only an unrelated model is told apart


@dataclass(frozen=True)
class Fingerprint:
    structure: str  # sha256 over arch, HF tensor names and shapes
    sample: np.ndarray  # float32 (n_sampled_tensors * PER_TENSOR,)
    types: tuple[int, ...] | None = None  # GGML type of each sampled tensor (None: recorded before types)

    @property
    def digest(self) -> str:
        """Short id of this exact base (structure + sample at float16 precision)."""
        h = hashlib.sha256(self.structure.encode() + self.sample.astype(np.float16).tobytes())
        return h.hexdigest()[:16]

    def to_fields(self) -> dict[str, object]:
        out = {KEY_DIGEST: self.digest, KEY_STRUCTURE: self.structure, KEY_SAMPLE: self.sample}
        if self.types is not None:
            out[KEY_TYPES] = np.asarray(self.types, np.uint32)
        return out


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
        shapes = {h: base.shape(h) for h in base.hf_names()}  # HF layout (a one-row matrix stored as a vector)
        rows_of = lambda h, rows, cols: _gguf_rows(base, h, rows, cols)  # noqa: E731
        type_of = lambda h: int(base.file.tensors[base.gguf_name(h)].type)  # noqa: E731
    else:
        st = _SafetensorsIndex(base.path)
        shapes = {h: base.shape(h) for h in base.hf_names()}  # a stack of per-expert tensors too
        rows_of = lambda h, rows, cols: st.rows(base.file_name(h), rows, cols)  # noqa: E731
        type_of = lambda h: st.ggml_type(base.file_name(h))  # noqa: E731
    structure = hashlib.sha256(json.dumps([spec.arch, [[h, list(s)] for h, s in shapes.items()]]).encode()).hexdigest()
    parts, types = [], []
    for h in sampled_tensors(spec):
        rows, cols = _plan(h, shapes[h])
        parts.append(_finish([r[:cols] for r in rows_of(h, rows, cols)]))
        types.append(type_of(h))
    return Fingerprint(structure, np.concatenate(parts), tuple(types))


def _gguf_rows(base, hf_name: str, rows: list[int], cols: int) -> list[np.ndarray]:
    f, spec = base.file, base.spec
    t = f.tensors[base.gguf_name(hf_name)]
    arch = spec.arch_module
    if arch.permutes_rows(spec, hf_name):  # GGUF row j holds HF row perm[j]
        where = np.argsort(arch.rows_to_gguf(spec, hf_name, np.arange(t.shape[0])))
        rows = [int(where[r]) for r in rows]
    block, type_size = GGML_QUANT_SIZES[t.type]
    row_bytes = t.nbytes * t.shape[-1] // t.n_elements  # a vector is one row
    n_take = -(-cols // block) * block
    raw = f.raw(t.name)
    out = []
    for r in rows:
        chunk = raw[r * row_bytes: r * row_bytes + n_take // block * type_size]
        out.append(decode(chunk, t.type, (-1,), f"{f.path}: tensor {t.name}"))
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

    def ggml_type(self, name: str) -> int:
        return {"F16": 1, "BF16": 30}.get(self.entries[name][1]["dtype"], 0)  # F64/F32: exact as F32

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
    weights at another precision or quantization / different shapes / different weights (another model or
    a fine-tune of it). LORA2GGUF_ALLOW_BASE_MISMATCH=1 turns "different weights" into a match, saying so."""
    if recorded.structure != actual.structure:
        return {"match": False, "verdict": "different model (tensor names or shapes differ)", "min_correlation": None}
    if recorded.sample.shape != actual.sample.shape:
        return {"match": False, "verdict": "different fingerprint layout", "min_correlation": None}
    a = recorded.sample.reshape(-1, PER_TENSOR).astype(np.float64)
    b = actual.sample.reshape(-1, PER_TENSOR).astype(np.float64)
    corr = [_correlation(x, y) for x, y in zip(a, b)]
    out = {"min_correlation": round(min(corr), 4)}
    if recorded.types is not None and actual.types is not None and len(recorded.types) == len(a) == len(actual.types):
        # the excess of each tensor's difference over what the two types' rounding explains (> 1: too far)
        excess = [_rel_diff(x, y) / max(_rounding(tx) + _rounding(ty), 1e-7)
                  for x, y, tx, ty in zip(a, b, recorded.types, actual.types)]
        out["max_difference_vs_rounding"] = round(max(excess), 4)
        same = max(excess) <= 1.0
    else:
        same = min(corr) >= MIN_CORRELATION
    if recorded.digest == actual.digest:
        verdict = "same weights (equal at float16 precision)"
    elif same:
        verdict = "same weights at another precision or quantization"
    else:
        verdict = ("different weights (same shapes: another model, or a fine-tune such as the instruct version "
                   "of the base): the adapter was made for another model")
        if os.environ.get(OVERRIDE, "") not in ("", "0"):
            verdict += f"; accepted because {OVERRIDE} is set"
            same = True
        else:
            verdict += f"; if it is the same base rounded differently, set {OVERRIDE}=1"
    return {"match": same, "verdict": verdict, **out}


def _correlation(x: np.ndarray, y: np.ndarray) -> float:
    if np.array_equal(x, y):
        return 1.0
    sx, sy = x.std(), y.std()
    return 0.0 if sx == 0 or sy == 0 else float(((x - x.mean()) * (y - y.mean())).mean() / (sx * sy))


def _rel_diff(x: np.ndarray, y: np.ndarray) -> float:
    """RMS of the difference relative to the RMS of the values (0 for equal samples)."""
    if np.array_equal(x, y):
        return 0.0
    scale = max(np.sqrt((x * x).mean()), np.sqrt((y * y).mean()), 1e-30)
    return float(np.sqrt(((x - y) ** 2).mean()) / scale)


def _rounding(ggml_type: int) -> float:
    return ROUNDING.get(ggml_type, UNKNOWN_ROUNDING)
