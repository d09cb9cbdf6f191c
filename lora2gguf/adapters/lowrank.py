"""The low-rank math analyze, resize, extract and combine share, written once.

A LoRA update ΔW = s·B·A (B: (m, r), A: (r, n)) has at most r singular values, and they can be had
exactly without forming the m×n matrix: B = Q_b R_b and Aᵀ = Q_a R_a (thin QR), so
ΔW = Q_b (s·R_b R_aᵀ) Q_aᵀ and the SVD of the r×r core gives ΔW's: O((m+n)·r²) per module.
Truncating that SVD at k is the best rank-k approximation in Frobenius and spectral norm (Eckart–Young).
A dense ΔW (extract) goes through numpy's SVD when small and a randomized SVD (Halko, Martinsson &
Tropp 2011, with power iterations) when large. Everything here is float64.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from threadpoolctl import threadpool_limits

from lora2gguf.adapters.lora import ModuleLoRA
from lora2gguf.errors import Lora2GGUFError

# Above this smaller dimension a dense matrix is decomposed by randomized SVD (numpy's full SVD of a
# 2048×8192 matrix takes seconds; the randomized one at k ≪ 2048 a fraction of that).
DENSE_SVD_MAX = 1024
EPS32 = float(np.finfo(np.float32).eps)


def small_matrix_threads():
    """BLAS on one thread for the many small QR / r×r SVD calls: their work is microseconds, and waking a
    BLAS thread pool per call cost ~60× more on a loaded 2-core machine (scripts/bench_analyze.py)."""
    return threadpool_limits(1, user_api="blas")


def lowrank_svd(b: np.ndarray, a: np.ndarray, scale: float = 1.0, vectors: bool = True):
    """SVD of scale·b·a (b: (m, r), a: (r, n)) through QR of b and aᵀ and the SVD of the small core.
    vectors: (U (m, q), s (q,), Vt (q, n)); otherwise the singular values s only (descending)."""
    qb, rb = np.linalg.qr(np.asarray(b, np.float64))
    qa, ra = np.linalg.qr(np.asarray(a, np.float64).T)
    core = scale * (rb @ ra.T)
    if not vectors:
        return np.linalg.svd(core, compute_uv=False)
    uc, s, vct = np.linalg.svd(core, full_matrices=False)
    return qb @ uc, s, vct @ qa.T


def randomized_svd(m: np.ndarray, k: int, oversample: int = 10, n_iter: int = 4, seed: int = 0):
    """The top-k SVD of a dense matrix by randomized range finding with power iterations (re-orthonormalised
    each time, so small singular values are not lost to rounding). Exact (to rounding) when rank(m) ≤ k+oversample."""
    m = np.asarray(m, np.float64)
    p = min(k + oversample, *m.shape)
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(m @ rng.standard_normal((m.shape[1], p)))
    for _ in range(n_iter):
        q, _ = np.linalg.qr(m.T @ q)
        q, _ = np.linalg.qr(m @ q)
    ub, s, vt = np.linalg.svd(q.T @ m, full_matrices=False)
    return (q @ ub)[:, :k], s[:k], vt[:k]


def dense_svd(m: np.ndarray, k: int | None = None, energy: float | None = None, seed: int = 0):
    """Enough of the SVD of a dense matrix to truncate it at rank k or at an energy fraction: a randomized
    SVD for a rank k well below the matrix's size or for a matrix larger than DENSE_SVD_MAX (its rank
    doubling until it holds `energy` of ‖m‖_F², a total known without the spectrum), numpy's full SVD
    otherwise. Returns (U, s, Vt, total energy Σσ²)."""
    m = np.asarray(m, np.float64)
    total = float(np.einsum("ij,ij->", m, m))
    small_k = k is not None and (k + 10) * 4 <= min(m.shape)  # the top k alone: ~10x cheaper than all of them
    if min(m.shape) <= DENSE_SVD_MAX and not small_k:
        u, s, vt = np.linalg.svd(m, full_matrices=False)
        return u, s, vt, total
    want = k if k is not None else 32
    while True:
        u, s, vt = randomized_svd(m, min(want, min(m.shape)), seed=seed)
        if k is not None or want >= min(m.shape) or total == 0 or (s ** 2).sum() >= energy * total * (1 - 1e-12):
            return u, s, vt, total
        want *= 2


def numerical_rank(s: np.ndarray, shape: tuple[int, int]) -> int:
    """How many singular values stand above float32 rounding (numpy.linalg.matrix_rank's tolerance for a
    float32 matrix): what an adapter stored in float32 can actually hold."""
    if len(s) == 0 or s[0] == 0:
        return 0
    return int((s > s[0] * max(shape) * EPS32).sum())


def energy_curve(s: np.ndarray) -> np.ndarray:
    """Fraction of ‖ΔW‖_F² captured by the first k singular values, for k = 1..len(s)."""
    e = np.cumsum(np.asarray(s, np.float64) ** 2)
    return e / e[-1] if len(e) and e[-1] > 0 else np.ones_like(e)


def rank_for_energy(s: np.ndarray, energy: float, total: float | None = None) -> int:
    """The smallest k whose top-k singular values hold `energy` of the total (Σs² unless given: a dense
    matrix's ‖·‖_F² when only its top singular values are known)."""
    e = np.cumsum(np.asarray(s, np.float64) ** 2)
    total = e[-1] if total is None and len(e) else (total or 0.0)
    if total <= 0:
        return 0
    return int(min(np.searchsorted(e, energy * total * (1 - 1e-12)) + 1, len(e)))


def stable_rank(s: np.ndarray) -> float:
    """‖ΔW‖_F² / ‖ΔW‖₂²: how many directions carry the update, robust to tiny singular values."""
    return float((s ** 2).sum() / s[0] ** 2) if len(s) and s[0] > 0 else 0.0


def entropy_rank(s: np.ndarray) -> float:
    """Roy & Vetterli's effective rank: exp of the entropy of the normalised singular values σ_i / Σσ."""
    p = np.asarray(s, np.float64)
    if not len(p) or p.sum() <= 0:
        return 0.0
    p = p[p > 0] / p.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def spectral_norm(w: np.ndarray, tol: float = 1e-6, max_iter: int = 300, seed: int = 0) -> float:
    """‖w‖₂ by power iteration on wᵀw (a base weight's full SVD would cost ~50× more), to `tol` relative."""
    w = np.asarray(w, np.float64)
    v = np.random.default_rng(seed).standard_normal(w.shape[1])
    sigma = 0.0
    for _ in range(max_iter):
        u = w @ v
        n = np.linalg.norm(u)
        if n == 0:
            return 0.0
        v = w.T @ (u / n)
        new = float(np.linalg.norm(v))
        v /= new
        if abs(new - sigma) <= tol * new:
            return new
        sigma = new
    return sigma


# -- what analyze and inspect say of one update, and of a stack of experts --------------------------------
THRESHOLDS = (0.9, 0.99)  # the energy fractions whose ranks analyze reports
UNCHANGED = 1e-6  # an expert whose ‖ΔW_e‖_F is below this share of its stack's largest is unchanged (≈ 0): an
# expert no token was routed to in training keeps PEFT's zero-initialised B columns (0 exactly; 1e-6 leaves room
# for an adapter stored in float16)


def module_label(module: str) -> tuple[int | None, str]:
    """(layer, short module name): model.layers.3.self_attn.q_proj → (3, 'q_proj'); a stack of experts is named
    as its GGUF tensor: model.layers.3.mlp.experts.gate_proj → (3, 'gate_exps')."""
    m = re.fullmatch(r"model\.layers\.(\d+)\.(?:\w+\.)*?(experts\.)?(\w+)", module)
    if not m:
        return None, module.split(".")[-1]
    kind = m.group(3).removesuffix("_proj") + "_exps" if m.group(2) else m.group(3)
    return int(m.group(1)), kind


def spectrum_stats(b: np.ndarray, a: np.ndarray, scale: float) -> dict:
    """Everything analyze says of one update ΔW = scale·b·a, from its exact singular values (lowrank_svd)."""
    s = lowrank_svd(b, a, scale, vectors=False)
    out = {"fro": float(np.sqrt((s ** 2).sum())), "spectral": float(s[0]) if len(s) else 0.0,
           "numerical_rank": numerical_rank(s, (b.shape[0], a.shape[1])),
           "stable_rank": stable_rank(s), "entropy_rank": entropy_rank(s),
           "singular_values": s.tolist(), "energy": energy_curve(s).tolist()}
    for t in THRESHOLDS:
        out[f"rank_{round(t * 100)}"] = rank_for_energy(s, t)
    return out


def expert_stats(b: np.ndarray, a: np.ndarray, scale: float, w: np.ndarray | None = None) -> dict:
    """A stack of per-expert updates ΔW_e = scale·b[e]·a[e]: each expert's numbers (spectrum_stats, and ‖ΔW_e‖_F
    relative to its base weight W_e), which experts it changes (UNCHANGED), and the stack's numbers for the
    tables: ‖ΔW‖_F of the whole stack, ‖ΔW‖₂ the largest expert's, the ranks the mean over changed
    experts."""
    experts = [{"expert": e} | spectrum_stats(b[e], a[e], scale) for e in range(b.shape[0])]
    if w is not None:
        for x, we in zip(experts, w):
            x["rel_fro"] = x["fro"] / max(float(np.linalg.norm(we)), 1e-30)
    top = max(x["fro"] for x in experts)
    changed = [x for x in experts if top > 0 and x["fro"] > UNCHANGED * top]
    out = {"n_expert": len(experts), "experts": experts, "experts_changed": [x["expert"] for x in changed],
           "fro": float(np.sqrt(sum(x["fro"] ** 2 for x in experts))), "spectral": max(x["spectral"] for x in experts)}
    for key in ("numerical_rank", "rank_90", "rank_99", "stable_rank", "entropy_rank"):
        out[key] = float(np.mean([x[key] for x in changed])) if changed else 0.0
    if w is not None:
        big = max(experts, key=lambda x: x["spectral"])["expert"]  # one power iteration, not one per expert
        out["rel_fro"] = out["fro"] / max(float(np.linalg.norm(w)), 1e-30)
        out["rel_spectral"] = out["spectral"] / max(spectral_norm(w[big]), 1e-30)
    return out


def experts_overview(stats: list[dict]) -> dict:
    """Which experts the adapter changes, over its stacks of expert LoRA: those changed in some stack, and in
    every one (empty for an adapter without expert LoRA)."""
    stacks = [set(x["experts_changed"]) for x in stats if "experts" in x]
    if not stacks:
        return {}
    return {"n_expert": max(x["n_expert"] for x in stats if "experts" in x),
            "experts_changed": sorted(set.union(*stacks)),
            "experts_changed_everywhere": sorted(set.intersection(*stacks))}


@dataclass
class Truncation:
    """A rank-k factorization b @ a of the best rank-k approximation of an update, and what it keeps."""
    b: np.ndarray  # (m, k)
    a: np.ndarray  # (k, n)
    k: int
    energy_kept: float  # Σ_{i≤k} σ_i² / Σσ²
    sq_total: float  # Σσ² (= ‖ΔW‖_F²)


def truncate(u: np.ndarray, s: np.ndarray, vt: np.ndarray, k: int, sq_total: float | None = None) -> Truncation:
    """Keep the top k singular triplets; √σ goes into each factor so that neither dominates in float32."""
    k = int(min(k, len(s)))
    total = float((s ** 2).sum()) if sq_total is None else sq_total
    root = np.sqrt(s[:k])
    kept = float((s[:k] ** 2).sum() / total) if total > 0 else 1.0
    return Truncation((u[:, :k] * root).astype(np.float32), (root[:, None] * vt[:k]).astype(np.float32), k,
                      kept, total)


def choose_rank(s: np.ndarray, shape: tuple[int, int], rank: int | None, energy: float | None,
                sq_total: float | None = None) -> int:
    """Per-module rank for --rank K (capped at what the update holds above float32 rounding, so K above the
    true rank is exact and adds nothing) or --energy E (the smallest k reaching E)."""
    held = numerical_rank(s, shape)
    if rank is not None:
        return min(rank, held)
    return min(rank_for_energy(s, energy, sq_total), held)


def module_factors(m: ModuleLoRA) -> tuple[np.ndarray, np.ndarray]:
    """(b, a) with scale·b@a = the module's ΔW in the base weight's layout (out, in)."""
    a, b = m.factors()
    return b, a


def module_from_factors(module: str, embedding: bool, b: np.ndarray, a: np.ndarray) -> ModuleLoRA:
    """A plain LoRA module (scale 1, alpha = rank) whose ΔW is b @ a in the base weight's layout; the
    embedding's pair goes back into PEFT's lora_embedding_A (r, vocab) / lora_embedding_B (dim, r)."""
    k = int(a.shape[0])
    if embedding:
        A, B = np.ascontiguousarray(b.T), np.ascontiguousarray(a.T)
    else:
        A, B = np.ascontiguousarray(a), np.ascontiguousarray(b)
    return ModuleLoRA(module, A.astype(np.float32), B.astype(np.float32), k, float(k), 1.0, embedding=embedding)


def check_target(rank: int | None, energy: float | None) -> None:
    """Exactly one of --rank K (≥ 1) / --energy E (0 < E ≤ 1)."""
    if (rank is None) == (energy is None):
        raise Lora2GGUFError("give exactly one of --rank K or --energy E")
    if rank is not None and rank < 1:
        raise Lora2GGUFError(f"--rank {rank}: the rank must be at least 1")
    if energy is not None and not 0 < energy <= 1:
        raise Lora2GGUFError(f"--energy {energy}: the energy is a fraction in (0, 1], e.g. 0.99")
