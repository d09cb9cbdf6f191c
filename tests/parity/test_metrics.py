"""parity.metrics: a read-only view's row normalizers are computed once and give the bits of the plain
formulas (log_softmax of each block); a writable array is never served stale ones."""

import gc

import numpy as np

from lora2gguf.parity import metrics
from lora2gguf.parity.metrics import carried_fraction, compare, kl_per_position, log_softmax, perplexity


def views(seed: int = 0, n: int = 40, vocab: int = 50_000) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((n, vocab)).astype(np.float32) * 4
    return [base + rng.standard_normal((n, vocab)).astype(np.float32) * s for s in (0.0, 0.01, 0.02, 0.03)]


def plain_kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """The formula, one block of rows at a time as metrics reads them, nothing kept."""
    out = np.empty(len(p))
    for sl in metrics._blocks(p):
        lp, lq = log_softmax(p[sl]), log_softmax(q[sl])
        out[sl] = np.einsum("ij,ij->i", np.exp(lp), -(lq - lp))
    return out


def plain_perplexity(logits: np.ndarray, tokens: np.ndarray) -> float:
    lp = log_softmax(logits[:-1])
    return float(np.exp(-lp[np.arange(len(lp)), tokens[1:]].mean()))


def read_only(a: np.ndarray) -> np.ndarray:
    a = a.copy()
    a.flags.writeable = False
    return a


def test_kept_normalizers_give_the_same_bits():
    v = views()
    tokens = np.random.default_rng(1).integers(0, v[0].shape[1], len(v[0]))
    ro = [read_only(a) for a in v]
    assert np.array_equal(kl_per_position(ro[0], ro[1]), plain_kl(v[0], v[1]))
    assert np.array_equal(kl_per_position(v[0], v[1]), plain_kl(v[0], v[1]))
    assert compare(ro[0], ro[2]) == compare(v[0], v[2])
    assert perplexity(ro[3], tokens) == plain_perplexity(v[3], tokens) == perplexity(v[3], tokens)
    assert carried_fraction(*ro) == carried_fraction(*v)
    assert kl_per_position(ro[0], ro[1]).min() > 0


def test_a_read_only_view_is_normalized_once_and_forgotten_with_it(monkeypatch):
    a = read_only(views()[1])
    first = metrics._normalizers(a)
    calls = []
    monkeypatch.setattr(metrics, "_blocks", lambda x: calls.append(1) or [slice(0, len(x))])
    assert metrics._normalizers(a)[1] is first[1] and not calls
    key = id(a)
    del a
    gc.collect()
    assert key not in metrics._NORMALIZERS


def test_a_writable_array_is_never_served_stale_normalizers():
    p, q = views()[:2]
    before = kl_per_position(p, q)
    q *= 2.0  # changed in place, same object
    after = kl_per_position(p, q)
    assert np.array_equal(after, plain_kl(p, q)) and not np.array_equal(before, after)
