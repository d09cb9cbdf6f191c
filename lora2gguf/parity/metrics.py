"""Distances between two models' logits on the same tokens."""

from __future__ import annotations

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def kl_per_position(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    """KL(P ‖ Q) at each position, in nats, computed in float64."""
    lp, lq = log_softmax(p_logits), log_softmax(q_logits)
    return (np.exp(lp) * (lp - lq)).sum(-1)


def compare(p_logits: np.ndarray, q_logits: np.ndarray) -> dict:
    """mean/max KL(P ‖ Q), top-1 agreement and max |Δlogit| between two (T, vocab) logit arrays."""
    if p_logits.shape != q_logits.shape:
        raise ValueError(f"logit shapes differ: {p_logits.shape} vs {q_logits.shape}")
    kl = kl_per_position(p_logits, q_logits)
    return {
        "mean_kl": float(kl.mean()), "max_kl": float(kl.max()),
        "top1": float((p_logits.argmax(-1) == q_logits.argmax(-1)).mean()),
        "max_abs_dlogit": float(np.abs(p_logits.astype(np.float64) - q_logits).max()),
    }


def perplexity(logits: np.ndarray, tokens: np.ndarray) -> float:
    """Perplexity of tokens[1:] under logits[:-1]."""
    lp = log_softmax(logits[:-1])
    nll = -lp[np.arange(len(tokens) - 1), np.asarray(tokens[1:])]
    return float(np.exp(nll.mean()))
