"""Distances between two models' logits on the same tokens: KL, top-1, perplexity, greedy agreement, and how much
of an adapter's effect a merged file carries.

Every metric is a sum over positions, so each is a tally fed a block of positions at a time (Rows: one
block of one view, with its row normalizers): verify feeds them as llama.cpp and the reference make each
block (parity.lockstep), never holding a whole (tokens, vocab) view. compare / perplexity /
carried_fraction are the same tallies over whole arrays."""

from __future__ import annotations

import numpy as np

SUB_ROWS = 16  # positions per step of every tally: carried_fraction's jackknife block; (16, vocab) float64 temporaries


def _blocks(n: int):
    return [slice(i, min(i + SUB_ROWS, n)) for i in range(0, n, SUB_ROWS)]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max(-1, keepdims=True)
    x -= np.log(np.exp(x).sum(-1, keepdims=True))
    return x


class Rows:
    """A block of one view's logits (rows, vocab) float32 with what every tally reads of it, computed once
    however many tallies read it: each row's max and log Σ exp(x − max) (float64) and its argmax."""
    __slots__ = ("x", "m", "lse", "argmax")

    def __init__(self, x: np.ndarray):
        self.x = x
        y = x.astype(np.float64)
        self.m = y.max(-1, keepdims=True)
        y -= self.m
        self.lse = np.log(np.exp(y, out=y).sum(-1, keepdims=True))  # in place: one (rows, vocab) float64 array
        self.argmax = x.argmax(-1)

    def log_softmax(self) -> np.ndarray:
        """log_softmax(x) from the normalizers: log_softmax()'s own operations, so its bits."""
        y = self.x.astype(np.float64)
        y -= self.m
        y -= self.lse
        return y


class PairTally:
    """compare(P, Q) fed a block at a time: KL(P ‖ Q) at each position (nats, float64), top-1 agreement and
    the largest |Δlogit|."""

    def __init__(self):
        self._kl, self._agree, self.max_abs_dlogit = [], [], 0.0

    def add(self, p: Rows, q: Rows) -> None:
        lp, lq = p.log_softmax(), q.log_softmax()
        lq -= lp
        lq *= -1.0
        self._kl.append(np.einsum("ij,ij->i", np.exp(lp, out=lp), lq))  # in place: no third (rows, vocab) array
        del lp, lq
        self._agree.append(p.argmax == q.argmax)
        d = p.x.astype(np.float64)
        d -= q.x
        self.max_abs_dlogit = max(self.max_abs_dlogit, float(np.abs(d, out=d).max()))

    @property
    def kl(self) -> np.ndarray:
        return np.concatenate(self._kl)

    def summary(self) -> dict:
        kl = self.kl
        return {"mean_kl": float(kl.mean()), "median_kl": float(np.median(kl)), "max_kl": float(kl.max()),
                "top1": float(np.concatenate(self._agree).mean()), "max_abs_dlogit": self.max_abs_dlogit}


class PerplexityTally:
    """Perplexity of tokens[1:] under a view's logits[:-1], fed a block at a time (`start`: its first position)."""

    def __init__(self, tokens):
        self.targets, self._lp = np.asarray(tokens)[1:], []

    def add(self, rows: Rows, start: int) -> None:
        n = min(len(rows.x), len(self.targets) - start)
        if n <= 0:
            return
        picked = rows.x[np.arange(n), self.targets[start: start + n]].astype(np.float64)
        self._lp.append((picked - rows.m[:n, 0]) - rows.lse[:n, 0])  # log_softmax's own operations at the targets

    def value(self) -> float:
        return float(np.exp((-np.concatenate(self._lp)).mean()))


