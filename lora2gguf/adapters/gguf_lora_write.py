"""Write a GGUF LoRA adapter (what llama.cpp loads with --lora) from a PEFT adapter in memory.

Exact where llama.cpp's own convert_lora_to_gguf.py is not: a GGUF adapter carries ONE alpha and
llama.cpp scales each tensor by alpha / r_m, while PEFT scales each module by its own scale_m
(alpha_m / r_m, alpha_m / sqrt(r_m) with rsLoRA, rank_pattern / alpha_pattern). We write the config's
lora_alpha and fold scale_m / (alpha / r_m) into that module's lora_b wherever it is not 1, so plain
LoRA stays bit-identical to llama.cpp's converter and everything else matches PEFT.

Light on purpose: no torch (unless the adapter is a .bin), no transformers, and the base is only read
for its header and a small fingerprint sample. The reader is adapters.gguf_lora.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUFWriter
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType as V

from lora2gguf import __version__
from lora2gguf.adapters.load import adapter_format, load_adapter, say_notes
from lora2gguf.adapters.lora import ModuleLoRA, PeftAdapter
from lora2gguf.adapters.rules import MERGE_HINT, check_arch, check_tied_embedding, llama_scale, to_gguf_pair
from lora2gguf.errors import Lora2GGUFError
from lora2gguf.fileio.atomic import atomic_output
from lora2gguf.fileio.gguf_write import PlannedTensor, encode, nbytes_of, write_streaming
from lora2gguf.weights.base_model import open_base
from lora2gguf.weights.fingerprint import fingerprint

OUTTYPES = ("f32", "f16", "bf16", "q8_0")


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
    for key, what in (("layer_replication", "layer replication"), ("use_qalora", "QA-LoRA"),
                      ("arrow_config", "Arrow routing")):  # target_parameters: adapters.peft reads expert LoRA
        if cfg.get(key):
            raise Lora2GGUFError(f"{p}: {what} ({key} in adapter_config.json) changes the model beyond a low-rank "
                                 "update of existing weights; a GGUF LoRA cannot express it")
    invocation_tokens(adapter)  # aLoRA: written as adapter.alora.invocation_tokens; refused if malformed


def invocation_tokens(adapter: PeftAdapter) -> list[int] | None:
    """An activated LoRA's invocation token ids (PEFT's alora_invocation_tokens), which llama-server finds in
    the prompt to switch the adapter on from there; None for a plain LoRA."""
    p, cfg = adapter.path, adapter.config
    toks = cfg.get("alora_invocation_tokens")
    if not toks:
        if cfg.get("invocation_string"):
            raise Lora2GGUFError(f"{p}: aLoRA with an invocation_string but no alora_invocation_tokens; tokenize "
                                 "the string with the model's tokenizer and set alora_invocation_tokens (PEFT "
                                 "needs them too)")
        return None
    if not isinstance(toks, list) or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2**31
                                             for t in toks):
        raise Lora2GGUFError(f"{p}: alora_invocation_tokens must be a list of token ids, got {toks!r}")
    return toks


def module_tensors(m: ModuleLoRA, spec, alpha_file: float) -> LoraTensors:
    """A module's lora_a / lora_b in llama.cpp's layout, PEFT's scale folded in where llama.cpp's differs."""
    arch = spec.arch_module
    a, b = m.factors()  # b @ a == delta / scale, in the base weight's (HF) layout
    if not m.embedding:  # B's rows are W's rows: ordered as the GGUF stores them (llama's q/k permutation)
        b = arch.rows_to_gguf(spec, m.weight_name, b)
    lora_a, lora_b = to_gguf_pair(a, b, m.embedding)
    fold = m.scale / llama_scale(alpha_file, m.r)
    if math.isclose(fold, 1.0, rel_tol=1e-12):
        fold = 1.0
    else:
        lora_b = (lora_b.astype(np.float64) * fold).astype(np.float32)
    name = arch.gguf_name(spec.n_layer, m.weight_name)
    return LoraTensors(name, np.ascontiguousarray(lora_a, np.float32), np.ascontiguousarray(lora_b, np.float32), fold)


def tensor_type(arr: np.ndarray, outtype: str):
    """GGML type for one tensor: as asked, falling back to F16 when the row length does not fit Q8_0's
    32-value blocks (llama.cpp's converter does the same)."""
    qtype = {"f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0}[outtype]
    if arr.shape[-1] % GGML_QUANT_SIZES[qtype][0]:
        return T.F16
    return qtype


def check_outtype(outtype: str, option: str = "--outtype") -> None:
    if outtype not in OUTTYPES:
        raise Lora2GGUFError(f"{option} {outtype!r} is not one of {', '.join(OUTTYPES)}")


def gguf_from_peft(adapter_dir: str | os.PathLike, base: str | os.PathLike, out: Path, outtype: str = "f32",
                   print_notes: bool = False) -> Path:
    """The adapter directory at `adapter_dir` (PEFT, torchtune or mlx-lm: adapters.load tells), for `base`
    (GGUF file, HF directory or config.json), written as a GGUF LoRA at `out` (atomically; the caller has
    checked the output path). print_notes: print the adapter's notes (a 4-bit training base...) on stderr."""
    check_outtype(outtype)
    if adapter_format(Path(adapter_dir)) == "gguf":  # a bad path is refused before the base is read
        raise Lora2GGUFError(f"{adapter_dir}: not a directory; expected an adapter directory (PEFT, torchtune or "
                             "mlx-lm); a GGUF LoRA needs no conversion")
    with open_base(base) as b:
        spec = b.spec
        adapter = load_adapter(adapter_dir, spec)  # the spec un-permutes a torchtune file's q/k rows
        refuse_unsupported(adapter)
        check_arch(adapter, spec, b.path)
        adapter.check_base(spec, f"base {b.path}")
        check_tied_embedding(adapter.modules, spec, adapter.path, f"base {b.path}")
        fp = fingerprint(b)
    if print_notes:
        say_notes(adapter)
    write_gguf_lora(out, adapter, spec, float(adapter.config["lora_alpha"]), outtype, fp)
    return out


def write_gguf_lora(out: Path, adapter: PeftAdapter, spec, alpha_file: float, outtype: str, fp) -> None:
    """Write `adapter`'s modules for a base of `spec` with one file alpha, PEFT's per-module scales folded
    in, and our provenance (ranks, targets, the base fingerprint `fp`) as metadata."""
    tensors = [module_tensors(m, spec, alpha_file) for m in adapter.modules.values()]
    w = GGUFWriter(None, spec.arch)
    w.add_type("adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", alpha_file)
    if (toks := invocation_tokens(adapter)) is not None:  # llama.cpp requires UINT32 elements
        w.add_key_value("adapter.alora.invocation_tokens", toks, V.ARRAY, sub_type=V.UINT32)
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
        if isinstance(value, np.ndarray):
            meta[key] = (value.tolist(), V.ARRAY, V.UINT32 if value.dtype.kind in "iu" else V.FLOAT32)
        else:
            meta[key] = (value, V.STRING)
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
