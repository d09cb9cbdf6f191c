"""An mlx-lm adapter directory (adapters.safetensors + adapter_config.json) → adapters.lora.PeftAdapter.

The format, from mlx-lm's source (mlx_lm/tuner/lora.py, dora.py, utils.py; mlx_lm/lora.py saves
`tree_flatten(model.trainable_parameters())` and `vars(args)` as the config):
- `<module>.lora_a` (in, r) and `<module>.lora_b` (r, out), module paths as in HF (model.layers.N.self_attn.q_proj);
  LoRALinear computes y = Wx + scale·(x·a)·b, so ΔW (out, in) = scale·bᵀaᵀ: PEFT's A = aᵀ, B = bᵀ.
- LoRAEmbedding: lora_a (vocab, r), lora_b (r, dim), ΔE = scale·a·b: PEFT's lora_embedding_A = aᵀ, _B = bᵀ.
- DoRA (fine_tune_type "dora", or use_dora in older configs) adds `.m` (out,), PEFT's magnitude vector:
  DoRALinear's output is m / ‖W + scale·bᵀaᵀ‖_row · (Wx + scale·x a b), PEFT's DoRA exactly.
- LoRASwitchLinear (a mixture of experts' SwitchGLU, `switch_mlp` beside the router: mlx_lm/models/
  qwen3_moe.py, qwen2_moe.py, mixtral.py): lora_a (E, r, in), lora_b (E, out, r), ΔW_e = scale·b_e·a_e: the
  layout of our expert stacks already (PEFT's A, B per expert); `<layer>.mlp.switch_mlp.gate_proj` (Mixtral:
  `block_sparse_moe.switch_mlp`) is the stack mlp.experts.gate_proj, Mixtral's router block_sparse_moe.gate
  is mlp.gate (the arch's module_aliases).
- config: lora_parameters {rank, scale, dropout, keys}, num_layers (the last N layers). There is no alpha:
  the scale is the whole factor. Ollama's converter ignores it (writes alpha 0: llama.cpp applies 1).
The q/k rows are in HF order: mlx-lm loads HF weights as they are and rotates halves (rope traditional=False).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from lora2gguf.adapters.lora import ModuleLoRA, PeftAdapter
from lora2gguf.adapters.peft import bnb_note, lora_pair, module_rules, text_tower
from lora2gguf.errors import Lora2GGUFError
from lora2gguf.fileio.tensors import read_json_object, read_safetensors_f32

TENSORS, CONFIG = "adapters.safetensors", "adapter_config.json"
_KEY = re.compile(r"(.+)\.(lora_a|lora_b|m)$")
_SWITCH = re.compile(r"\.(?:mlp|block_sparse_moe)\.switch_mlp\.")  # mlx-lm's SwitchGLU → our expert stacks


def _module(mod: str) -> str:
    """mlx-lm's module path → lora2gguf's (HF, transformers 5): switch_mlp's projections are mlp.experts'
    stacks, a renamed module (Mixtral's router) its in-memory name."""
    mod = _SWITCH.sub(".mlp.experts.", mod)
    for disk, mem in module_rules()[0].items():
        if mod.endswith("." + disk):
            return mod[: -len(disk)] + mem
    return mod


def is_mlx_dir(path: Path) -> bool:
    return (path / TENSORS).is_file()


def read_mlx_config(path: Path) -> tuple[dict, int, float]:
    """(config, rank, scale) from adapter_config.json, validated."""
    cfg_path = path / CONFIG
    cfg = read_json_object(cfg_path, f"{path}: {TENSORS} but no {CONFIG}; mlx-lm writes both (its scale is in the "
                                     "config)")
    params = cfg.get("lora_parameters")
    if not isinstance(params, dict):
        raise Lora2GGUFError(f"{cfg_path}: no 'lora_parameters' object; is this an mlx-lm adapter?")
    kind = str(cfg.get("fine_tune_type", "dora" if cfg.get("use_dora") else "lora")).lower()
    if kind not in ("lora", "dora"):
        raise Lora2GGUFError(f"{cfg_path}: fine_tune_type {kind!r}; only lora and dora adapters are adapters "
                             "(a full fine-tune is a whole model: convert it with llama.cpp's convert_hf_to_gguf.py)")
    rank, scale = params.get("rank"), params.get("scale")
    for key, v in (("rank", rank), ("scale", scale)):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            raise Lora2GGUFError(f"{cfg_path}: lora_parameters.{key} is missing or not a finite number")
    if rank <= 0 or rank != int(rank):
        raise Lora2GGUFError(f"{cfg_path}: lora_parameters.rank must be a positive integer, got {rank}")
    return cfg, int(rank), float(scale)


def load_mlx(path: Path) -> PeftAdapter:
    cfg, rank, scale = read_mlx_config(path)
    parts: dict[str, dict[str, np.ndarray]] = {}
    for key, t in read_safetensors_f32(path / TENSORS).items():
        m = _KEY.match(key)
        if not m:
            raise Lora2GGUFError(f"{path / TENSORS}: tensor {key} is not an mlx-lm LoRA tensor "
                                 "(<module>.lora_a / .lora_b / .m)")
        if not np.all(np.isfinite(t)):
            raise Lora2GGUFError(f"{path / TENSORS}: tensor {key} contains NaN or Inf; the adapter is broken")
        parts.setdefault(_module(text_tower(m.group(1))), {})[m.group(2)] = t
    if not parts:
        raise Lora2GGUFError(f"{path / TENSORS}: holds no LoRA tensors")
    modules = {}
    for mod, p in sorted(parts.items()):
        a, b = lora_pair(path / TENSORS, mod, p, "lora_a", "lora_b")
        if a.ndim == 3 and b.ndim == 3:  # LoRASwitchLinear: per expert, already A (E, r, in), B (E, out, r)
            if a.shape[0] != b.shape[0] or a.shape[1] != b.shape[2] or "m" in p:
                raise Lora2GGUFError(f"{path / TENSORS}: {mod}: lora_a {tuple(a.shape)} and lora_b {tuple(b.shape)} are not "
                                     "per-expert pairs (E, r, in) and (E, out, r) (or carry DoRA's m, which mlx-lm's "
                                     "LoRASwitchLinear has not); the file is corrupt")
            if a.shape[1] != rank:
                raise Lora2GGUFError(f"{path / TENSORS}: {mod} has rank {a.shape[1]} but {CONFIG} says rank {rank}")
            modules[mod] = ModuleLoRA(mod, np.ascontiguousarray(a), np.ascontiguousarray(b), rank, scale * rank, scale)
            continue
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
            raise Lora2GGUFError(f"{path / TENSORS}: {mod}: lora_a {tuple(a.shape)} and lora_b {tuple(b.shape)} do "
                                 "not multiply (mixture-of-experts LoRA is not supported); the file is corrupt")
        if a.shape[1] != rank:
            raise Lora2GGUFError(f"{path / TENSORS}: {mod} has rank {a.shape[1]} but {CONFIG} says rank {rank}")
        emb = mod.endswith("embed_tokens")
        mag = p.get("m")
        if mag is not None and (emb or mag.shape != (b.shape[1],)):
            raise Lora2GGUFError(f"{path / TENSORS}: {mod}.m has shape {tuple(mag.shape)}; expected ({b.shape[1]},) "
                                 "for a DoRA linear (DoRA on embeddings is not supported)")
        modules[mod] = ModuleLoRA(mod, np.ascontiguousarray(a.T), np.ascontiguousarray(b.T), rank, scale * rank, scale,
                                  embedding=emb, magnitude=mag)
    # A PEFT-shaped config: lora_alpha = scale·rank gives alpha / r = mlx-lm's scale, which is what llama.cpp
    # applies from the GGUF file's alpha, so nothing needs folding; the original config travels along.
    peft_cfg = {"peft_type": "LORA", "r": rank, "lora_alpha": scale * rank, "target_modules": sorted(modules),
                "base_model_name_or_path": cfg.get("model"),
                "use_dora": any(m.magnitude is not None for m in modules.values()),
                "source_format": "mlx-lm", "source_config": cfg}
    return PeftAdapter(path, peft_cfg, modules, notes=[n for n in (bnb_note(path, peft_cfg),) if n])
