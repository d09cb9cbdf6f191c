"""`lora2gguf analyze`: how much of the weight space an adapter really changes.

Per module: rank and scale, ‖ΔW‖_F and ‖ΔW‖₂ of ΔW = scale·B·A (relative to the base weight with
--base), ΔW's singular values (exact, from lowrank's QR + r×r core SVD, never forming ΔW), the energy
captured at each k, the ranks reaching 90% / 99% of it, the stable rank and the entropy effective rank.
Then one verdict: the smallest uniform rank that keeps 99% of the whole adapter's energy.

Without --base a GGUF LoRA of a llama-family arch is read with its q/k rows in llama.cpp's permuted
order: a row permutation P leaves every singular value of P·ΔW, every norm and so every number here
unchanged, so the base (which only supplies the head counts to undo P) is not needed.

LoRA on a stack of experts (E, out, in) is one pair per expert: each expert's ΔW_e gets the numbers above
(lowrank.expert_stats), the report says which experts each stack really changes (‖ΔW_e‖_F above
lowrank.UNCHANGED × the stack's largest) and the stack's row in the tables is ‖ΔW‖_F of the whole stack,
‖ΔW‖₂ of its largest expert and the ranks averaged over its changed experts.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from lora2gguf.adapters import lowrank
from lora2gguf.adapters.load import load_for_base
from lora2gguf.errors import Lora2GGUFError
from lora2gguf.fileio.atomic import atomic_output
from lora2gguf.models.arch import ATTN_PROJ, MLP_PROJ
from lora2gguf.weights.base_model import open_base


def module_stats(m, base=None) -> dict:
    b, a = lowrank.module_factors(m)
    layer, kind = lowrank.module_label(m.module)
    out = {"module": m.module, "layer": layer, "kind": kind, "shape": [int(b.shape[-2]), int(a.shape[-1])],
           "rank": m.r, "scale": m.scale}
    w = base.tensor(m.weight_name) if base is not None else None
    if m.experts:
        return out | lowrank.expert_stats(b, a, m.scale, w)
    out |= lowrank.spectrum_stats(b, a, m.scale)
    if w is not None:
        out["rel_fro"] = out["fro"] / max(float(np.linalg.norm(w)), 1e-30)
        out["rel_spectral"] = out["spectral"] / max(lowrank.spectral_norm(w), 1e-30)
    return out


def spectra(x: dict) -> list[np.ndarray]:
    """A module's singular values: one array, or one per expert of a stack."""
    return [np.asarray(e["singular_values"]) for e in x.get("experts", [x])]


def uniform_rank(modules: list[dict], energy: float) -> tuple[int, float]:
    """The smallest K such that keeping each module's (each expert's) top min(K, r) singular values keeps
    `energy` of the adapter's total ‖ΔW‖_F² (summed over modules), and the fraction that K keeps."""
    total = sum(x["fro"] ** 2 for x in modules)
    sq = [v ** 2 for x in modules for v in spectra(x)]
    r_max = max(len(v) for v in sq)
    kept = 1.0
    for k in range(1, r_max + 1):
        kept = sum(float(v[:k].sum()) for v in sq) / total if total > 0 else 1.0
        if kept >= energy * (1 - 1e-12):
            return k, kept
    return r_max, kept


def parameters(x: dict, k: int | None = None) -> int:
    """A module's LoRA parameters at its rank, or at rank min(k, r): r·(out + in), per expert of a stack."""
    return min(k or x["rank"], x["rank"]) * sum(x["shape"]) * x.get("n_expert", 1)