class CarriedTally:
    """How much of an adapter's effect a merged file carries, 1 = all of it, 0 = none, with the standard error
    of that estimate, fed a block of SUB_ROWS positions at a time (one block of the jackknife). The change
    from the base alone to the merged file (both at the merged file's type, so the rounding mostly cancels)
    is projected on the adapter's change from base to reference. Changes are log-probability differences,
    centred and weighted by the reference's probabilities (the Fisher metric, under which a small change's
    squared length is twice its KL). Rounding noise is spread over every direction and averages out along
    the adapter's, over positions and vocabulary; the standard error (jackknife over blocks of positions)
    says when it did not."""

    def __init__(self):
        self._num, self._den = [], []

    def add(self, base_ref: Rows, ref: Rows, base_alone: Rows, merged: Rows) -> None:
        lr = ref.log_softmax()
        p = np.exp(lr)
        da = base_ref.log_softmax()  # the differences in place: the same values, fewer (rows, vocab) arrays
        np.subtract(lr, da, out=da)
        dm = merged.log_softmax()
        dm -= base_alone.log_softmax()
        da -= np.einsum("ij,ij->i", p, da)[:, None]  # centred: E_p[da] = 0
        dm -= np.einsum("ij,ij->i", p, dm)[:, None]
        p *= da  # p·da: the one product both sums share (no (rows, vocab) temporaries beyond it)
        self._num.append(float(np.einsum("ij,ij->", p, dm)))
        self._den.append(float(np.einsum("ij,ij->", p, da)))

    def value(self) -> tuple[float, float]:
        num, den = np.array(self._num), np.array(self._den)
        if den.sum() <= 0:
            return float("nan"), float("nan")
        k = len(num)
        leave_out = (num.sum() - num) / np.maximum(den.sum() - den, 1e-300)
        return float(num.sum() / den.sum()), float(np.sqrt((k - 1) / k * ((leave_out - leave_out.mean()) ** 2).sum()))


def _pair(p_logits: np.ndarray, q_logits: np.ndarray) -> PairTally:
    if p_logits.shape != q_logits.shape:
        raise ValueError(f"logit shapes differ: {p_logits.shape} vs {q_logits.shape}")
    t = PairTally()
    for sl in _blocks(len(p_logits)):
        t.add(Rows(p_logits[sl]), Rows(q_logits[sl]))
    return t


def kl_per_position(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    """KL(P ‖ Q) at each position, in nats, computed in float64."""
    return _pair(p_logits, q_logits).kl


def compare(p_logits: np.ndarray, q_logits: np.ndarray) -> dict:
    """mean/median/max KL(P ‖ Q), top-1 agreement and max |Δlogit| between two (T, vocab) logit arrays."""
    return _pair(p_logits, q_logits).summary()


def perplexity(logits: np.ndarray, tokens: np.ndarray) -> float:
    """Perplexity of tokens[1:] under logits[:-1]."""
    t = PerplexityTally(tokens)
    for sl in _blocks(len(logits)):
        t.add(Rows(logits[sl]), sl.start)
    return t.value()


def carried_fraction(base_ref: np.ndarray, ref: np.ndarray, base_alone: np.ndarray,
                     merged: np.ndarray) -> tuple[float, float]:
    """CarriedTally over four whole (T, vocab) views: (fraction, standard error)."""
    t = CarriedTally()
    for sl in _blocks(len(ref)):
        t.add(*(Rows(v[sl]) for v in (base_ref, ref, base_alone, merged)))
    return t.value()


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
    """compare() and the routing of a mixture of experts (routed_summary)."""
    return routed_summary(_pair(p_logits, q_logits), p_routing, q_routing)


def routed_summary(pair: PairTally, p_routing: dict[int, np.ndarray], q_routing: dict[int, np.ndarray]) -> dict:
    """A pair's summary and the routing of a mixture of experts: the share of tokens whose top-k expert set
    differs in any layer (a token counts once however many of its layers flipped), that share per layer, and
    the mean KL over the tokens routed alike at every layer (a flipped token's KL measures a router near-tie,
    not the weights: it is judged by the share, the others by their KL)."""
    kl = pair.kl
    differs = expert_set_differs(p_routing, q_routing)
    if differs.shape[1] != len(kl):
        raise ValueError(f"routing of {differs.shape[1]} tokens for logits of {len(kl)}")
    agree = ~differs.any(0)
    return pair.summary() | {
        "expert_set_mismatch": float(1 - agree.mean()), "expert_set_mismatch_per_layer": differs.mean(1).tolist(),
        "mean_kl_routing_agrees": float(kl[agree].mean()) if agree.any() else float("inf")}


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


CARRIED_RANGE = (0.25, 1.75)  # 0: the adapter is missing; 2: applied twice. Measured on the fixtures at a KL
# effect of 1/10 of q4_k_m's floor: true merges 0.51-1.38 (the rounding's projection on the adapter), the base alone 0
