"""A PEFT LoRA adapter directory, read into plain numpy per module with PEFT's own scale.

Shared by convert, merge, verify and export: everything that needs "what does this adapter add to
which base weight" asks this module. Layout here is Hugging Face's (HF module names, HF row order);
moving to GGUF names/row order is the architecture's job (models/).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import models
from .errors import Lora2GGUFError

PREFIX = "base_model.model."



@dataclass
class ModuleLoRA:
    """One adapted module. A and B exactly as PEFT stores them."""

    module: str  # HF module path: model.layers.0.self_attn.q_proj, model.embed_tokens, lm_head
    A: np.ndarray  # lora_A.weight (r, in) — or lora_embedding_A (r, vocab)
    B: np.ndarray  # lora_B.weight (out, r) — or lora_embedding_B (dim, r)
    r: int
    alpha: float
    scale: float  # PEFT's: alpha / r, or alpha / sqrt(r) with rsLoRA
    embedding: bool = False
    fan_in_fan_out: bool = False
    magnitude: np.ndarray | None = None  # DoRA lora_magnitude_vector (out,)
    bias: np.ndarray | None = None  # lora_B.bias (out,) with lora_bias=True

    @property
    def weight_name(self) -> str:
        return self.module + ".weight"

    def delta(self) -> np.ndarray:
        """scale · B @ A in the layout of the base weight (out, in); embeddings: (vocab, dim).
        Not the DoRA update (that needs the base weight: see merge)."""
        d = (self.B.astype(np.float64) @ self.A.astype(np.float64)) * self.scale
        if self.embedding or self.fan_in_fan_out:
            d = d.T
        return d.astype(np.float32)

    def factors(self) -> tuple[np.ndarray, np.ndarray]:
        """(a, b) with b @ a == delta()/scale, a: (r, in), b: (out, r) in the base weight's layout."""
        if self.embedding or self.fan_in_fan_out:
            return self.B.T, self.A.T
        return self.A, self.B

    def row_block(self, rows: slice) -> "ModuleLoRA":
        """The part of this LoRA that produces these output rows (ΔW rows are rows of B, or columns of A
        for embeddings); DoRA's per-row magnitude goes with them."""
        if self.embedding or self.fan_in_fan_out:
            return dataclasses.replace(self, A=self.A[:, rows], bias=None)
        mag = None if self.magnitude is None else self.magnitude[rows]
        return dataclasses.replace(self, B=self.B[rows], magnitude=mag, bias=None)

    def delta_shape(self) -> tuple[int, int]:
        a, b = self.factors()
        return (b.shape[0], a.shape[1])


@dataclass
class PeftAdapter:
    path: Path
    config: dict
    modules: dict[str, ModuleLoRA]  # by HF module path
    full_weights: dict[str, np.ndarray] = field(default_factory=dict)  # modules_to_save / trained biases
    notes: list[str] = field(default_factory=list)  # one line each, for the verbs to print (bnb base, skipped towers)

    @property
    def use_dora(self) -> bool:
        return any(m.magnitude is not None for m in self.modules.values())

    @property
    def has_lora_bias(self) -> bool:
        return any(m.bias is not None for m in self.modules.values())

    def check_base(self, spec, base_label: str = "base") -> None:
        """Every adapted module must exist in the base with matching shapes; raise otherwise."""
        arch = spec.arch_module
        shapes = arch.target_shapes(spec)
        for name, m in self.modules.items():
            if name == "model.embed_tokens":
                want = (spec.n_vocab, spec.n_embd)
            elif name == "lm_head":
                if spec.tied_embeddings:
                    raise Lora2GGUFError(
                        f"{self.path}: LoRA on lm_head, but {base_label} ties lm_head to the token embeddings "
                        "(no separate output tensor), so llama.cpp cannot apply it at run time; "
                        "use `lora2gguf merge` (it writes an untied output tensor) or retrain without lm_head")
                want = (spec.n_vocab, spec.n_embd)
            else:
                mt = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
                if not mt or mt.group(2) not in shapes:
                    raise Lora2GGUFError(
                        f"{self.path}: target module {name} has no GGUF tensor in arch {spec.arch}; "
                        f"supported targets: {', '.join(p.split('.')[-1] for p in arch.layer_linears)}, "
                        "embed_tokens, lm_head")
                if int(mt.group(1)) >= spec.n_layer:
                    raise Lora2GGUFError(f"{self.path}: {name} is beyond the {spec.n_layer} layers of {base_label}; "
                                         "the adapter was made for another model")
                want = shapes[mt.group(2)]
            got = m.delta_shape()
            if got != want:
                raise Lora2GGUFError(
                    f"{self.path}: {name} changes a {got[0]}x{got[1]} weight but {base_label} has {want[0]}x{want[1]}; "
                    "the adapter was made for another model")


def pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern/alpha_pattern lookup (peft.utils.other.get_pattern_key): the first key that
    matches the end of the module path as a regex, after a dot or at the start."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return default


def peft_scale(config: dict, module: str) -> tuple[int, float, float]:
    """(r, alpha, scale) PEFT uses for this module."""
    r = int(pattern_value(config.get("rank_pattern") or {}, module, config["r"]))
    alpha = float(pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"]))
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return r, alpha, scale


def read_json_object(cfg_path: Path, missing: str) -> dict:
    """A JSON object from a config file; `missing` is the error when the file is not there."""
    if not cfg_path.is_file():
        raise Lora2GGUFError(missing)
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise Lora2GGUFError(f"{cfg_path}: invalid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise Lora2GGUFError(f"{cfg_path}: expected a JSON object")
    return cfg


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


_ST_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2"}


def safetensors_header(path: Path, float_only: bool = True) -> dict:
    """The header of a safetensors file ({name: {dtype, shape, data_offsets}}, plus __metadata__), after the
    safetensors library itself has validated the file: header length and JSON, known dtypes, every
    tensor's offsets matching its shape and dtype, no overlap, the data section covered exactly (so a
    truncated file is caught here). float_only: any tensor that is not F32/F16/BF16/F64 is an error."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy"):
            pass
        with open(path, "rb") as fh:  # the library checked it: read the offsets it validated
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
    except (SafetensorError, OSError, ValueError, struct.error) as e:  # JSONDecodeError is a ValueError
        why = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise Lora2GGUFError(f"{path}: not a readable safetensors file ({why}); the file is truncated or "
                             "corrupt, save or download it again") from None
    if float_only:
        for key, info in header.items():
            if key != "__metadata__" and info["dtype"] not in _ST_DTYPES:
                raise Lora2GGUFError(f"{path}: tensor {key} has dtype {info['dtype']}; expected a floating-point "
                                     f"type ({', '.join(_ST_DTYPES)})")
    return header


def read_safetensors_f32(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as float32 numpy, without torch (importing torch costs ~3 s,
    more than the whole convert). The safetensors library validates the file (safetensors_header); the
    bytes are then viewed by hand because safetensors' numpy loader cannot produce bf16."""
    header = safetensors_header(path)
    try:
        with open(path, "rb") as fh:
            fh.seek(8 + struct.unpack("<Q", fh.read(8))[0])
            data = np.frombuffer(fh.read(), dtype=np.uint8)
    except OSError as e:
        raise Lora2GGUFError(f"{path}: cannot read it ({e})") from None
    out = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        lo, hi = info["data_offsets"]
        arr = data[lo:hi].view(_ST_DTYPES[info["dtype"]]).reshape(tuple(info["shape"]))
        # bf16 is the top half of a float32
        out[key] = (arr.astype(np.uint32) << 16).view(np.float32) if info["dtype"] == "BF16" else arr.astype(np.float32)
    return out


def read_tensors(path: Path) -> dict[str, np.ndarray]:
    st, binf = path / "adapter_model.safetensors", path / "adapter_model.bin"
    if st.is_file():
        return read_safetensors_f32(st)
    if binf.is_file():
        return read_torch_pickle(binf, "PEFT's save_pretrained")
    raise Lora2GGUFError(f"{path}: no adapter_model.safetensors or adapter_model.bin")


def read_torch_pickle(binf: Path, writer: str) -> dict[str, np.ndarray]:
    """A torch pickle of a flat {name: tensor} dict (PEFT's adapter_model.bin, torchtune's adapter_model.pt),
    loaded with weights_only: tensors and plain containers only, never code."""
    import warnings

    import torch

    try:  # weights_only: tensors and plain containers only, never arbitrary objects
        with warnings.catch_warnings():  # torch warns about pickle protocols it may not support
            warnings.simplefilter("ignore")
            sd = torch.load(binf, map_location="cpu", weights_only=True)
    except Exception as e:  # whatever an untrusted file makes the unpickler raise, it is the file's fault
        text = str(e) or type(e).__name__
        lines = [x.strip() for x in text.splitlines() if x.strip()]
        # torch's refusal: boilerplate, then what the pickle asked for (a GLOBAL it blocks, an opcode)
        what = next((x for x in lines[1:] if re.search(r"unsupported", x, re.I) and "file an issue" not in x), None)
        why = f"it holds more than tensors: {what}" if what else lines[0]
        why = re.split(r"(?<=[a-z])\. ", why)[0].rstrip(".")[:160]
        raise Lora2GGUFError(f"{binf}: refused to load ({why}); only plain tensors are loaded from a pickle "
                             "(torch.load weights_only), never code: save the adapter as safetensors") from None
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise Lora2GGUFError(f"{binf}: expected a dict of tensors (what {writer} writes)")
    for k, v in sd.items():
        if not v.is_floating_point():
            raise Lora2GGUFError(f"{binf}: tensor {k} has dtype {str(v.dtype).removeprefix('torch.')}; "
                                 "expected a floating-point type")
    return {k: v.float().numpy() for k, v in sd.items()}


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
            origin[text_tower(mod)] = mod
            parts.setdefault(text_tower(mod), {})[kind + (".bias" if suffix == "bias" else "")] = t
        elif name.endswith(".base_layer.weight"):
            continue  # a copy of the base weight PEFT saves beside embedding LoRA; not part of the update
        elif name.endswith(".base_layer.bias"):
            full[name.replace(".base_layer.", ".")] = t  # bias="all"/"lora_only": a trained bias
        else:
            full[name.replace(".modules_to_save.default.", ".").replace(".original_module.", ".")] = t
    if not parts and not full:
        raise Lora2GGUFError(f"{path}: the adapter holds no LoRA tensors")
    known = {p.split(".")[-1] for a in models.all_archs() for p in a.layer_linears} | {"embed_tokens", "lm_head"}
    for mod in sorted(parts):
        if mod.split(".")[-1] not in known:
            raise Lora2GGUFError(f"{path}: target module {mod} has no GGUF tensor in the supported archs "
                                 f"({', '.join(models.NAMES)}); supported targets: {', '.join(sorted(known))}")
    untargeted = sorted(m for m in parts if not targeted(cfg, origin[m]))
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
        r, alpha, scale = peft_scale(cfg, mod)
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
    return PeftAdapter(path, cfg, modules, full, notes)


def merged_weight(w: np.ndarray, mods: list[tuple[ModuleLoRA, float]]) -> np.ndarray:
    """The base weight (HF layout) with these adapters applied as PEFT computes them, in float64:
    W + Σ u·s·B·A, where u is the user's scale and s PEFT's; a DoRA module contributes
    (m / ‖W + u·s·B·A‖_row − 1)·W + (m / ‖W + u·s·B·A‖_row)·u·s·B·A (PEFT's DoRA forward, merged).
    As in PEFT, each adapter's DoRA norm is taken against the base weight, not the others' sum."""
    base = w.astype(np.float64)
    out = base.copy()
    for m, u in mods:
        d = m.delta().astype(np.float64) if u == 1.0 else m.delta().astype(np.float64) * u
        if m.magnitude is None:
            out += d
        else:
            norm = np.linalg.norm(base + d, axis=1, keepdims=True)
            g = m.magnitude.astype(np.float64).reshape(-1, 1) / norm
            out += (g - 1.0) * base + g * d
    return out


def merged_bias(b: np.ndarray | None, n_out: int, mods: list[tuple[ModuleLoRA, float]]) -> np.ndarray | None:
    """The module's bias after LoRA bias terms (lora_B.bias · s · u); None when nothing adds one."""
    terms = [(m, u) for m, u in mods if m.bias is not None]
    if not terms:
        return b
    out = np.zeros(n_out, np.float64) if b is None else b.astype(np.float64)
    for m, u in terms:
        out += m.bias.astype(np.float64) * m.scale * u
    return out