def analyze(adapter: str | os.PathLike, base: str | os.PathLike | None = None) -> dict:
    """The report for `adapter` (any format the project reads), relative to `base` when given."""
    if base is None:
        a = load_for_base(adapter, None, any_qk_order=True)
        with lowrank.small_matrix_threads():
            stats = [module_stats(m) for m in a.modules.values()]
    else:
        with open_base(base) as b, lowrank.small_matrix_threads():
            b.spec.arch_module.require("analyze", b.path)
            a = load_for_base(adapter, b)
            stats = [module_stats(m, b) for m in a.modules.values()]
    if not stats:
        raise Lora2GGUFError(f"{adapter}: the adapter holds no LoRA modules to analyze")
    ranks = sorted({x["rank"] for x in stats})
    k99, kept = uniform_rank(stats, 0.99)
    k90, kept90 = uniform_rank(stats, 0.9)
    params = sum(parameters(x) for x in stats)
    params_k = sum(parameters(x, k99) for x in stats)
    per99 = [x["rank_99"] for x in stats]
    return {"adapter": str(adapter), "base": str(base) if base else None, "modules": stats,
            "ranks": ranks, "uniform_rank_99": k99, "uniform_energy_99": kept,
            "uniform_rank_90": k90, "uniform_energy_90": kept90,
            "per_module_rank_99": {"min": min(per99), "max": max(per99), "mean": float(np.mean(per99))},
            "parameters": params, "parameters_at_rank_99": params_k,
            "verdict": verdict(ranks, k99, kept, params, params_k, k90, kept90)} | lowrank.experts_overview(stats)


def verdict(ranks: list[int], k: int, kept: float, params: int, params_k: int, k90: int, kept90: float) -> str:
    r = ranks[-1] if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
    if k >= ranks[-1]:
        most = (f"; {kept90:.0%} of it lives in {k90} of them (`lora2gguf resize --rank {k90}`)" if k90 < ranks[-1] else "")
        return f"this adapter uses all of its r={r} dimensions: resizing below r loses more than 1% of its energy" + most
    return (f"this adapter's update lives in {k} of its r={r} dimensions; resize to {k} keeps {kept:.1%} of its "
            f"energy with {params_k / params:.0%} of the parameters (`lora2gguf resize --rank {k}`)")


def _grid(report: dict, key: str) -> tuple[list, list, np.ndarray]:
    layers = sorted({x["layer"] for x in report["modules"]}, key=lambda v: (v is None, v or 0))
    order = [p.split(".")[-1] for p in ATTN_PROJ + MLP_PROJ]  # q, k, v, o, gate, up, down; others after
    order += [p.removesuffix("_proj") + "_exps" for p in order[-3:]]  # then the expert stacks, in the same order
    kinds = sorted(dict.fromkeys(x["kind"] for x in report["modules"]),
                   key=lambda k: (order.index(k) if k in order else len(order), k))
    g = np.full((len(layers), len(kinds)), np.nan)
    for x in report["modules"]:
        g[layers.index(x["layer"]), kinds.index(x["kind"])] = x[key]
    return layers, kinds, g


def format_report(report: dict) -> str:
    rel = report["base"] is not None
    layers, kinds, g = _grid(report, "rank_99")
    lines = [f"{report['adapter']}: {len(report['modules'])} modules, rank {', '.join(map(str, report['ranks']))}"
             + (f", relative to {report['base']}" if rel else ""), "",
             "rank reaching 99% of each module's energy (layer × module):",
             "layer " + "".join(f"{k:>13}" for k in kinds)]
    for i, layer in enumerate(layers):
        lines.append(f"{'-' if layer is None else layer:>5} " + "".join(
            f"{'':>13}" if np.isnan(v) else f"{int(v):>13}" for v in g[i]))
    lines += ["", "per module kind (mean over layers):",
              f"{'module':>13} {'rank':>5} {'|dW|_F':>9} {'|dW|_2':>9}" + (f" {'rel_F':>8} {'rel_2':>8}" if rel else "")
              + f" {'k90':>5} {'k99':>5} {'stable':>7} {'entropy':>7}"]
    for kind in kinds:
        xs = [x for x in report["modules"] if x["kind"] == kind]

        def mean(key):
            return float(np.mean([x[key] for x in xs]))
        lines.append(f"{kind:>13} {mean('rank'):5.1f} {mean('fro'):9.4f} {mean('spectral'):9.4f}"
                     + (f" {mean('rel_fro'):8.4f} {mean('rel_spectral'):8.4f}" if rel else "")
                     + f" {mean('rank_90'):5.1f} {mean('rank_99'):5.1f} {mean('stable_rank'):7.2f}"
                     f" {mean('entropy_rank'):7.2f}")
    p = report["per_module_rank_99"]
    lines += ["", f"per-module rank for 99%: {p['min']:g}-{p['max']:g} (mean {p['mean']:.1f}); "
              f"`resize --energy 0.99` would use those", report["verdict"]]
    return "\n".join(lines + experts_table(report))


