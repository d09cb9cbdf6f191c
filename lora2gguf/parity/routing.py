"""How verify judges one pair of views against its floor, written once for dense models and mixtures of
experts. On a mixture of experts a router near-tie (two experts' probabilities within rounding) flips one
expert choice on a few tokens; such a token's KL can be 1e4 × the others' (measured: median 3e-8, mean 5.5e-4
on the tiny qwen3moe with an exact attention LoRA), and says nothing about the converted weights. So a pair is
judged by its median KL, its mean KL over the tokens routed alike in every layer, and the share of tokens
whose top-k expert set flipped, each against the same measures of the floor pair (the base alone at the
file's type, where the same near-ties flip)."""

from __future__ import annotations

ROUTING_SLACK = 0.02  # flipped share allowed beyond twice the floor's: a few near-ties on a short text

RULE = ("routing-aware (mixture of experts): a router near-tie flips an expert on a few tokens, and their KL says "
        "nothing about the weights;",
        "pass = median KL and KL|alike (mean KL over tokens routed alike in every layer) within the limit (1.5 × the "
        f"floor's + slack), flipped within its cap (2 × the floor's share + {ROUTING_SLACK:.0%})")


def judged_kl(m: dict) -> float:
    """The mean KL a threshold judges: over the tokens routed alike in every layer on a mixture of experts."""
    return m.get("mean_kl_routing_agrees", m["mean_kl"])


def judge_pair(m: dict, floor: dict, slack: float, max_kl: float | None) -> bool:
    """One pair's verdict, into m (compare's or routed_compare's measures), against its floor pair: the mean KL
    within 1.5 × the floor's + slack (or --max-kl); on a mixture of experts that mean over the tokens routed
    alike, the median KL within the same limit, and the flipped share within 2 × the floor's + ROUTING_SLACK."""
    m["max_kl_allowed"] = lim = max_kl if max_kl is not None else 1.5 * judged_kl(floor) + slack
    m["pass"] = judged_kl(m) <= lim
    if "expert_set_mismatch" in m:
        m["max_mismatch_allowed"] = 2 * floor["expert_set_mismatch"] + ROUTING_SLACK
        m["pass"] = m["pass"] and m["median_kl"] <= lim and m["expert_set_mismatch"] <= m["max_mismatch_allowed"]
    return bool(m["pass"])


def table(pairs: dict) -> list[str]:
    """verify's table of pairs on a mixture of experts, with the rule under it."""
    hdr = (f"{'pair':<20}{'median KL':>11}{'mean KL':>11}{'KL|alike':>11}{'flipped':>9}{'top-1':>8}{'greedy':>8}"
           f"{'limit':>10}{'flip cap':>10}  result")
    lines = [hdr, "-" * len(hdr)]
    for name, m in pairs.items():
        lim = f"{m['max_kl_allowed']:.2g}" if "max_kl_allowed" in m else "-"
        cap = f"{m['max_mismatch_allowed']:.1%}" if "max_mismatch_allowed" in m else "-"
        res = ("pass" if m["pass"] else "FAIL") if "pass" in m else "info"
        lines.append(f"{name:<20}{m['median_kl']:>11.3g}{m['mean_kl']:>11.3g}{m['mean_kl_routing_agrees']:>11.3g}"
                     f"{m['expert_set_mismatch']:>9.1%}{m['top1']:>8.1%}{m['greedy']['identical']:>8.0%}{lim:>10}"
                     f"{cap:>10}  {res}")
    per_layer = "; ".join(f"{name} " + " ".join(f"{v:.1%}" for v in m["expert_set_mismatch_per_layer"])
                          for name, m in pairs.items())
    return lines + ["", "flipped: share of tokens whose top-k expert set differs between the pair's views in any layer "
                        f"(per layer: {per_layer})", *RULE]
