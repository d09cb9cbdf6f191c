"""Logits kept on disk. verify holds up to seven views of (tokens, vocab) float32 logits: 734 MB each for 700
tokens of Gemma 3's 262k vocabulary, 1 GB each for 2048 tokens of Llama 3's 128k. A view over SPILL_BYTES is
written once to verify's temporary directory and read back a block of rows at a time, which is all
parity.metrics asks of a view (`shape`, `len`, row slices). Reads are plain reads into a fresh buffer, not a
memory map: a mapped page once read stays in the process's resident set until the map is closed.

The limit is high because writing costs: on this project's machines a file is written at ~100-150 MB/s, so
spilling Gemma 3's four 734 MB views at 700 tokens took peak RSS from 4.7 to 2.7 GB but added ~20 s to a
~45 s verify (BENCHMARKS.md, "verify")."""

from __future__ import annotations

from pathlib import Path

import numpy as np

SPILL_BYTES = 1 << 30  # smaller views stay in memory


class SpilledLogits:
    """A (rows, vocab) array in a raw file; indexing by a row or a slice of rows reads those rows."""

    def __init__(self, path: Path, shape: tuple[int, int], dtype=np.float32):
        self.path, self.shape, self.dtype = Path(path), tuple(shape), np.dtype(dtype)
        self.ndim = 2

    @classmethod
    def write(cls, arr: np.ndarray, path: Path) -> SpilledLogits:
        with open(path, "wb") as f:
            np.ascontiguousarray(arr).tofile(f)
        return cls(path, arr.shape, arr.dtype)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            k = int(key) + (len(self) if key < 0 else 0)
            return self[k:k + 1][0]
        start, stop, step = key.indices(len(self))
        if step != 1:
            raise IndexError("SpilledLogits reads contiguous rows only")
        out = np.empty((max(stop - start, 0), self.shape[1]), self.dtype)
        row = self.shape[1] * self.dtype.itemsize
        if not out.size:
            return out
        with open(self.path, "rb") as f:
            f.seek(start * row)
            f.readinto(memoryview(out).cast("B"))
        return out


def spill(arr: np.ndarray, path: Path, limit: int = SPILL_BYTES):
    """`arr` itself when small, else the same logits written to `path` (a SpilledLogits)."""
    return SpilledLogits.write(arr, path) if arr.nbytes > limit else arr
