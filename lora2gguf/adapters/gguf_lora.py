"""Read a GGUF LoRA adapter (ours or llama.cpp's convert_lora_to_gguf.py) back into the HF-layout
structure of adapters.lora.PeftAdapter, with exactly llama.cpp's run-time semantics: per tensor,
scale = alpha / r with r the rank of that tensor, and alpha == 0 meaning scale 1.

Merge, verify and export use this to get "what does this GGUF adapter add to which HF weight"."""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path

import numpy as np

from lora2gguf import models
from lora2gguf.adapters.lora import ModuleLoRA, PeftAdapter
from lora2gguf.adapters.rules import check_tied_embedding, from_gguf_pair, llama_alpha, llama_scale
from lora2gguf.errors import Lora2GGUFError
from lora2gguf.fileio.gguf_read import GGUFFile
from lora2gguf.weights import fingerprint
from lora2gguf.weights.base_model import open_base

TOKEN_EMBD = "token_embd.weight"


def _check_header(f: GGUFFile) -> str:
    if f.string("general.type") != "adapter":
        raise Lora2GGUFError(f"{f.path}: general.type is {f.get('general.type')!r}, not 'adapter'; "
                             "this is not a GGUF LoRA adapter (a base model goes after --base)")
    if f.string("adapter.type") != "lora":
        raise Lora2GGUFError(f"{f.path}: adapter.type is {f.get('adapter.type')!r}; only 'lora' adapters are supported")
    arch = f.string("general.architecture")
    if arch is None:
        raise Lora2GGUFError(f"{f.path}: no general.architecture in the adapter's metadata")
    return models.for_gguf(f, str(f.path)).gguf_arch


def _alpha(f: GGUFFile) -> float:
    """adapter.lora.alpha (absent: 0, which llama.cpp reads as scale 1); a finite number or an error."""
    return f.number("adapter.lora.alpha", 0.0)


def _rank(f: GGUFFile, base_name: str, ka: str, kb: str) -> int:
    """The rank of a lora_a / lora_b pair from their shapes, or an error if they cannot multiply."""
    a, b = f.tensors[ka].shape, f.tensors[kb].shape
    if len(a) == len(b) == 3 and a[0] == b[0]:  # stacked experts (*_exps): lora_a (E, r, in), lora_b (E, out, r)
        a, b = a[1:], b[1:]
    elif len(a) != 2 or len(b) != 2:
        raise Lora2GGUFError(f"{f.path}: {ka} {a} and {kb} {b} are neither both matrices nor both stacks of one "
                             "matrix per expert; the file is corrupt")
    r_a = a[1] if base_name == TOKEN_EMBD else a[0]  # token_embd's lora_a is (vocab, r), others (r, in)
    if r_a != b[1] or r_a < 1:
        raise Lora2GGUFError(f"{f.path}: {ka} {a} and {kb} {b} do not multiply (rank mismatch); the file is corrupt")
    return int(r_a)


def _finite(f: GGUFFile, name: str, t: np.ndarray) -> np.ndarray:
    if not np.isfinite(t).all():
        raise Lora2GGUFError(f"{f.path}: tensor {name} contains NaN or Inf; the adapter is broken "
                             "(retrain, or check the training run for divergence)")
    return t


def _pairs(f: GGUFFile) -> dict[str, tuple[str, str]]:
    """base tensor name → (lora_a tensor name, lora_b tensor name); norms are skipped as llama.cpp does."""
    parts: dict[str, dict[str, str]] = {}
    for name in f.tensors:
        m = re.fullmatch(r"(.+)\.lora_(a|b)", name)
        if m:
            parts.setdefault(m.group(1), {})[m.group(2)] = name
        elif not name.endswith("_norm.weight"):
            raise Lora2GGUFError(f"{f.path}: tensor {name} is neither .lora_a nor .lora_b; not a LoRA adapter llama.cpp loads")
    for base_name, p in parts.items():
        if len(p) != 2:
            raise Lora2GGUFError(f"{f.path}: {base_name} has lora_{'a' if 'a' in p else 'b'} without its pair; "
                                 "the adapter is incomplete")
        _rank(f, base_name, p["a"], p["b"])
    return {k: (p["a"], p["b"]) for k, p in sorted(parts.items())}


def _n_layer(names) -> int:
    blocks = [int(m.group(1)) for n in names if (m := re.match(r"blk\.(\d+)\.", n))]
    return max(blocks) + 1 if blocks else 1


