"""bitsandbytes' NF4 rounding in numpy, to measure what a QLoRA adapter's 4-bit training base leaves out.

A QLoRA / Unsloth adapter was fitted to NF4(W), not W. `verify` runs the reference once more on a base whose
projection weights are NF4-rounded as bitsandbytes' Linear4bit stores them (quantize_4bit, quant_type "nf4",
blocksize 64 over the flattened weight, one absmax per block, embeddings and norms untouched) and reports
how far that is from the reference on your base. bitsandbytes' double quantization (the absmax values
themselves stored in 8 bits) is not modelled: it moves each block's scale by well under 1%.
"""

from __future__ import annotations

import re

import numpy as np

BLOCK = 64
# bitsandbytes functional.get_4bit_type("nf4"): the 16 levels of the QLoRA paper
CODE = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                 -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                 0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                 0.7229568362236023, 1.0], dtype=np.float32)
_MIDPOINTS = (CODE[1:] + CODE[:-1]) / 2
_PROJECTION = re.compile(r"model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight$")


def nf4_round(w: np.ndarray) -> np.ndarray:
    """w → dequantize(quantize_4bit(w, "nf4", blocksize 64)): each value the nearest level × its block's absmax."""
    flat = w.astype(np.float32).reshape(-1)
    pad = (-flat.size) % BLOCK
    blocks = np.concatenate([flat, np.zeros(pad, np.float32)]).reshape(-1, BLOCK)
    absmax = np.abs(blocks).max(axis=1, keepdims=True)
    scale = np.where(absmax == 0, 1.0, absmax)
    idx = np.searchsorted(_MIDPOINTS, blocks / scale)
    out = (CODE[idx] * absmax).reshape(-1)
    return out[: flat.size].reshape(w.shape)


class NF4Base:
    """A base (base.open_base's object) whose decoder projections read back NF4-rounded."""

    def __init__(self, base):
        self._base = base

    def __getattr__(self, name):
        return getattr(self._base, name)

    def tensor(self, hf_name: str) -> np.ndarray:
        t = self._base.tensor(hf_name)
        return nf4_round(t) if _PROJECTION.search(hf_name) else t

