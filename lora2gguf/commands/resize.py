"""`lora2gguf resize`: an adapter at a lower rank, per module the best one (Eckart–Young).

Each module's ΔW = s·B·A is decomposed exactly (lowrank: QR of B and Aᵀ, SVD of the r×r core) and
truncated at k_m: --rank K gives every module min(K, its rank), --energy E each module the smallest k
keeping E of its ‖ΔW‖_F². Directions below float32 rounding are dropped, so K at or above the true rank
reproduces the update exactly. The new modules have scale 1 (√σ in each factor); per-module ranks go into
rank_pattern / alpha_pattern (PEFT directory out) or into each tensor's shape (GGUF LoRA out, .gguf).
"""

from __future__ import annotations

import os
from pathlib import Path

from lora2gguf.adapters import lowrank
from lora2gguf.adapters.gguf_lora_write import check_outtype, refuse_unsupported
from lora2gguf.adapters.load import load_for_base, refuse_expert_lora
from lora2gguf.adapters.lora import PeftAdapter
from lora2gguf.adapters.save import check_out, save_adapter
from lora2gguf.errors import Lora2GGUFError
from lora2gguf.weights.base_model import open_base


def resize_adapter(adapter: PeftAdapter, rank: int | None = None, energy: float | None = None) -> tuple[PeftAdapter, dict]:
    """The resized adapter (in memory) and what it keeps: per module (old rank, new rank, energy kept)."""
    lowrank.check_target(rank, energy)
    refuse_unsupported(adapter)  # DoRA, LoRA biases, modules_to_save: not a low-rank update we can resize
    modules, per, kept_sq, total_sq = {}, {}, 0.0, 0.0
    with lowrank.small_matrix_threads():
        for name, m in adapter.modules.items():
            b, a = lowrank.module_factors(m)
            u, s, vt = lowrank.lowrank_svd(b, a, m.scale)
            k = lowrank.choose_rank(s, (b.shape[0], a.shape[1]), rank, energy)
            t = lowrank.truncate(u, s, vt, k)
            per[name] = {"rank": m.r, "new_rank": k, "energy_kept": t.energy_kept}
            kept_sq += t.energy_kept * t.sq_total
            total_sq += t.sq_total
            if k > 0:  # an all-zero module has nothing to keep
                modules[name] = lowrank.module_from_factors(name, m.embedding, t.b, t.a)
    if not modules:
        raise Lora2GGUFError(f"{adapter.path}: every module's update is zero; there is nothing to resize")
    config = {"base_model_name_or_path": adapter.config.get("base_model_name_or_path") or
              (adapter.config.get("gguf") or {}).get("peft_base_model") or ""}
    report = {"modules": per, "energy_kept": kept_sq / total_sq if total_sq > 0 else 1.0,
              "min_module_energy_kept": min(x["energy_kept"] for x in per.values()),
              "parameters": sum(m.A.size + m.B.size for m in adapter.modules.values()),
              "new_parameters": sum(m.A.size + m.B.size for m in modules.values()),
              "dropped": sorted(n for n, x in per.items() if x["new_rank"] == 0)}
    return PeftAdapter(adapter.path, config, modules), report


def resize(adapter: str | os.PathLike, out: str | os.PathLike, rank: int | None = None, energy: float | None = None,
           base: str | os.PathLike | None = None, outtype: str = "f32", force: bool = False) -> dict:
    """Resize `adapter` (any format) and write it to `out` (.gguf: GGUF LoRA for `base`; else PEFT directory)."""
    check_outtype(outtype)
    lowrank.check_target(rank, energy)
    out = check_out(out, force, [adapter, base], base)
    if base is None:
        src = load_for_base(adapter)
        refuse_expert_lora(src, "resize")
        new, report = resize_adapter(src, rank, energy)
        report["bytes"] = save_adapter(out, new, None, outtype)
    else:
        with open_base(base) as b:
            b.spec.arch_module.require("resize", b.path)
            src = load_for_base(adapter, b)
            new, report = resize_adapter(src, rank, energy)
            report["bytes"] = save_adapter(out, new, b, outtype)
    report["source_bytes"] = _size(Path(adapter))
    report["out"] = str(out)
    return report


def _size(p: Path) -> int:
    """Bytes of the adapter itself: a GGUF file, or a PEFT directory's config and weights (not its README)."""
    if not p.is_dir():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.iterdir() if f.name.startswith("adapter_"))


def format_report(r: dict) -> str:
    ranks = sorted({x["new_rank"] for x in r["modules"].values()})
    olds = sorted({x["rank"] for x in r["modules"].values()})
    span = (lambda v: f"{v[0]}" if len(v) == 1 else f"{v[0]}-{v[-1]}")
    lines = [f"wrote {r['out']}: {len(r['modules']) - len(r['dropped'])} modules, rank {span(olds)} → {span(ranks)}",
             f"energy kept: {r['energy_kept']:.4%} of the adapter's ‖ΔW‖_F² (worst module {r['min_module_energy_kept']:.4%})",
             f"parameters: {r['parameters']:,} → {r['new_parameters']:,}; size: {r['source_bytes']:,} → {r['bytes']:,} bytes"]
    if r["dropped"]:
        lines.append(f"dropped {len(r['dropped'])} modules whose update is zero ({r['dropped'][0]}, ...)")
    return "\n".join(lines)