def load_gguf_lora(path: str | os.PathLike, spec=None, any_qk_order: bool = False) -> PeftAdapter:
    """The adapter as PeftAdapter: HF module names, A (r, in) / B (out, r) in HF layout (q/k rows of B
    un-permuted for llama-family archs, token_embd's flipped pair turned back into PEFT's
    lora_embedding_A/B), and scale = alpha_file / r per module (1 when alpha is 0), as llama.cpp applies
    it. `spec` (base.ModelSpec) is needed to un-permute q/k of llama-family archs; shapes are checked
    against it when given. any_qk_order: without a spec, leave permuted q/k rows in llama.cpp's order
    instead of refusing (for uses that a row permutation cannot change: singular values, norms)."""
    path = Path(path)
    with GGUFFile(path) as f:
        arch = _check_header(f)
        if spec is not None and spec.arch != arch:
            raise Lora2GGUFError(f"{path}: adapter is for arch {arch}, the base is {spec.arch}; "
                                 "llama.cpp refuses it (\"model arch and LoRA arch mismatch\")")
        alpha = _alpha(f)
        pairs = _pairs(f)
        if not pairs:
            raise Lora2GGUFError(f"{path}: the adapter holds no LoRA tensors")
        n_layer = spec.n_layer if spec is not None else _n_layer(pairs)
        am = spec.arch_module if spec is not None else models.for_gguf(f, str(path))  # Mixtral: a llama file
        hf_of = {am.gguf_name(n_layer, h): h for h in am.lora_weight_names(n_layer)}
        modules: dict[str, ModuleLoRA] = {}
        for gname, (ka, kb) in pairs.items():
            hf = hf_of.get(gname)
            if hf is None:
                raise Lora2GGUFError(f"{path}: LoRA on {gname}, which is not a projection or embedding of a "
                                     f"{n_layer}-layer {arch} model; the adapter was made for another model")
            a, b = _finite(f, ka, f.tensor(ka)), _finite(f, kb, f.tensor(kb))
            emb = gname == TOKEN_EMBD
            A, B = from_gguf_pair(a, b, emb)  # (checked by _pairs: matrices, or stacks of one per expert)
            if A.shape[-2] != B.shape[-1]:
                raise Lora2GGUFError(f"{path}: {ka} {a.shape} and {kb} {b.shape} do not multiply; the file is corrupt")
            mod = hf[: -len(".weight")]
            if not emb and am.permutes_rows(spec, hf):
                if spec is not None:
                    B = am.rows_from_gguf(spec, hf, B)
                elif not any_qk_order:  # any_qk_order: the caller only needs what a row permutation keeps
                    raise Lora2GGUFError(f"{path}: {arch} stores q/k rows permuted; pass the base model so that "
                                         "they can be un-permuted")
            r = int(A.shape[-2])
            modules[mod] = ModuleLoRA(mod, np.ascontiguousarray(A), np.ascontiguousarray(B), r,
                                      llama_alpha(alpha, r), llama_scale(alpha, r), embedding=emb)
        ranks = Counter(m.r for m in modules.values())
        config = {"peft_type": "LORA", "r": ranks.most_common(1)[0][0], "lora_alpha": alpha,
                  "target_modules": sorted(modules), "gguf": provenance(f)}
        if (toks := f.get("adapter.alora.invocation_tokens")) is not None:  # an activated LoRA
            config["alora_invocation_tokens"] = [int(t) for t in toks]
    adapter = PeftAdapter(path, config, modules)
    if spec is not None:
        adapter.check_base(spec, "the base")
        check_tied_embedding(modules, spec, path, "the base")
    return adapter


def recorded_fingerprint(f: GGUFFile):
    """The base fingerprint convert recorded in this adapter (fingerprint.Fingerprint), None when there is
    none (not written by lora2gguf); corrupt fingerprint metadata is an error, not a mismatch."""
    s, v = f.fields.get(fingerprint.KEY_STRUCTURE), f.fields.get(fingerprint.KEY_SAMPLE)
    if s is None and v is None:
        return None
    ok = (s is not None and v is not None and s.type.name == "STRING" and isinstance(v.value, np.ndarray)
          and v.value.ndim == 1 and len(v.value) % fingerprint.PER_TENSOR == 0)
    if ok:
        with np.errstate(all="ignore"):
            sample = v.value.astype(np.float32)
        ok = bool(np.isfinite(sample).all())
    if not ok:
        raise Lora2GGUFError(f"{f.path}: its base fingerprint metadata ({fingerprint.KEY_STRUCTURE}, "
                             f"{fingerprint.KEY_SAMPLE}) is corrupt; the file is damaged")
    types = f.get(fingerprint.KEY_TYPES)  # absent before the noise-aware comparison: correlation then
    if types is not None:
        types = tuple(int(t) for t in np.asarray(types).reshape(-1))
        if len(types) * fingerprint.PER_TENSOR != len(sample):
            raise Lora2GGUFError(f"{f.path}: its base fingerprint metadata ({fingerprint.KEY_TYPES}) is corrupt; "
                                 "the file is damaged")
    return fingerprint.Fingerprint(str(s.value), sample, types)


