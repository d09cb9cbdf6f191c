"""`lora2gguf extract`: a LoRA from a full fine-tune, ΔW = W_tuned − W_base truncated per weight.

Both models may be GGUF files of any type or HF directories (base.open_base reads either, in HF layout).
Streams tensor by tensor: one base/tuned pair and its SVD are in memory at a time, so memory stays flat in
the model's size. Small matrices go through numpy's SVD, large ones through lowrank's randomized SVD.

Only the projections and an untied embedding / LM head can become LoRA modules. Everything else that
changed (RMSNorm weights, q/k/v biases, an embedding tied to the head, whose LoRA would reach the head in
llama.cpp but only the lookup in PEFT) is left out: the report gives each one's relative change and
their share of the total ‖ΔW‖². What leaving them out costs in KL is measured in BENCHMARKS.md.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from lora2gguf.adapters import lowrank
from lora2gguf.adapters.gguf_lora_write import check_outtype
from lora2gguf.adapters.lora import PeftAdapter
from lora2gguf.adapters.save import check_out, save_adapter
from lora2gguf.errors import Lora2GGUFError
from lora2gguf.weights.base_model import open_base

SHAPE_FIELDS = ("arch", "n_layer", "n_embd", "n_ff", "n_head", "n_head_kv", "head_dim", "n_vocab", "tied_embeddings")


def _lora_module(hf_name: str, spec) -> str | None:
    """The LoRA module for a base tensor, or None when no LoRA can express a change to it."""
    if hf_name not in spec.arch_module.lora_weight_names(spec.n_layer):
        return None
    if hf_name == "model.embed_tokens.weight" and spec.tied_embeddings:
        return None
    return hf_name.removesuffix(".weight")


def extract_modules(base, tuned, rank: int | None = None, energy: float | None = None,
                    log=lambda msg: None) -> tuple[PeftAdapter, dict]:
    """The adapter (in memory) approximating tuned − base per weight, and the report."""
    lowrank.check_target(rank, energy)
    for f in SHAPE_FIELDS:
        if getattr(base.spec, f) != getattr(tuned.spec, f):
            raise Lora2GGUFError(f"{tuned.path}: {f} is {getattr(tuned.spec, f)} but the base {base.path} has "
                                 f"{getattr(base.spec, f)}; a fine-tune of this base has the same shapes")
    modules, per, left = {}, {}, {}
    kept_sq = lora_sq = 0.0
    for name in base.hf_names():
        w = base.tensor(name).astype(np.float64)
        d = tuned.tensor(name).astype(np.float64) - w
        sq = float(np.vdot(d, d))
        if sq == 0.0:
            continue
        module = _lora_module(name, base.spec)
        if module is None:
            left[name] = {"sq": sq, "relative_change": float(np.sqrt(sq) / max(np.linalg.norm(w), 1e-30))}
            continue
        u, s, vt, total = lowrank.dense_svd(d, rank, energy)
        k = lowrank.choose_rank(s, d.shape, rank, energy, total)
        t = lowrank.truncate(u, s, vt, k, total)
        per[module] = {"rank": k, "energy_kept": t.energy_kept, "relative_change": float(np.sqrt(sq) / max(np.linalg.norm(w), 1e-30))}
        kept_sq, lora_sq = kept_sq + t.energy_kept * total, lora_sq + total
        if k > 0:
            modules[module] = lowrank.module_from_factors(module, module == "model.embed_tokens", t.b, t.a)
        log(f"{module}: rank {k}, {t.energy_kept:.4%} of its ΔW energy")
    all_sq = lora_sq + sum(x["sq"] for x in left.values())
    if all_sq == 0.0:
        raise Lora2GGUFError(f"{tuned.path}: has the same weights as {base.path}; there is nothing to extract")
    if not modules:
        raise Lora2GGUFError(f"{tuned.path}: no projection changed (only {', '.join(sorted(left)[:3])}...); "
                             "a LoRA cannot express that change")
    report = {"modules": per, "energy_kept": kept_sq / lora_sq if lora_sq else 1.0,
              "left_out": left, "left_out_share": sum(x["sq"] for x in left.values()) / all_sq}
    config = {"base_model_name_or_path": base.spec.name or str(base.path)}
    return PeftAdapter(Path("extracted"), config, modules), report


def extract(base: str | os.PathLike, tuned: str | os.PathLike, out: str | os.PathLike, rank: int | None = None,
            energy: float | None = None, outtype: str = "f32", force: bool = False,
            log=lambda msg: None) -> dict:
    """Extract a LoRA of `tuned` relative to `base` into `out` (.gguf: GGUF LoRA; else a PEFT directory)."""
    check_outtype(outtype)
    lowrank.check_target(rank, energy)
    out = check_out(out, force, [base, tuned], base)
    t0 = time.perf_counter()
    with open_base(base) as b, open_base(tuned) as t:
        b.spec.arch_module.require("extract", b.path)
        adapter, report = extract_modules(b, t, rank, energy, log)
        adapter.path = out
        report["bytes"] = save_adapter(out, adapter, b, outtype)
    report["seconds"] = time.perf_counter() - t0
    report["out"] = str(out)
    return report


def format_report(r: dict) -> str:
    ranks = [x["rank"] for x in r["modules"].values()]
    lines = [f"wrote {r['out']}: {len(ranks)} modules, rank {min(ranks)}-{max(ranks)} (mean {np.mean(ranks):.1f}), "
             f"{r['bytes']:,} bytes in {r['seconds']:.1f} s",
             f"energy kept: {r['energy_kept']:.4%} of the projections' ‖ΔW‖_F²"]
    if r["left_out"]:
        worst = max(r["left_out"].items(), key=lambda kv: kv[1]["relative_change"])
        lines.append(f"left out (a LoRA cannot hold them): {len(r['left_out'])} changed tensors, "
                     f"{r['left_out_share']:.4%} of the total ‖ΔW‖²; largest relative change "
                     f"{worst[1]['relative_change']:.3%} ({worst[0]})")
    return "\n".join(lines)