def experts_table(report: dict, top: int = 4) -> list[str]:
    """Per stack of expert LoRA: how many experts it changes, and its largest by ‖ΔW_e‖_F with their rank for
    99% of the energy and entropy rank; then the experts changed anywhere and everywhere."""
    stacks = [x for x in report["modules"] if "experts" in x]
    if not stacks:
        return []
    rel = report["base"] is not None
    key = "rel_fro" if rel else "fro"
    norm = "‖ΔW_e‖_F / ‖W_e‖_F" if rel else "‖ΔW_e‖_F"
    lines = ["", "expert LoRA, per expert e: ΔW_e = scale·B_e·A_e; changed = ‖ΔW_e‖_F above "
             f"{lowrank.UNCHANGED:g} × its stack's largest; top experts by {norm} (k99, entropy rank)",
             f"{'layer':>5} {'module':>10} {'changed':>8} {'≈0':>4}  top experts"]
    for x in stacks:
        best = sorted(x["experts"], key=lambda e: -e[key])[:top]
        tops = "  ".join(f"e{e['expert']} {e[key]:.3g} ({e['rank_99']}, {e['entropy_rank']:.2f})"
                         for e in best if e["expert"] in x["experts_changed"])
        n = len(x["experts_changed"])
        changed = f"{n}/{x['n_expert']}"
        lines.append(f"{'-' if x['layer'] is None else x['layer']:>5} {x['kind']:>10} {changed:>8} "
                     f"{x['n_expert'] - n:>4}  {tops or '-'}")
    lines.append(f"experts changed: {', '.join(map(str, report['experts_changed'])) or 'none'} "
                 f"({len(report['experts_changed'])} of {report['n_expert']}); in every expert stack: "
                 f"{', '.join(map(str, report['experts_changed_everywhere'])) or 'none'}")
    return lines + ["(`lora2gguf resize` does not handle LoRA on stacked experts yet)"]


def plot(report: dict, out: str | os.PathLike) -> Path:
    """A layer × module heatmap PNG: the rank reaching 99% of the energy, and ‖ΔW‖_F (relative with a base)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise Lora2GGUFError("--plot needs matplotlib, which is not installed: pip install 'lora2gguf[plot]' "
                             "(or pip install matplotlib)") from None

    out = Path(out)
    norm_key = "rel_fro" if report["base"] else "fro"
    fig, axes = plt.subplots(1, 2, figsize=(12, max(3.0, 0.25 * len(_grid(report, "rank")[0]) + 1.5)))
    for ax, key, title in ((axes[0], "rank_99", "rank reaching 99% energy"),
                           (axes[1], norm_key, "‖ΔW‖_F / ‖W‖_F" if report["base"] else "‖ΔW‖_F")):
        layers, kinds, g = _grid(report, key)
        im = ax.imshow(g, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_xticks(range(len(kinds)), kinds, rotation=45, ha="right")
        ax.set_yticks(range(len(layers)), ["-" if v is None else str(v) for v in layers])
        ax.set_ylabel("layer")
        ax.set_title(title)
        fig.colorbar(im, ax=ax)
    fig.suptitle(report["verdict"], fontsize=8, wrap=True)
    fig.tight_layout()
    with atomic_output(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return out
