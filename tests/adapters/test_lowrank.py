"""The shared low-rank math against numpy's SVD of the dense matrix (the truth)."""

import numpy as np
import pytest

from lora2gguf.adapters import lowrank


def factors(m, n, r, seed=0, decay=0.5):
    rng = np.random.default_rng(seed)
    b = rng.standard_normal((m, r)) * decay ** np.arange(r)
    return b.astype(np.float32), rng.standard_normal((r, n)).astype(np.float32)


@pytest.mark.parametrize("shape", [(64, 48, 8), (40, 200, 16), (10, 30, 16)], ids=["tall", "wide", "r>m"])
def test_lowrank_svd_matches_dense(shape):
    m, n, r = shape
    b, a = factors(m, n, r)
    dense = 0.7 * b.astype(np.float64) @ a
    want = np.linalg.svd(dense, compute_uv=False)
    u, s, vt = lowrank.lowrank_svd(b, a, 0.7)
    q = min(len(s), len(want))
    np.testing.assert_allclose(s[:q], want[:q], rtol=1e-10, atol=1e-12 * want[0])
    np.testing.assert_allclose((u * s) @ vt, dense, atol=1e-10 * want[0])
    np.testing.assert_allclose(lowrank.lowrank_svd(b, a, 0.7, vectors=False), s, rtol=1e-12)


def test_truncation_is_eckart_young():
    b, a = factors(80, 60, 12, seed=1)
    dense = b.astype(np.float64) @ a
    U, S, Vt = np.linalg.svd(dense, full_matrices=False)
    for k in (1, 4, 11):
        t = lowrank.truncate(*lowrank.lowrank_svd(b, a), k)
        best = (U[:, :k] * S[:k]) @ Vt[:k]
        np.testing.assert_allclose(t.b.astype(np.float64) @ t.a, best, atol=1e-5 * S[0])
        assert t.energy_kept == pytest.approx((S[:k] ** 2).sum() / (S ** 2).sum(), rel=1e-10)
        # the error is exactly the discarded spectrum (Frobenius)
        err = np.linalg.norm(dense - t.b.astype(np.float64) @ t.a)
        assert err == pytest.approx(np.sqrt((S[k:] ** 2).sum()), rel=1e-4)


def test_energy_and_effective_ranks():
    s = np.array([4.0, 2.0, 1.0, 0.0])
    e = lowrank.energy_curve(s)
    np.testing.assert_allclose(e, np.cumsum(s ** 2) / 21.0)
    assert lowrank.rank_for_energy(s, 0.76) == 1 and lowrank.rank_for_energy(s, 0.77) == 2
    assert lowrank.rank_for_energy(s, 0.99) == 3 and lowrank.rank_for_energy(s, 1.0) == 3
    assert lowrank.stable_rank(s) == pytest.approx(21 / 16)
    p = np.array([4, 2, 1]) / 7
    assert lowrank.entropy_rank(s) == pytest.approx(np.exp(-(p * np.log(p)).sum()))
    assert lowrank.entropy_rank(np.ones(5)) == pytest.approx(5.0)
    assert lowrank.rank_for_energy(np.zeros(3), 0.9) == 0 and lowrank.stable_rank(np.zeros(3)) == 0.0


def test_numerical_rank_drops_only_rounding():
    b, a = factors(50, 40, 6, seed=2, decay=1.0)
    padded_b = np.concatenate([b, np.zeros((50, 4), np.float32)], 1)
    padded_a = np.concatenate([a, np.random.default_rng(3).standard_normal((4, 40)).astype(np.float32)], 0)
    s = lowrank.lowrank_svd(padded_b, padded_a, vectors=False)
    assert lowrank.numerical_rank(s, (50, 40)) == 6
    assert lowrank.choose_rank(s, (50, 40), 16, None) == 6 and lowrank.choose_rank(s, (50, 40), 3, None) == 3


def test_randomized_svd_matches_numpy():
    rng = np.random.default_rng(4)
    m = (rng.standard_normal((1500, 20)) * 0.7 ** np.arange(20)) @ rng.standard_normal((20, 1300))
    m += 1e-3 * rng.standard_normal(m.shape)  # full rank, decaying: the case randomized SVD must get right
    S = np.linalg.svd(m, compute_uv=False)
    u, s, vt = lowrank.randomized_svd(m, 10)
    np.testing.assert_allclose(s, S[:10], rtol=1e-6)
    U, s2, Vt, total = lowrank.dense_svd(m, energy=0.999)
    assert total == pytest.approx((S ** 2).sum(), rel=1e-10)
    k = lowrank.rank_for_energy(s2, 0.999, total)
    assert k == lowrank.rank_for_energy(S, 0.999)
    np.testing.assert_allclose(s2[:k], S[:k], rtol=1e-6)


def test_spectral_norm():
    w = np.random.default_rng(5).standard_normal((300, 200))
    assert lowrank.spectral_norm(w) == pytest.approx(np.linalg.norm(w, 2), rel=1e-4)


def test_check_target():
    from lora2gguf.errors import Lora2GGUFError

    for rank, energy in ((None, None), (4, 0.9), (0, None), (None, 1.5), (None, 0.0)):
        with pytest.raises(Lora2GGUFError):
            lowrank.check_target(rank, energy)
    lowrank.check_target(4, None)
    lowrank.check_target(None, 1.0)


def test_dense_svd_small_rank_takes_the_randomized_path(monkeypatch):
    rng = np.random.default_rng(6)
    m = (rng.standard_normal((200, 12)) * 0.6 ** np.arange(12)) @ rng.standard_normal((12, 180))
    calls = []
    monkeypatch.setattr(lowrank, "randomized_svd", lambda *a, **k: calls.append(1) or randomized(*a, **k))
    u, s, vt, total = lowrank.dense_svd(m, k=5)
    assert calls and len(s) == 5
    S = np.linalg.svd(m, compute_uv=False)
    np.testing.assert_allclose(s, S[:5], rtol=1e-8)
    assert total == pytest.approx((S ** 2).sum(), rel=1e-12)


randomized = lowrank.randomized_svd
