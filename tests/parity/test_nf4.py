"""nf4: bitsandbytes' NF4 rounding in numpy.

bitsandbytes is not in the test extras (a 43 MB wheel for one cross-check; the `formats` extra has it): where
it is importable, test_matches_bitsandbytes compares with its own quantize_4bit / dequantize_4bit on CPU (run
once here with bitsandbytes 0.50.2 unpacked beside the venv: identical on all three shapes); elsewhere the
hand-worked block and the properties below hold the rounding to the NF4 definition."""

import numpy as np
import pytest

from lora2gguf.parity.nf4 import BLOCK, CODE, nf4_round


def test_hand_worked_block():
    """absmax 0.8, so the values are 0.5, -0.125, 0, -1 of it: 0.5 lies between the levels 0.4407 and 0.5626,
    nearer the first (0.059 vs 0.063); -0.125 between -0.0911 and -0.1848, nearer the first (0.034 vs 0.060)."""
    w = np.zeros(BLOCK, np.float32)
    w[:4] = [0.4, -0.1, 0.0, -0.8]
    got = nf4_round(w)
    assert got[:4] == pytest.approx([0.44070982933044434 * 0.8, -0.09105003625154495 * 0.8, 0.0, -0.8])
    assert np.all(got[4:] == 0)


def test_properties():
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((48, 100)) * 0.05).astype(np.float32)  # 4800 values: the last block is partial
    got = nf4_round(w)
    assert got.shape == w.shape and np.array_equal(nf4_round(got), got), "rounding twice changes nothing"
    flat, gflat = w.reshape(-1), got.reshape(-1)
    for start in range(0, flat.size, BLOCK):
        block, gb = flat[start:start + BLOCK], gflat[start:start + BLOCK]
        absmax = np.abs(block).max()
        levels = CODE * absmax
        assert np.isclose(np.abs(gb).max(), absmax), "the block's largest value is kept"
        assert np.all(np.isclose(gb[:, None], levels[None, :], rtol=0, atol=1e-7).any(axis=1))
        nearest = levels[np.abs(block[:, None] - levels[None, :]).argmin(axis=1)]
        assert np.allclose(gb, nearest, atol=1e-7)


def test_matches_bitsandbytes():
    F = pytest.importorskip("bitsandbytes.functional")
    import torch

    rng = np.random.default_rng(1)
    for shape in [(128, 64), (96, 200), (7, 33)]:
        w = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        q, st = F.quantize_4bit(torch.from_numpy(w), blocksize=64, quant_type="nf4", compress_statistics=False)
        assert np.array_equal(nf4_round(w), F.dequantize_4bit(q, st).numpy()), shape
