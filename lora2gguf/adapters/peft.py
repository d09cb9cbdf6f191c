"""PEFT's LoRA format, read and written: an adapter directory (adapter_config.json + adapter_model.safetensors
or .bin) → the in-memory adapters.lora.PeftAdapter with PEFT's own scale per module, and back.

Everything PEFT-specific is written here once: the key prefix, the scale (rsLoRA, rank/alpha patterns), the
config PEFT reads and the directory writer that convert's siblings (export, resize, combine, extract) and
training (its output and its checkpoints) share. Layout is Hugging Face's (HF module names, HF row order);
moving to GGUF names/row order is the architecture's job (models/).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections import Counter
from importlib import metadata
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from lora2gguf import models
from lora2gguf.adapters.lora import ModuleLoRA, PeftAdapter
from lora2gguf.errors import Lora2GGUFError
from lora2gguf.fileio.atomic import atomic_output, fsync_path, part_prefix, remove_stale_parts, umask_mode
from lora2gguf.fileio.tensors import read_json_object, read_safetensors_f32, read_torch_pickle

PREFIX = "base_model.model."


def pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern/alpha_pattern lookup (peft.utils.other.get_pattern_key): the first key that
    matches the end of the module path as a regex, after a dot or at the start."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return default


def lora_scale(r: int, alpha: float, rslora: bool = False) -> float:
    """PEFT's scale of a rank-r module: alpha / r, or alpha / √r with rsLoRA (LoraLayer.update_layer)."""
    return alpha / math.sqrt(r) if rslora else alpha / r


