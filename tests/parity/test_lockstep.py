"""parity.lockstep: views advanced together a block at a time give the whole arrays' measures to the bit,
a view under a second name (alias) is the same view, and views that disagree on a block's size stop the run."""

import numpy as np
import pytest

from lora2gguf.parity.lockstep import DECODE_BYTES, Tallies, block_rows, decode_rows, run
from lora2gguf.parity.metrics import SUB_ROWS, carried_fraction, compare, perplexity


def blocks(a: np.ndarray, rows: int):
    for i in range(0, len(a), rows):
        yield a[i: i + rows]


def test_decode_rows_are_whole_blocks_within_the_bound():
    assert decode_rows(262_144) == 32 and decode_rows(49_152) == 160 and decode_rows(300) == 256
    assert decode_rows(10_000_000) == block_rows(10_000_000)  # one block is already over the bound
    for vocab in (300, 32_000, 49_152, 151_936, 262_144):
        d = decode_rows(vocab)
        assert d % block_rows(vocab) == 0 and (d * vocab * 4 <= DECODE_BYTES or d == block_rows(vocab)) and d <= 256


def test_block_rows_bound_each_block():
    assert block_rows(262_144) == 16 and block_rows(49_152) == 80 and block_rows(300) == 256
    assert block_rows(10_000_000) == SUB_ROWS
    for vocab in (32_000, 128_256, 151_936, 262_144):
        assert block_rows(vocab) % SUB_ROWS == 0


def test_views_compared_as_they_are_made_give_the_whole_arrays_measures():
    rng = np.random.default_rng(0)
    n, vocab = 75, 3000
    base = rng.standard_normal((n, vocab)).astype(np.float32) * 3
    views = {k: base + rng.standard_normal((n, vocab)).astype(np.float32) * s
             for k, s in (("a", 0.0), ("b", 0.05), ("c", 0.1), ("d", 0.2))}
    tokens = rng.integers(0, vocab, n)
    tallies = Tallies(["a", "b", "e"], tokens, [("a", "b"), ("c", "e")], ("a", "b", "c", "e"), aliases={"e": "d"})
    run({k: blocks(v, 2 * SUB_ROWS) for k, v in views.items()}, tallies, n)
    assert tallies.pair("a", "b").summary() == compare(views["a"], views["b"])
    assert tallies.pair("c", "e").summary() == compare(views["c"], views["d"])
    assert tallies.perplexity["e"].value() == perplexity(views["d"], tokens)
    assert tallies.carried.value() == carried_fraction(views["a"], views["b"], views["c"], views["d"])
    assert compare(views["a"], views["b"])["mean_kl"] > 1e-4


def test_views_of_different_block_sizes_stop_the_run():
    a = np.zeros((64, 10), np.float32)
    with pytest.raises(RuntimeError, match="different sizes"):
        run({"a": blocks(a, 32), "b": blocks(a, 16)}, Tallies(["a"], np.zeros(64, int), [("a", "b")]), 64)