def provenance(f: GGUFFile) -> dict:
    """Our lora2gguf.* metadata (except the fingerprint sample), decoded."""
    out = {}
    for key, field in f.fields.items():
        if not key.startswith("lora2gguf.") or key == "lora2gguf.base.sample":
            continue
        v = field.value
        if isinstance(v, np.ndarray):
            v = v.tolist()
        elif not isinstance(v, (str, int, float, bool)):
            v = list(v)
        if key == "lora2gguf.peft_config":
            try:
                v = json.loads(v)
            except (TypeError, json.JSONDecodeError):
                pass
        out[key[len("lora2gguf."):]] = v
    return out


def describe_gguf_adapter(f: GGUFFile, base: str | os.PathLike | None = None) -> dict:
    """For `lora2gguf inspect`: alpha, ranks, targets, tensor dtypes, our provenance; with base=…, whether
    the base's fingerprint matches the one recorded at conversion."""
    arch = _check_header(f)
    pairs = _pairs(f)
    alpha = _alpha(f)
    ranks = {}
    for gname, (ka, kb) in pairs.items():
        b = f.tensors[kb]
        ranks[gname] = int(b.shape[-1])  # ggml ne[0] of lora_b: the rank llama.cpp divides by
        for k in (ka, kb):  # adapters are small: a broken one is worth saying so when inspected
            _finite(f, k, f.tensor(k))
    targets = sorted({re.sub(r"^blk\.\d+\.", "", g).removesuffix(".weight") for g in pairs})
    info = {
        "lora_alpha": alpha, "ranks": sorted(set(ranks.values())), "targets": targets, "lora_tensors": len(pairs),
        "layers": sorted({int(m.group(1)) for g in pairs if (m := re.match(r"blk\.(\d+)\.", g))}),
        "dtypes": dict(Counter(f.tensors[k].type.name for ab in pairs.values() for k in ab)),
        "llama_cpp_scales": sorted({llama_scale(alpha, r) for r in ranks.values()}),
        "provenance": provenance(f) or None,
    }
    if (toks := f.get("adapter.alora.invocation_tokens")) is not None:  # llama-server activates it after these
        info["alora_invocation_tokens"] = [int(t) for t in toks]
    if base is not None:
        with open_base(base) as b:
            if b.spec.arch != arch:
                info["base_check"] = {"match": False, "verdict": f"arch mismatch: adapter {arch}, base {b.spec.arch}"}
                return info
            recorded = recorded_fingerprint(f)
            if recorded is None:
                info["base_check"] = {"match": None, "verdict": "no fingerprint recorded (not written by lora2gguf)"}
            else:
                with np.errstate(all="ignore"):  # digest() rounds to float16: large values overflow, harmlessly
                    info["base_check"] = fingerprint.compare(recorded, fingerprint.fingerprint(b))
            try:
                load_gguf_lora(f.path, b.spec)
            except Lora2GGUFError as e:
                info["base_check"] = {"match": False, "verdict": f"does not fit the base: {e}"}
    return info


def base_match(path: str | os.PathLike, base) -> tuple[bool | None, str]:
    """Was the GGUF LoRA at `path` converted for `base` (an open GGUFBase/HFBase)? (match, verdict) from
    the fingerprint convert recorded; (None, why) when there is none (not written by lora2gguf)."""
    with GGUFFile(path) as f:
        recorded = recorded_fingerprint(f)
    if recorded is None:
        return None, "no fingerprint recorded (not written by lora2gguf)"
    with np.errstate(all="ignore"):  # digest() rounds to float16: large values overflow, harmlessly
        c = fingerprint.compare(recorded, fingerprint.fingerprint(base))
    return c["match"], c["verdict"]
