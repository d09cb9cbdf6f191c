"""Distances between two models' logits on the same tokens: KL, top-1, perplexity, greedy agreement, and how much
of an adapter's effect a merged file carries. Logits are (tokens, vocab) arrays, or anything with their shape
that reads row slices (parity.spill.SpilledLogits): every metric here reads them a block of rows at a time."""

from __future__ import annotations

import weakref

import numpy as np


def _blocks(logits: np.ndarray):
    """Row slices of about a million logits each: every metric here works block by block in float64, so
    that its temporaries stay in cache and whole (tokens, vocab) float64 copies never exist (700 tokens of
    Gemma 3's 262k vocabulary: 1.5 GB each)."""
    n, vocab = logits.shape
    step = max(1, (1 << 20) // max(vocab, 1))
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def _argmax(logits) -> np.ndarray:
    return np.concatenate([logits[sl].argmax(-1) for sl in _blocks(logits)])


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max(-1, keepdims=True)
    x -= np.log(np.exp(x).sum(-1, keepdims=True))
    return x


_NORMALIZERS: dict[int, tuple[weakref.ref, np.ndarray, np.ndarray]] = {}


def _normalizers(logits) -> tuple[np.ndarray, np.ndarray]:
    """(max, log Σ exp(x − max)) of every row, float64 (rows, 1): log_softmax is (x − max) − the second, as
    log_softmax() computes it. Kept while a read-only view lives (verify's views never change once made):
    its exponentials are then summed once however many metrics read it (a Gemma 3 verify reads each
    700 × 262k view three to four times)."""
    key = id(logits)
    kept = _NORMALIZERS.get(key)
    if kept is not None and kept[0]() is logits:
        return kept[1], kept[2]
    m, lse = np.empty((len(logits), 1)), np.empty((len(logits), 1))
    for sl in _blocks(logits):
        x = logits[sl].astype(np.float64)
        m[sl] = x.max(-1, keepdims=True)
        x -= m[sl]
        lse[sl] = np.log(np.exp(x).sum(-1, keepdims=True))
    if getattr(getattr(logits, "flags", None), "writeable", False) is False:  # a read-only array or a spilled view
        try:
            _NORMALIZERS[key] = (weakref.ref(logits, lambda _, key=key: _NORMALIZERS.pop(key, None)), m, lse)
        except TypeError:  # not weakly referenceable: computed again next time
            pass
    return m, lse


def _log_softmax_rows(logits, sl: slice, norm: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """log_softmax(logits[sl]) from the rows' normalizers (the same operations, so the same bits)."""
    x = logits[sl].astype(np.float64)
    x -= norm[0][sl]
    x -= norm[1][sl]
    return x


def kl_per_position(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    """KL(P ‖ Q) at each position, in nats, computed in float64."""
    out = np.empty(len(p_logits))
    np_, nq = _normalizers(p_logits), _normalizers(q_logits)
    for sl in _blocks(p_logits):
        lp, lq = _log_softmax_rows(p_logits, sl, np_), _log_softmax_rows(q_logits, sl, nq)
        lq -= lp
        lq *= -1.0
        out[sl] = np.einsum("ij,ij->i", np.exp(lp), lq)
    return out


def compare(p_logits: np.ndarray, q_logits: np.ndarray) -> dict:
    """mean/median/max KL(P ‖ Q), top-1 agreement and max |Δlogit| between two (T, vocab) logit arrays."""
    if p_logits.shape != q_logits.shape:
        raise ValueError(f"logit shapes differ: {p_logits.shape} vs {q_logits.shape}")
    return _summary(p_logits, q_logits, kl_per_position(p_logits, q_logits))


def _summary(p_logits: np.ndarray, q_logits: np.ndarray, kl: np.ndarray) -> dict:
    dmax = max(float(np.abs(p_logits[sl].astype(np.float64) - q_logits[sl]).max()) for sl in _blocks(p_logits))
    return {
        "mean_kl": float(kl.mean()), "median_kl": float(np.median(kl)), "max_kl": float(kl.max()),
        "top1": float((_argmax(p_logits) == _argmax(q_logits)).mean()),
        "max_abs_dlogit": dmax,
    }


def expert_set_differs(a: dict[int, np.ndarray], b: dict[int, np.ndarray]) -> np.ndarray:
    """(layers, tokens) booleans, layers in order: where the set of chosen experts differs between two runs
    (a, b: layer → (tokens, n_expert_used) expert ids, any order within a row)."""
    if set(a) != set(b) or not a:
        raise ValueError(f"routing of different layers: {sorted(a)} vs {sorted(b)}")
    for layer in a:
        if a[layer].shape != b[layer].shape:
            raise ValueError(f"layer {layer}: routing of {a[layer].shape} vs {b[layer].shape} (tokens, experts)")
    return np.stack([(np.sort(a[i], -1) != np.sort(b[i], -1)).any(-1) for i in sorted(a)])


def expert_set_mismatch(a: dict[int, np.ndarray], b: dict[int, np.ndarray]) -> float:
    """Routing-aware parity for a mixture of experts: the share of tokens whose set of chosen experts differs
    in any layer between two runs (a, b: layer → (tokens, n_expert_used) expert ids, any order within a row).
    A near-tie in a router flips a choice on a few tokens, which is where a MoE's mean KL comes from: report
    it beside the median per-token KL (unmoved by a few flipped tokens) and the mean."""
    return float(expert_set_differs(a, b).any(0).mean())


def routed_compare(p_logits: np.ndarray, q_logits: np.ndarray, p_routing: dict[int, np.ndarray],
                   q_routing: dict[int, np.ndarray]) -> dict:
    """compare() and the routing of a mixture of experts: the share of tokens whose top-k expert set differs in
    any layer (a token counts once however many of its layers flipped), that share per layer, and the mean KL
    over the tokens routed alike at every layer (a flipped token's KL measures a router near-tie, not the
    weights: it is judged by the share, the others by their KL)."""
    if p_logits.shape != q_logits.shape:
        raise ValueError(f"logit shapes differ: {p_logits.shape} vs {q_logits.shape}")
    kl = kl_per_position(p_logits, q_logits)
    differs = expert_set_differs(p_routing, q_routing)
    if differs.shape[1] != len(kl):
        raise ValueError(f"routing of {differs.shape[1]} tokens for logits of {len(kl)}")
    agree = ~differs.any(0)
    return _summary(p_logits, q_logits, kl) | {
        "expert_set_mismatch": float(1 - agree.mean()), "expert_set_mismatch_per_layer": differs.mean(1).tolist(),
        "mean_kl_routing_agrees": float(kl[agree].mean()) if agree.any() else float("inf")}


def perplexity(logits: np.ndarray, tokens: np.ndarray) -> float:
    """Perplexity of tokens[1:] under logits[:-1]."""
    targets = np.asarray(tokens[1:])
    m, lse = _normalizers(logits)
    n = min(len(targets), len(logits))
    rows = np.arange(n)
    picked = np.array([logits[i][targets[i]] for i in rows], np.float64)  # a row read at a time (spilled views)
    lp = (picked - m[:n, 0]) - lse[:n, 0]  # log_softmax's own operations at the targets
    return float(np.exp((-lp).mean()))


def teacher_forced(logits_of, prompts: list[list[int]], conts: list[list[int]], logits=None) -> list[list[int]]:
    """Each view's greedy choice at every step of llama.cpp's own greedy continuation, in one evaluation
    per prompt (`logits_of(prompt + continuation)`, or those logits given): a view that picks the same token
    at every step would have generated the same text."""
    preds = []
    for i, (p, c) in enumerate(zip(prompts, conts)):
        lg = logits_of(p + c) if logits is None else logits[i]
        preds.append(lg[len(p) - 1: len(p) - 1 + len(c)].argmax(-1).tolist())
    return preds


def agreement(a: list[list[int]], b: list[list[int]], conts: list[list[int]]) -> dict:
    """Greedy agreement of two views from their teacher-forced choices on the same continuations: the
    common prefix ends where they choose differently, or after the first step where both left the
    continuation (past it the teacher-forced context is no longer what either would have generated)."""
    prefixes = []
    for x, y, c in zip(a, b, conts):
        n = 0
        for px, py, pc in zip(x, y, c):
            if px != py:
                break
            n += 1
            if px != pc:
                break
        prefixes.append(n)
    return {"identical": float(np.mean([n == len(c) for n, c in zip(prefixes, conts)])),
            "mean_common_prefix": float(np.mean(prefixes))}


def carried_fraction(base_ref: np.ndarray, ref: np.ndarray, base_alone: np.ndarray,
                     merged: np.ndarray) -> tuple[float, float]:
    """How much of the adapter's effect a merged file carries, 1 = all of it, 0 = none, and the standard
    error of that estimate. The change from the base alone to the merged file (both at the merged file's
    type, so the rounding mostly cancels) is projected on the adapter's change from base to reference.
    Changes are log-probability differences, centred and weighted by the reference's probabilities (the
    Fisher metric, under which a small change's squared length is twice its KL). Rounding noise is spread
    over every direction and averages out along the adapter's, over positions and vocabulary; the
    standard error (jackknife over blocks of positions) says when it did not."""
    nums, dens = [], []
    nr, nb, nm, na = (_normalizers(v) for v in (ref, base_ref, merged, base_alone))
    for i in range(0, len(ref), 16):  # (16, vocab) float64 at a time; one block of the jackknife
        sl = slice(i, i + 16)
        lr = _log_softmax_rows(ref, sl, nr)
        p = np.exp(lr)
        da = lr - _log_softmax_rows(base_ref, sl, nb)
        dm = _log_softmax_rows(merged, sl, nm) - _log_softmax_rows(base_alone, sl, na)
        da -= np.einsum("ij,ij->i", p, da)[:, None]  # centred: E_p[da] = 0
        dm -= np.einsum("ij,ij->i", p, dm)[:, None]
        p *= da  # p·da: the one product both sums share (no (16, vocab) temporaries beyond it)
        nums.append(float(np.einsum("ij,ij->", p, dm)))
        dens.append(float(np.einsum("ij,ij->", p, da)))
    num, den = np.array(nums), np.array(dens)
    if den.sum() <= 0:
        return float("nan"), float("nan")
    k = len(num)
    leave_out = (num.sum() - num) / np.maximum(den.sum() - den, 1e-300)
    return float(num.sum() / den.sum()), float(np.sqrt((k - 1) / k * ((leave_out - leave_out.mean()) ** 2).sum()))


CARRIED_RANGE = (0.25, 1.75)  # 0: the adapter is missing; 2: applied twice. Measured on the fixtures at a KL
# effect of 1/10 of q4_k_m's floor: true merges 0.51-1.38 (the rounding's projection on the adapter), the base alone 0