def peft_scale(config: dict, module: str) -> tuple[int, float, float]:
    """(r, alpha, scale) PEFT uses for this module."""
    r = int(pattern_value(config.get("rank_pattern") or {}, module, config["r"]))
    alpha = float(pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"]))
    return r, alpha, lora_scale(r, alpha, bool(config.get("use_rslora")))


def lora_pair(where, mod: str, p: dict, ka: str, kb: str) -> tuple[np.ndarray, np.ndarray]:
    """A module's two LoRA factors from its tensors `p`, or the error naming the one that is missing."""
    if ka not in p or kb not in p:
        have, miss = (ka, kb) if ka in p else (kb, ka)
        raise Lora2GGUFError(f"{where}: {mod}.{have} has no matching {miss}; the adapter file is incomplete")
    return p[ka], p[kb]


def read_config(path: Path) -> dict:
    cfg_path = path / "adapter_config.json"
    cfg = read_json_object(cfg_path, f"{path}: no adapter_config.json; is this a PEFT adapter directory?")
    ptype = str(cfg.get("peft_type", "LORA")).upper()
    if ptype != "LORA":
        raise Lora2GGUFError(f"{cfg_path}: peft_type {ptype} is not LoRA; only LoRA adapters are supported")
    for key in ("r", "lora_alpha"):
        if not isinstance(cfg.get(key), (int, float)) or isinstance(cfg.get(key), bool):
            raise Lora2GGUFError(f"{cfg_path}: '{key}' is missing or not a number")
        if not math.isfinite(cfg[key]):  # Python's json reads NaN / Infinity
            raise Lora2GGUFError(f"{cfg_path}: '{key}' must be a finite number, got {cfg[key]}")
    if cfg["r"] <= 0 or cfg["r"] != int(cfg["r"]):
        raise Lora2GGUFError(f"{cfg_path}: 'r' must be a positive integer, got {cfg['r']}")
    for key in ("rank_pattern", "alpha_pattern"):
        pat = cfg.get(key) or {}
        if not isinstance(pat, dict) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                and math.isfinite(v) and (v > 0 or key == "alpha_pattern")
                                                for v in pat.values()):
            raise Lora2GGUFError(f"{cfg_path}: '{key}' must map module patterns to "
                                 f"{'positive ranks' if key == 'rank_pattern' else 'finite alphas'}")
    targets = cfg.get("target_modules")
    if targets is not None and not isinstance(targets, str) and not (
            isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        raise Lora2GGUFError(f"{cfg_path}: 'target_modules' must be a list of module names or a regex string")
    return cfg


def targeted(cfg: dict, module: str) -> bool:
    """Whether adapter_config.json's target_modules selects this module, by PEFT's rule
    (peft.tuners.tuners_utils.check_target_module_exists): a regex string must match the whole module
    path, a list entry the path or its last components. "all-linear" (or no list) selects any module."""
    t = cfg.get("target_modules")
    if t is None or t == "all-linear":
        return True
    if isinstance(t, str):
        try:
            return re.fullmatch(t, module) is not None
        except re.error:
            return True  # not ours to judge; PEFT would refuse it, the tensors say what is adapted
    return any(module == k or module.endswith("." + k) for k in t)


def read_tensors(path: Path) -> dict[str, np.ndarray]:
    st, binf = path / "adapter_model.safetensors", path / "adapter_model.bin"
    if st.is_file():
        return read_safetensors_f32(st)
    if binf.is_file():
        return read_torch_pickle(binf, "PEFT's save_pretrained")
    raise Lora2GGUFError(f"{path}: no adapter_model.safetensors or adapter_model.bin")


# Multimodal checkpoints (Gemma 3 4B+, Qwen2.5-VL, LLaVA-style): the language model sits under
# `language_model.` (transformers' old and new layouts), beside vision modules llama.cpp gives no LoRA.
_TEXT_TOWER = (("model.language_model.", "model."), ("language_model.model.", "model."), ("language_model.", ""))
_VISION = re.compile(r"(^|\.)(vision_tower|vision_model|visual|multi_modal_projector|mm_projector|embed_vision)(\.|$)")
_BNB_4BIT = re.compile(r"bnb[-_]?4bit|[-_]4bit\b|nf4", re.I)


def text_tower(module: str) -> str:
    """A multimodal checkpoint's text-tower module path → the text-only model's (model.layers.N...)."""
    for old, new in _TEXT_TOWER:
        if module.startswith(old):
            return new + module[len(old):]
    return module


def vision_note(skipped: set[str]) -> str | None:
    if not skipped:
        return None
    first = sorted(skipped)[0]
    return (f"{len(skipped)} vision-tower module{'s' if len(skipped) > 1 else ''} skipped ({first}, ...): llama.cpp "
            "applies no LoRA to the vision tower or projector; the text tower is converted")


def four_bit_base(cfg: dict) -> str | None:
    """The 4-bit base an adapter names as its training base: Unsloth / axolotl / QLoRA adapters name the
    bitsandbytes one (`unsloth/…-bnb-4bit`), mlx-lm's QLoRA its own 4-bit one."""
    name = str(cfg.get("base_model_name_or_path") or "")
    return name if _BNB_4BIT.search(name) else None


def bnb_note(path: Path, cfg: dict) -> str | None:
    if (name := four_bit_base(cfg)) is None:
        return None
    return (f"{path}: trained on a 4-bit base ({name}): the adapter was fitted to 4-bit-rounded weights (NF4 for "
            "bitsandbytes), not to your base's; its effect differs slightly (`lora2gguf verify` measures it)")


def alora_note(cfg: dict) -> str | None:
    toks = cfg.get("alora_invocation_tokens")
    if not toks:
        return None
    return (f"activated LoRA: llama-server switches it on at the last occurrence of its invocation tokens {toks} "
            "in the prompt; llama-cli, llama-cpp-python and `lora2gguf verify` apply it to every token")


PARAM_WRAPPER_PEFT = re.compile(r"0\.21(\.|$)")  # the peft releases whose 3-D parameter LoRA layout is known here
PARAM_WRAPPER_LAYOUT = "0.21.2"  # the release named when writing that layout without such a peft installed


def param_wrapper_factors(A: np.ndarray, B: np.ndarray, n_expert: int) -> tuple[np.ndarray, np.ndarray]:
    """PEFT's LoRA on a 3-D expert parameter (lora.ParamWrapper, peft 0.21: get_delta_weight) → one pair per
    expert: lora_A.weight [r·E, in] reshapes to (E, r, in), expert-major (rows e·r … e·r + r − 1); lora_B.weight
    [out, r·E] reshapes to (out, r, E), expert-minor (column j·E + e), here moved to (E, out, r)."""
    return (A.reshape(n_expert, -1, A.shape[-1]),
            np.ascontiguousarray(B.reshape(B.shape[0], -1, n_expert).transpose(2, 0, 1)))


def param_wrapper_weights(A3: np.ndarray, B3: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of param_wrapper_factors: per-expert A (E, r, in), B (E, out, r) → PEFT's lora_A.weight
    [r·E, in] (expert-major) and lora_B.weight [out, r·E] (expert-minor, column j·E + e)."""
    return (np.ascontiguousarray(A3.reshape(-1, A3.shape[-1])),
            np.ascontiguousarray(B3.transpose(1, 2, 0).reshape(B3.shape[1], -1)))


def expert_param_table() -> dict[str, tuple[str, ...]]:
    """Every arch's 3-D expert parameters (PEFT target_parameters) → the expert_proj stacks their rows split into."""
    return {k: v for a in models.all_archs() for k, v in a.expert_params.items()}


def param_wrapper_key(layer: str, params: list[str], param: str) -> str:
    """The module path PEFT saves `param`'s LoRA under, `params` being the expert parameters of its module that
    are targeted, in expert_param_table order: PEFT nests one wrapper per parameter, the first one registered
    innermost, so with gate_up and down targeted gate_up's is `experts.base_layer` and down's `experts`."""
    owner = param.rsplit(".", 1)[0]
    return layer + owner + ".base_layer" * (len(params) - 1 - params.index(param))


def split_param_wrapper(layer: str, param: str, A3: np.ndarray, B3: np.ndarray, r: int, alpha: float,
                        scale: float) -> dict[str, ModuleLoRA]:
    """One expert parameter's per-expert pairs → one ModuleLoRA per expert_proj stack its rows split into (a
    fused gate_up: gate rows first), all sharing A."""
    split = expert_param_table()[param]
    if B3.shape[1] % len(split):
        raise Lora2GGUFError(f"{layer + param} has {B3.shape[1]} output rows, which do not split into "
                             f"{', '.join(split)}; the adapter was made for another model")
    n = B3.shape[1] // len(split)
    return {layer + t: ModuleLoRA(layer + t, A3, np.ascontiguousarray(B3[:, i * n:(i + 1) * n]), r, alpha, scale)
            for i, t in enumerate(split)}


def param_wrapper_tensors(modules: dict[str, ModuleLoRA]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The inverse of read_param_wrappers: the expert stacks among `modules` (3-D pairs) → PEFT module path →
    (lora_A.weight, lora_B.weight), the split stacks of one parameter joined again (they must share A, as
    PEFT's one LoRA per parameter does). The config must name those parameters in target_parameters."""
    table, out = expert_param_table(), {}
    layers = sorted({re.match(r"model\.layers\.\d+\.", n).group(0) for n, m in modules.items() if m.A.ndim == 3})
    for layer in layers:
        params = [p for p, split in table.items() if any(layer + s in modules for s in split)]
        for p in params:
            parts = [modules.get(layer + s) for s in table[p]]
            if any(m is None or m.A.shape != parts[0].A.shape or not np.array_equal(m.A, parts[0].A) for m in parts):
                raise Lora2GGUFError(f"{layer + p}: PEFT's target_parameters LoRA is one pair for "
                                     f"{', '.join(table[p])} together; these stacks differ in A or one is missing")
            out[param_wrapper_key(layer, params, p)] = param_wrapper_weights(
                parts[0].A, np.concatenate([m.B for m in parts], axis=1))
    return out


def read_param_wrappers(path: Path, cfg: dict, parts: dict[str, dict[str, np.ndarray]]) -> dict[str, ModuleLoRA]:
    """The modules of PEFT's `target_parameters` LoRA on transformers' 3-D expert parameters, taken out of
    `parts`, as stacks of per-expert pairs on the arch's expert_proj tensors (a fused gate_up split into its
    gate and up rows). PEFT nests one wrapper per parameter of a module, the first one the module registers
    innermost, so `experts.base_layer.lora_A` is gate_up_proj's and `experts.lora_A` down_proj's when both
    are targeted. In peft 0.21 a 3-D parameter (E, out, in) (transformers' layout; not `is_transposed`) takes
    its last axis as the input: A is [r·E, in], B [out, r·E]."""
    targets = cfg.get("target_parameters") or []
    if not targets:
        return {}
    version = str(cfg.get("peft_version") or "")
    if not PARAM_WRAPPER_PEFT.match(version):
        saved_by = version or "(no peft_version in adapter_config.json)"
        raise Lora2GGUFError(f"{path}: LoRA on 3-D parameters (target_parameters) saved by peft {saved_by}: "
                             "which axis of an expert parameter peft takes as "
                             "the input changed between releases (peft PR 3165), and lora2gguf knows peft 0.21's "
                             "layout only; make the adapter with peft 0.21")
    table = expert_param_table()
    out: dict[str, ModuleLoRA] = {}
    for mod in list(parts):
        mt = re.fullmatch(r"(model\.layers\.\d+\.)(.+?)((?:\.base_layer)*)", mod)
        if not mt:
            continue
        layer, owner, wraps = mt.groups()
        params = [p for p in table if p.rsplit(".", 1)[0] == owner
                  and any(layer + p == t or (layer + p).endswith("." + t) for t in targets)]
        if not params:
            continue
        depth = wraps.count(".base_layer")
        if depth >= len(params):
            raise Lora2GGUFError(f"{path}: {mod} wraps {depth} parameter LoRAs but target_parameters names "
                                 f"{len(params)} on {layer + owner}; the config and the weights do not match")
        param = params[len(params) - 1 - depth]
        p = parts.pop(mod)
        if cfg.get("use_dora") or "lora_magnitude_vector" in p:  # peft's ParamWrapper has no DoRA either
            raise Lora2GGUFError(f"{path}: {layer + param}: DoRA on expert parameters (target_parameters) is not "
                                 "supported (peft's own ParamWrapper refuses use_dora); train plain LoRA on the experts")
        A, B = lora_pair(path, mod, p, "lora_A", "lora_B")
        r, alpha, scale = peft_scale(cfg, layer + param)
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1] or A.shape[0] % r:
            raise Lora2GGUFError(f"{path}: {mod} ({layer + param}): lora_A {tuple(A.shape)} and lora_B "
                                 f"{tuple(B.shape)} are not a rank-{r} LoRA on stacked experts ([r·E, in], [out, r·E])"
                                 "; the adapter file is corrupt or r / rank_pattern is wrong")
        A3, B3 = param_wrapper_factors(A, B, A.shape[0] // r)
        try:
            out |= split_param_wrapper(layer, param, A3, B3, r, alpha, scale)
        except Lora2GGUFError as e:
            raise Lora2GGUFError(f"{path}: {e}") from None
    return out


def module_rules() -> tuple[dict[str, str], list[tuple[re.Pattern, str]]]:
    """Every arch's adapter module names that differ from lora2gguf's: whole modules renamed (Mixtral's
    block_sparse_moe.gate → mlp.gate), and per-expert modules (regex with the expert as group 1) → their stack."""
    aliases = {k: v for a in models.all_archs() for k, v in a.module_aliases.items()}
    per_expert = {k: v for a in models.all_archs() for k, v in a.expert_modules.items()}
    return aliases, [(re.compile(re.escape(k).replace(re.escape("{E}"), r"(\d+)")), v) for k, v in per_expert.items()]


def read_per_expert(path: Path, cfg: dict, parts: dict[str, dict[str, np.ndarray]]) -> dict[str, ModuleLoRA]:
    """transformers-4-style expert LoRA (one pair per expert module: mlp.experts.E.gate_proj, Mixtral's
    block_sparse_moe.experts.E.w1), taken out of `parts` and stacked per layer into the arch's expert_proj
    tensors: A (E, r, in), B (E, out, r), a zero pair for an expert without one (PEFT leaves it unchanged; those past
    the last one are added when the base is known, ModuleLoRA.check_base). One r and one scale per stack."""
    _, per_expert = module_rules()
    found: dict[str, dict[int, str]] = {}
    for mod in parts:
        mt = re.fullmatch(r"(model\.layers\.\d+\.)(.+)", mod)
        for rx, stack in per_expert if mt else ():
            if m := rx.fullmatch(mt.group(2)):
                found.setdefault(mt.group(1) + stack, {})[int(m.group(1))] = mod
                break
    out = {}
    for stack, mods in sorted(found.items()):
        pairs = {e: lora_pair(path, mod, parts[mod], "lora_A", "lora_B") for e, mod in mods.items()}
        scales = {peft_scale(cfg, mod) for mod in mods.values()}
        extra = ("lora_magnitude_vector", "lora_B.bias")
        if len(scales) > 1 or any(k in parts[m] for m in mods.values() for k in extra):
            raise Lora2GGUFError(f"{path}: the per-expert LoRA of {stack} has several ranks or scales, DoRA or a "
                                 "bias; llama.cpp takes one plain LoRA per expert tensor")
        r, alpha, scale = scales.pop()
        A0, B0 = next(iter(pairs.values()))
        if any(A.shape != A0.shape or B.shape != B0.shape or A.shape[0] != r for A, B in pairs.values()):
            raise Lora2GGUFError(f"{path}: the per-expert LoRA pairs of {stack} differ in shape or in rank from r={r}; "
                                 "the adapter file is corrupt")
        n = max(pairs) + 1
        A = np.zeros((n,) + A0.shape, np.float32)
        B = np.zeros((n,) + B0.shape, np.float32)
        for e, (a, b) in pairs.items():
            A[e], B[e] = a, b
        for mod in mods.values():
            del parts[mod]
        out[stack] = ModuleLoRA(stack, A, B, r, alpha, scale, open_experts=True)  # the base says how many there are
    return out


_LORA_KEY = re.compile(r"(.+?)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
                       r"(?:\.default)?(?:\.(weight|bias))?$")


def load_peft(path: str | Path) -> PeftAdapter:
    """Read and validate a PEFT LoRA directory (adapter_config.json + adapter_model.safetensors/.bin)."""
    path = Path(path)
    if not path.is_dir():
        raise Lora2GGUFError(f"{path}: not a directory; expected a PEFT adapter directory")
    cfg = read_config(path)
    tensors = read_tensors(path)
    parts: dict[str, dict[str, np.ndarray]] = {}
    full: dict[str, np.ndarray] = {}
    aliases, _ = module_rules()
    renamed: dict[str, str] = {}  # lora2gguf's module name → the adapter's, where they differ (rank/alpha patterns)
    origin: dict[str, str] = {}  # text-tower module → its path in the checkpoint (what target_modules names)
    vision: set[str] = set()
    for key, t in tensors.items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        if not np.all(np.isfinite(t)):
            raise Lora2GGUFError(f"{path}: tensor {key} contains NaN or Inf; the adapter is broken "
                                 "(retrain, or check the training run for divergence)")
        m = _LORA_KEY.match(name)
        if m:
            mod, kind, suffix = m.groups()
            if _VISION.search(mod):
                vision.add(mod)
                continue
            mod = text_tower(mod)
            mt = re.fullmatch(r"(model\.layers\.\d+\.)(.+)", mod)
            if mt and mt.group(2) in aliases:  # a module on disk under another name (Mixtral's router)
                renamed[mt.group(1) + aliases[mt.group(2)]] = mod
                mod = mt.group(1) + aliases[mt.group(2)]
            origin[mod] = m.group(1)
            parts.setdefault(mod, {})[kind + (".bias" if suffix == "bias" else "")] = t
        elif name.endswith(".base_layer.weight"):
            continue  # a copy of the base weight PEFT saves beside embedding LoRA; not part of the update
        elif name.endswith(".base_layer.bias"):
            full[name.replace(".base_layer.", ".")] = t  # bias="all"/"lora_only": a trained bias
        else:
            full[name.replace(".modules_to_save.default.", ".").replace(".original_module.", ".")] = t
    experts = read_param_wrappers(path, cfg, parts) | read_per_expert(path, cfg, parts)
    if not parts and not full and not experts:
        raise Lora2GGUFError(f"{path}: the adapter holds no LoRA tensors")
    known = {p.split(".")[-1] for a in models.all_archs() for p in a.layer_linears} | {"embed_tokens", "lm_head"}
    for mod in sorted(parts):
        if mod.split(".")[-1] not in known:
            raise Lora2GGUFError(f"{path}: target module {mod} has no GGUF tensor in the supported archs "
                                 f"({', '.join(models.NAMES)}); supported targets: {', '.join(sorted(known))}")
    params = cfg.get("target_parameters") or []  # a 2-D parameter targeted this way is an ordinary LoRA pair
    untargeted = sorted(m for m in parts if not targeted(cfg, origin[m])
                        and not any(f"{origin[m]}.weight" == t or f"{origin[m]}.weight".endswith("." + t)
                                    for t in params))
    if untargeted:
        raise Lora2GGUFError(f"{path}: target_modules {cfg.get('target_modules')!r} in adapter_config.json does not "
                             f"cover {untargeted[0]}, which has LoRA tensors; the config and the weights belong to "
                             "different adapters (PEFT cannot load it either)")
    fan = bool(cfg.get("fan_in_fan_out", False))
    modules: dict[str, ModuleLoRA] = {}
    for mod, p in sorted(parts.items()):
        emb = "lora_embedding_A" in p or "lora_embedding_B" in p
        ka, kb = ("lora_embedding_A", "lora_embedding_B") if emb else ("lora_A", "lora_B")
        A, B = lora_pair(path, mod, p, ka, kb)
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
            raise Lora2GGUFError(f"{path}: {mod}: {ka} {tuple(A.shape)} and {kb} {tuple(B.shape)} "
                                 "do not multiply (rank mismatch); the adapter file is corrupt")
        r, alpha, scale = peft_scale(cfg, renamed.get(mod, mod))
        if r != A.shape[0]:
            raise Lora2GGUFError(f"{path}: {mod} has rank {A.shape[0]} but adapter_config.json says r={r} "
                                 "(check r / rank_pattern)")
        for kind in ("lora_magnitude_vector", "lora_B.bias") if not emb else ():  # per output row of a linear
            if kind in p and p[kind].shape != (n_out := B.shape[0],):
                raise Lora2GGUFError(f"{path}: {mod}.{kind} has shape {tuple(p[kind].shape)}, expected ({n_out},) "
                                     "for its LoRA pair; the adapter file is corrupt")
        modules[mod] = ModuleLoRA(mod, A, B, r, alpha, scale, embedding=emb, fan_in_fan_out=fan and not emb,
                                  magnitude=p.get("lora_magnitude_vector"), bias=p.get("lora_B.bias"))
    notes = [n for n in (bnb_note(path, cfg), vision_note(vision), alora_note(cfg)) if n]
    return PeftAdapter(path, cfg, dict(sorted((modules | experts).items())), full, notes)


# -- writing ---------------------------------------------------------------------------------------------

def lora_config(r: int, lora_alpha: float, target_modules: list[str], base_model: str, *, use_rslora: bool = False,
                dropout: float = 0.0, rank_pattern: dict | None = None, alpha_pattern: dict | None = None,
                layers_to_transform: list[int] | None = None, alora_invocation_tokens: list[int] | None = None,
                target_parameters: list[str] | None = None) -> dict:
    """adapter_config.json as PEFT's LoraConfig writes it: the keys PEFT reads, with its defaults. With
    target_parameters (expert LoRA, written by param_wrapper_tensors) it names the peft release whose layout
    that is (read_param_wrappers reads it back)."""
    cfg = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": r, "lora_alpha": lora_alpha, "use_rslora": use_rslora, "lora_dropout": dropout,
        "target_modules": sorted(target_modules), "rank_pattern": rank_pattern or {},
        "alpha_pattern": alpha_pattern or {}, "layers_to_transform": layers_to_transform, "layers_pattern": None,
        "bias": "none", "fan_in_fan_out": False, "use_dora": False, "lora_bias": False, "modules_to_save": None,
        "init_lora_weights": True, "inference_mode": True, "revision": None,
    }
    if alora_invocation_tokens:
        cfg["alora_invocation_tokens"] = list(alora_invocation_tokens)
    if target_parameters:
        cfg["target_parameters"], cfg["peft_version"] = sorted(target_parameters), param_wrapper_peft_version()
    return cfg


def param_wrapper_peft_version() -> str:
    """The installed peft's version when its 3-D parameter layout is the one written here, else that layout's
    release: peft reads peft_version to place the axes (PR 3165)."""
    try:
        v = metadata.version("peft")
    except metadata.PackageNotFoundError:
        return PARAM_WRAPPER_LAYOUT
    return v if PARAM_WRAPPER_PEFT.match(v) else PARAM_WRAPPER_LAYOUT


def config_for(adapter: PeftAdapter, base_model: str) -> dict:
    """adapter_config.json for an adapter whose modules may each have their own rank and scale: exact module
    paths as targets (so PEFT adapts nothing else), the common rank as r and a rank_pattern entry for each
    other rank; lora_alpha and alpha_pattern such that every module's alpha_m / r_m is the scale its source
    applies (llama.cpp: alpha / r, or 1 when the file's alpha is 0; mlx-lm: its scale)."""
    ranks = Counter(m.r for m in adapter.modules.values())
    r = ranks.most_common(1)[0][0]
    alphas = {n: m.scale * m.r for n, m in adapter.modules.items()}
    lora_alpha = float(Counter(a for n, a in alphas.items() if adapter.modules[n].r == r).most_common(1)[0][0])
    return lora_config(
        r, lora_alpha, list(adapter.modules), base_model,
        rank_pattern={re.escape(n): m.r for n, m in adapter.modules.items() if m.r != r},
        alpha_pattern={re.escape(n): float(a) for n, a in alphas.items()
                       if not math.isclose(a, lora_alpha, rel_tol=1e-9)},
        alora_invocation_tokens=adapter.config.get("alora_invocation_tokens"))


def peft_tensors(adapter: PeftAdapter) -> dict[str, np.ndarray]:
    """The adapter's tensors under the keys PEFT's save_pretrained writes (base_model.model.<module>...)."""
    out = {}
    for name, (a, b) in param_wrapper_tensors(adapter.modules).items():
        out[f"{PREFIX}{name}.lora_A.weight"], out[f"{PREFIX}{name}.lora_B.weight"] = a, b
    for name, m in sorted(adapter.modules.items()):
        if m.A.ndim == 3:
            continue  # written above
        if m.embedding:
            out[f"{PREFIX}{name}.lora_embedding_A"], out[f"{PREFIX}{name}.lora_embedding_B"] = m.A, m.B
        else:
            out[f"{PREFIX}{name}.lora_A.weight"], out[f"{PREFIX}{name}.lora_B.weight"] = m.A, m.B
    return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}


def write_peft_files(directory: Path, adapter: PeftAdapter, config: dict) -> Path:
    """adapter_model.safetensors and adapter_config.json into an existing directory, each file whole or not
    at all (a training run's output directory, a checkpoint)."""
    with atomic_output(directory / "adapter_model.safetensors") as tmp:
        save_file(peft_tensors(adapter), str(tmp), metadata={"format": "pt"})
    with atomic_output(directory / "adapter_config.json") as tmp:
        tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return directory


def write_peft_dir(out: Path, adapter: PeftAdapter, config: dict) -> Path:
    """A new PEFT directory at `out` (checked by check_output_dir), whole or not at all: built in a temp
    directory beside it and renamed into place, an old one (--force) moved aside first."""
    remove_stale_parts(out)
    tmp = Path(tempfile.mkdtemp(prefix=part_prefix(out), suffix=".part", dir=out.parent))
    try:
        write_peft_files(tmp, adapter, config)
        os.chmod(tmp, umask_mode(directory=True))  # mkdtemp made it 0700: servers of other users read it
        fsync_path(tmp)
        old = None
        if out.exists():  # --force, checked above: move the old one aside, then swap
            old = Path(tempfile.mkdtemp(prefix=part_prefix(out), suffix=".old.part", dir=out.parent))
            os.replace(out, old / "x")
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
