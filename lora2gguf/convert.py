"""`lora2gguf convert`: a PEFT LoRA directory → a GGUF LoRA adapter that llama.cpp loads with --lora.

Exact where llama.cpp's own convert_lora_to_gguf.py is not: a GGUF adapter carries ONE alpha and
llama.cpp scales each tensor by alpha / r_m, while PEFT scales each module by its own scale_m
(alpha_m / r_m, alpha_m / sqrt(r_m) with rsLoRA, rank_pattern / alpha_pattern). We write the config's
lora_alpha and fold scale_m / (alpha / r_m) into that module's lora_b wherever it is not 1, so plain
LoRA stays bit-identical to llama.cpp's converter and everything else matches PEFT.

Light on purpose: no torch (unless the adapter is a .bin), no transformers, and the base is only read
for its header and a small fingerprint sample.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import __version__, archs
from .adapter import ModuleLoRA, PeftAdapter, load_peft
from .errors import Lora2GGUFError

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
MERGE_HINT = "`lora2gguf merge` applies it exactly into the base instead"


@dataclass(frozen=True)
class LoraTensors:
    """One module in GGUF terms: the base tensor name and the numpy arrays to write."""

    base_name: str
    lora_a: np.ndarray  # numpy (r, in); token_embd: (vocab, r)
    lora_b: np.ndarray  # numpy (out, r); token_embd: (dim, r)
    fold: float  # factor folded into lora_b (1.0: untouched)


def refuse_unsupported(adapter: PeftAdapter) -> None:
    """Features a GGUF LoRA cannot express: raise with the feature and the way out."""
    p, cfg = adapter.path, adapter.config
    if adapter.use_dora or cfg.get("use_dora"):
        raise Lora2GGUFError(f"{p}: DoRA (use_dora / lora_magnitude_vector) cannot be expressed as a GGUF LoRA "
                             f"(llama.cpp has no magnitude vector); {MERGE_HINT}")
    if adapter.has_lora_bias or cfg.get("lora_bias"):
        raise Lora2GGUFError(f"{p}: LoRA bias (lora_bias=True, lora_B.bias tensors) cannot be expressed as a GGUF "
                             f"LoRA; {MERGE_HINT}")
    if adapter.full_weights:
        names = sorted(adapter.full_weights)
        biases = [n for n in names if n.endswith(".bias")]
        what = (f"trained biases (bias={cfg.get('bias')!r}: {biases[0]}, ...)" if biases else
                f"full weights from modules_to_save / trainable tokens ({names[0]}, ...)")
        raise Lora2GGUFError(f"{p}: the adapter carries {what}, which a GGUF LoRA cannot hold; {MERGE_HINT}")
    for key, what in (("layer_replication", "layer replication"), ("target_parameters", "LoRA on raw parameters"),
                      ("use_qalora", "QA-LoRA"), ("arrow_config", "Arrow routing")):
        if cfg.get(key):
            raise Lora2GGUFError(f"{p}: {what} ({key} in adapter_config.json) changes the model beyond a low-rank "
                                 "update of existing weights; a GGUF LoRA cannot express it")
    if cfg.get("alora_invocation_tokens") or cfg.get("invocation_string"):
        raise Lora2GGUFError(f"{p}: activated LoRA (aLoRA invocation tokens) is not supported by lora2gguf yet; "
                             "use llama.cpp's convert_lora_to_gguf.py for it")


def check_arch(adapter: PeftAdapter, spec, base_path) -> None:
    """PEFT records the transformers class it wrapped; refuse an adapter made for another known arch
    (shapes alone cannot tell a qwen2 adapter from a llama one of the same size)."""
    cls = (adapter.config.get("auto_mapping") or {}).get("base_model_class")
    other = next((f.name for f in archs.ARCHS.values() if cls in f.hf_architectures), None)
    if other is not None and other != spec.arch:
        raise Lora2GGUFError(f"{adapter.path}: the adapter was made on a {cls} ({other}) but {base_path} is a "
                             f"{spec.arch} model; pass the base it was trained on")


def check_tied_embedding(modules, spec, where, base_label: str) -> None:
    """With tied embeddings llama.cpp multiplies the output by token_embd.weight and applies any LoRA on
    that tensor there too, in the flipped embedding layout: its graph asserts and the process aborts.
    PEFT applies embedding LoRA to the lookup only, so no GGUF LoRA can express it on a tied base."""
    if "model.embed_tokens" in modules and spec.tied_embeddings:
        raise Lora2GGUFError(f"{where}: LoRA on embed_tokens, but {base_label} ties the output head to the token "
                             "embeddings, so llama.cpp would apply it to the output as well (and abort); "
                             f"{MERGE_HINT}")


def llama_scale(alpha_file: float, r: int) -> float:
    """What llama.cpp multiplies a rank-r tensor pair by at run time (user scale 1)."""
    return alpha_file / r if alpha_file else 1.0


def module_tensors(m: ModuleLoRA, spec, alpha_file: float) -> LoraTensors:
    """A module's lora_a / lora_b in llama.cpp's layout, PEFT's scale folded in where llama.cpp's differs."""
    a, b = m.factors()  # b @ a == delta / scale, in the base weight's (HF) layout
    if m.embedding:  # llama.cpp gathers lora_a by token id, then multiplies by lora_b: see build_inp_embd
        lora_a, lora_b = b, a.T
    else:
        lora_a, lora_b = a, b
        heads = archs.qk_heads(m.weight_name, spec.n_head, spec.n_head_kv)
        if heads and spec.facts.permute_qk:
            lora_b = archs.permute_rows(lora_b, heads)
    fold = m.scale / llama_scale(alpha_file, m.r)
    if math.isclose(fold, 1.0, rel_tol=1e-12):
        fold = 1.0
    else:
        lora_b = (lora_b.astype(np.float64) * fold).astype(np.float32)
    name = archs.gguf_name(spec.arch, spec.n_layer, m.weight_name)
    return LoraTensors(name, np.ascontiguousarray(lora_a, np.float32), np.ascontiguousarray(lora_b, np.float32), fold)


def tensor_type(arr: np.ndarray, outtype: str):
    """GGML type for one tensor: as asked, falling back to F16 when the row length does not fit Q8_0's
    32-value blocks (llama.cpp's converter does the same)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

    qtype = {"f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0}[outtype]
    if arr.shape[-1] % GGML_QUANT_SIZES[qtype][0]:
        return T.F16
    return qtype


def convert(adapter_dir: str | os.PathLike, base: str | os.PathLike, out: str | os.PathLike,
            outtype: str = "f32", force: bool = False) -> Path:
    """Convert a PEFT adapter for `base` (GGUF file, HF directory or config.json) into a GGUF LoRA at `out`."""
    from .base import open_base
    from .gguf_write import check_output

    if outtype not in OUTTYPES:
        raise Lora2GGUFError(f"--outtype {outtype!r} is not one of {', '.join(OUTTYPES)}")
    out = check_output(out, force, inputs=[adapter_dir, base])
    adapter = load_peft(adapter_dir)
    refuse_unsupported(adapter)
    # PEFT resets fan_in_fan_out to False on nn.Linear, and every target of these archs is an nn.Linear
    # (or the embedding), so the flag changes nothing in PEFT's forward: follow PEFT, not the flag.
    for m in adapter.modules.values():
        m.fan_in_fan_out = False
    with open_base(base) as b:
        spec = b.spec
        check_arch(adapter, spec, b.path)
        adapter.check_base(spec, f"base {b.path}")
        check_tied_embedding(adapter.modules, spec, adapter.path, f"base {b.path}")
        from .fingerprint import fingerprint

        fp = fingerprint(b)
    alpha_file = float(adapter.config["lora_alpha"])
    tensors = [module_tensors(m, spec, alpha_file) for m in adapter.modules.values()]
    _write(out, adapter, spec, tensors, alpha_file, outtype, fp)
    return out


def _write(out: Path, adapter: PeftAdapter, spec, tensors: list[LoraTensors], alpha_file: float,
           outtype: str, fp) -> None:
    from gguf import GGUFValueType as V
    from gguf import GGUFWriter

    from .gguf_write import PlannedTensor, atomic_output, encode, nbytes_of, write_streaming

    w = GGUFWriter(None, spec.arch)
    w.add_type("adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", alpha_file)
    w.add_name(adapter.path.resolve().name)
    ranks = sorted({m.r for m in adapter.modules.values()})
    cfg = adapter.config
    meta = {
        "lora2gguf.version": (__version__, V.STRING),
        "lora2gguf.base.name": (spec.name, V.STRING),
        "lora2gguf.base.arch": (spec.arch, V.STRING),
        "lora2gguf.ranks": (ranks, V.ARRAY, V.UINT32),
        "lora2gguf.target_modules": (sorted({n.split(".")[-1] for n in adapter.modules}), V.ARRAY, V.STRING),
        "lora2gguf.modules": (len(adapter.modules), V.UINT32),
        "lora2gguf.scale_folded": ([t.base_name for t in tensors if t.fold != 1.0], V.ARRAY, V.STRING),
        "lora2gguf.peft_config": (json.dumps(cfg, sort_keys=True), V.STRING),
        "lora2gguf.peft_base_model": (str(cfg.get("base_model_name_or_path") or ""), V.STRING),
    }
    for key, value in fp.to_fields().items():
        meta[key] = (value.tolist(), V.ARRAY, V.FLOAT32) if isinstance(value, np.ndarray) else (value, V.STRING)
    for key, (value, vtype, *sub) in meta.items():
        if vtype == V.ARRAY and not value:
            continue  # gguf-py cannot type an empty array
        w.add_key_value(key, value, vtype, sub_type=sub[0] if sub else None)
    arrays = []
    for t in tensors:
        arrays += [(t.base_name + ".lora_a", t.lora_a), (t.base_name + ".lora_b", t.lora_b)]
    types = [tensor_type(arr, outtype) for _, arr in arrays]
    plan = [PlannedTensor(n, arr.shape, q, nbytes_of(arr.shape, q)) for (n, arr), q in zip(arrays, types)]
    with atomic_output(out) as tmp:
        write_streaming(tmp, w, plan, (encode(arr, q) for (_, arr), q in zip(arrays, types)))
