"""parity.metrics: the tallies fed a block of positions at a time give the plain formulas' numbers on whole
arrays (log_softmax of every row), whatever the blocks; a view read by several tallies is normalized once."""

import numpy as np
import pytest

from lora2gguf.parity import metrics
from lora2gguf.parity.metrics import (
    SUB_ROWS,
    CarriedTally,
    PairTally,
    PerplexityTally,
    Rows,
    carried_fraction,
    compare,
    kl_per_position,
    log_softmax,
    perplexity,
)


def views(seed: int = 0, n: int = 40, vocab: int = 50_000) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((n, vocab)).astype(np.float32) * 4
    return [base + rng.standard_normal((n, vocab)).astype(np.float32) * s for s in (0.0, 0.01, 0.02, 0.03)]


def plain_kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """The formula, row by row, nothing shared."""
    lp, lq = log_softmax(p), log_softmax(q)
    return np.array([float(np.exp(lp[i]) @ (lp[i] - lq[i])) for i in range(len(p))])


def plain_perplexity(logits: np.ndarray, tokens: np.ndarray) -> float:
    lp = log_softmax(logits[:-1])
    return float(np.exp(-lp[np.arange(len(lp)), tokens[1:]].mean()))


def plain_carried(base_ref, ref, base_alone, merged) -> float:
    lr = log_softmax(ref)
    p = np.exp(lr)
    da, dm = lr - log_softmax(base_ref), log_softmax(merged) - log_softmax(base_alone)
    da -= (p * da).sum(-1, keepdims=True)
    dm -= (p * dm).sum(-1, keepdims=True)
    return float((p * da * dm).sum() / (p * da * da).sum())


def test_whole_array_metrics_are_the_plain_formulas():
    v = views()
    tokens = np.random.default_rng(1).integers(0, v[0].shape[1], len(v[0]))
    kl = kl_per_position(v[0], v[2])
    assert np.allclose(kl, plain_kl(v[0], v[2]), rtol=1e-9, atol=1e-15) and kl.min() > 0
    c = compare(v[0], v[2])
    assert c["mean_kl"] == pytest.approx(plain_kl(v[0], v[2]).mean(), rel=1e-9)
    assert c["top1"] == float((v[0].argmax(-1) == v[2].argmax(-1)).mean())
    assert c["max_abs_dlogit"] == float(np.abs(v[0].astype(np.float64) - v[2]).max())
    assert perplexity(v[3], tokens) == pytest.approx(plain_perplexity(v[3], tokens), rel=1e-12)
    frac, err = carried_fraction(*v)
    assert frac == pytest.approx(plain_carried(*v), rel=1e-9) and err > 0


def test_tallies_fed_by_blocks_give_the_whole_arrays_numbers():
    """verify's lockstep feeds blocks of any multiple of SUB_ROWS, then a short last one: the same numbers
    to the bit as the whole-array functions."""
    v = views(n=53)
    tokens = np.random.default_rng(2).integers(0, v[0].shape[1], 53)
    pair, ppl, carried = PairTally(), PerplexityTally(tokens), CarriedTally()
    for start in range(0, 53, 2 * SUB_ROWS):
        for s in range(start, min(start + 2 * SUB_ROWS, 53), SUB_ROWS):
            rows = [Rows(a[s: s + SUB_ROWS]) for a in v]
            pair.add(rows[0], rows[1])
            ppl.add(rows[3], s)
            carried.add(*rows)
    assert pair.summary() == compare(v[0], v[1])
    assert np.array_equal(pair.kl, kl_per_position(v[0], v[1]))
    assert ppl.value() == perplexity(v[3], tokens)
    assert carried.value() == carried_fraction(*v)


def test_a_block_is_normalized_once_however_many_tallies_read_it(monkeypatch):
    v = views(n=SUB_ROWS)
    rows = [Rows(a) for a in v]
    calls = []
    monkeypatch.setattr(metrics.np, "log", lambda x: calls.append(1) or np.log(x))
    a, b = PairTally(), PairTally()
    a.add(rows[0], rows[1])
    b.add(rows[0], rows[2])
    assert not calls, "the tallies use each block's normalizers, not their own"
    assert a.summary()["mean_kl"] > 0 and b.summary()["mean_kl"] > a.summary()["mean_kl"]
