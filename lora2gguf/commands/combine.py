"""`lora2gguf combine`: several adapters, each times its SCALE, as ONE GGUF LoRA.

Exact by concatenation: Σ_i u_i·s_i·B_i·A_i = [u_1 s_1 B_1 | u_2 s_2 B_2 | …] · [A_1; A_2; …], so per module
the ranks add and each adapter's per-module scale s_i (rsLoRA, rank/alpha patterns, llama.cpp's alpha / r)
and its SCALE u_i are folded into the B blocks; the result has scale 1. Modules need not be shared: one
present in a single adapter is that adapter's alone. --rank K recompresses each summed module to its
best rank-K approximation (lowrank's exact SVD of the concatenated factors) and reports the energy kept.
Unlike llama.cpp's export-lora this keeps the base untouched and needs no identical tensor sets.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from lora2gguf.adapters import lowrank
from lora2gguf.adapters.gguf_lora_write import check_outtype, refuse_unsupported
from lora2gguf.adapters.load import load_for_base
from lora2gguf.adapters.lora import PeftAdapter
from lora2gguf.adapters.save import check_out, is_gguf_out, save_adapter
from lora2gguf.errors import Lora2GGUFError
from lora2gguf.weights.base_model import open_base


def combine_adapters(adapters: list[tuple[PeftAdapter, float]], rank: int | None = None) -> tuple[PeftAdapter, dict]:
    """The combined adapter (in memory, HF layout, scale 1 per module) and per module its rank and energy kept."""
    if rank is not None:
        lowrank.check_target(rank, None)
    blocks: dict[str, list] = {}
    for a, u in adapters:
        refuse_unsupported(a)  # DoRA / LoRA bias / modules_to_save do not add up as low-rank terms
        for name, m in a.modules.items():
            b_i, a_i = lowrank.module_factors(m)
            blocks.setdefault(name, []).append((m, b_i.astype(np.float64) * (m.scale * u), a_i))
    modules, per, kept_sq, total_sq = {}, {}, 0.0, 0.0
    with lowrank.small_matrix_threads():
        for name, parts in blocks.items():
            b = np.concatenate([p[1] for p in parts], axis=1)
            a = np.concatenate([p[2] for p in parts], axis=0)
            if rank is not None:
                u_, s, vt = lowrank.lowrank_svd(b, a)
                t = lowrank.truncate(u_, s, vt, lowrank.choose_rank(s, (b.shape[0], a.shape[1]), rank, None))
                b, a, kept, sq = t.b, t.a, t.energy_kept, t.sq_total
            else:
                kept, sq = 1.0, 0.0
            per[name] = {"ranks": [p[0].r for p in parts], "rank": int(a.shape[0]), "energy_kept": kept}
            kept_sq, total_sq = kept_sq + kept * sq, total_sq + sq
            if a.shape[0] > 0:
                modules[name] = lowrank.module_from_factors(name, parts[0][0].embedding, b, a)
    if not modules:
        raise Lora2GGUFError("the combined update is zero in every module; nothing to write")
    report = {"modules": per, "energy_kept": kept_sq / total_sq if total_sq > 0 else 1.0,
              "adapters": [{"path": str(a.path), "scale": u, "modules": len(a.modules)} for a, u in adapters]}
    config = {"base_model_name_or_path": adapters[0][0].config.get("base_model_name_or_path") or ""}
    return PeftAdapter(Path("combined"), config, modules), report


def combine(loras: list[tuple[str | os.PathLike, float]], base: str | os.PathLike, out: str | os.PathLike,
            rank: int | None = None, outtype: str = "f32", force: bool = False) -> dict:
    """Combine adapters (any format, for `base`) into the GGUF LoRA `out`."""
    check_outtype(outtype)
    if not is_gguf_out(out):
        raise Lora2GGUFError(f"{out}: combine writes a GGUF LoRA; give an output path ending in .gguf")
    if not loras:
        raise Lora2GGUFError("combine needs at least one ADAPTER[:SCALE]")
    out = check_out(out, force, [p for p, _ in loras] + [base], base)
    with open_base(base) as b:
        b.spec.arch_module.require("combine", b.path)
        adapters = [(load_for_base(p, b), u) for p, u in loras]
        combined, report = combine_adapters(adapters, rank)
        combined.path = out
        report["bytes"] = save_adapter(out, combined, b, outtype)
    report["out"] = str(out)
    return report


def format_report(r: dict) -> str:
    ranks = sorted({x["rank"] for x in r["modules"].values()})
    srcs = ", ".join(f"{Path(a['path']).name}×{a['scale']:g}" for a in r["adapters"])
    span = f"{ranks[0]}" if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
    return (f"wrote {r['out']}: {srcs} as one adapter, {len(r['modules'])} modules of rank {span}, "
            f"{r['bytes']:,} bytes; energy kept {r['energy_kept']:.4%}")
