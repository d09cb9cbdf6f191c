"""Adapters in and out for the verbs that reshape them (export, resize, combine, extract): reading one
against an optional base, and writing a PEFT directory or a GGUF LoRA, chosen by the output path.

PEFT out: adapter_config.json with the most common rank as r and rank_pattern / alpha_pattern for the
modules that differ, so that PEFT's scale alpha_m / r_m is each module's; written atomically (a temp
directory renamed into place). GGUF out: adapter_gguf_write, which folds each module's scale into
lora_b where llama.cpp's single alpha / r_m differs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

from .adapter import PREFIX, PeftAdapter
from .errors import Lora2GGUFError


def peft_config(adapter: PeftAdapter, base_model: str) -> dict:
    """adapter_config.json for these modules: exact module paths as targets (so PEFT adapts nothing
    else), the common rank as r and a rank_pattern entry for each other rank; lora_alpha and alpha_pattern
    such that every module's alpha_m / r_m is the scale its source applies (llama.cpp: alpha / r, or 1
    when the file's alpha is 0; mlx-lm: its scale)."""
    ranks = Counter(m.r for m in adapter.modules.values())
    r = ranks.most_common(1)[0][0]
    alphas = {n: m.scale * m.r for n, m in adapter.modules.items()}
    lora_alpha = float(Counter(a for n, a in alphas.items() if adapter.modules[n].r == r).most_common(1)[0][0])
    rank_pattern = {re.escape(n): m.r for n, m in adapter.modules.items() if m.r != r}
    alpha_pattern = {re.escape(n): float(a) for n, a in alphas.items() if not math.isclose(a, lora_alpha, rel_tol=1e-9)}
    cfg = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": r, "lora_alpha": lora_alpha, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
        "target_modules": sorted(adapter.modules), "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "modules_to_save": None, "init_lora_weights": True,
        "inference_mode": True,
    }
    if adapter.config.get("alora_invocation_tokens"):
        cfg["alora_invocation_tokens"] = list(adapter.config["alora_invocation_tokens"])
    return cfg


def peft_tensors(adapter: PeftAdapter) -> dict[str, np.ndarray]:
    out = {}
    for name, m in adapter.modules.items():
        if m.embedding:
            out[f"{PREFIX}{name}.lora_embedding_A"], out[f"{PREFIX}{name}.lora_embedding_B"] = m.A, m.B
        else:
            out[f"{PREFIX}{name}.lora_A.weight"], out[f"{PREFIX}{name}.lora_B.weight"] = m.A, m.B
    return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}


def check_output_dir(out: Path, force: bool, inputs: list[Path]) -> None:
    if not out.parent.is_dir():
        raise Lora2GGUFError(f"{out}: directory {out.parent} does not exist; create it first")
    for i in inputs:
        if i.exists() and (i.resolve() == out.resolve() or out.resolve() in i.resolve().parents):
            raise Lora2GGUFError(f"{out}: the output directory holds an input ({i}); choose another output path")
    if out.exists():
        if not force:
            raise Lora2GGUFError(f"{out}: already exists; pass --force to replace it")
        if not out.is_dir() or (any(out.iterdir()) and not (out / "adapter_config.json").is_file()):
            raise Lora2GGUFError(f"{out}: exists and is not an adapter directory; refusing to replace it")


def write_peft_dir(out: Path, adapter: PeftAdapter, base_model: str) -> Path:
    """Write the adapter as a PEFT directory at `out` (checked by check_output_dir): built in a temp
    directory beside it and renamed into place, an old one (--force) moved aside first."""
    from safetensors.numpy import save_file

    from .gguf_write import fsync_path, part_prefix, remove_stale_parts, umask_mode

    remove_stale_parts(out)
    tmp = Path(tempfile.mkdtemp(prefix=part_prefix(out), suffix=".part", dir=out.parent))
    try:
        (tmp / "adapter_config.json").write_text(json.dumps(peft_config(adapter, base_model), indent=2) + "\n")
        save_file(peft_tensors(adapter), str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        for f in tmp.iterdir():
            os.chmod(f, umask_mode())
            fsync_path(f)
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


def is_gguf_out(out: str | os.PathLike) -> bool:
    """A .gguf output path means a GGUF LoRA, anything else a PEFT directory."""
    return str(out).lower().endswith(".gguf")


def check_out(out: str | os.PathLike, force: bool, inputs: list, base) -> Path:
    """Validate the output path before any work; a GGUF LoRA is written for a base, so it needs one."""
    from .gguf_write import check_output

    if is_gguf_out(out):
        if base is None:
            raise Lora2GGUFError(f"{out}: writing a GGUF LoRA needs --base (the model it is for: its tensor names "
                                 "and q/k layout); or give a directory to write a PEFT adapter")
        return check_output(out, force, inputs=[i for i in inputs if i is not None])
    out = Path(out)
    check_output_dir(out, force, [Path(i) for i in inputs if i is not None])
    return out


def save_adapter(out: Path, adapter: PeftAdapter, base, outtype: str = "f32") -> int:
    """Write `adapter` (modules in HF layout with their scales) to `out`, checked by check_out: a GGUF LoRA
    for the open base `base` when out ends in .gguf, else a PEFT directory. Returns the bytes written."""
    if is_gguf_out(out):
        from .adapter_gguf_write import write_gguf_lora
        from .fingerprint import fingerprint
        from .lora_rules import check_tied_embedding

        adapter.check_base(base.spec, f"base {base.path}")
        check_tied_embedding(adapter.modules, base.spec, out, f"base {base.path}")
        alpha = peft_config(adapter, "")["lora_alpha"]  # the common modules then need no fold
        write_gguf_lora(out, adapter, base.spec, alpha, outtype, fingerprint(base))
        return out.stat().st_size
    name = str(adapter.config.get("base_model_name_or_path") or (base.spec.name if base is not None else ""))
    write_peft_dir(out, adapter, name)
    return sum(f.stat().st_size for f in out.iterdir())


def load_for_base(path: str | os.PathLike, base=None, any_qk_order: bool = False) -> PeftAdapter:
    """Any adapter input, checked against the open base when one is given: arch (PEFT's recorded class),
    shapes, tied embeddings, and, for a GGUF LoRA we wrote, the base fingerprint. Without a base, a GGUF
    LoRA of a llama-family arch keeps llama.cpp's q/k row order only when any_qk_order allows it."""
    from .adapter_any import load_adapter
    from .lora_rules import check_arch

    p = Path(path)
    if base is None:
        if any_qk_order and p.is_file() and _magic(p) == b"GGUF":
            from .adapter_gguf import load_gguf_lora

            return load_gguf_lora(p, None, any_qk_order=True)
        return load_adapter(p, None)
    a = load_adapter(p, base.spec)
    if p.is_dir():
        check_arch(a, base.spec, base.path)
    else:
        from .adapter_gguf import base_match

        match, verdict = base_match(p, base)
        if match is False:
            raise Lora2GGUFError(f"{p}: was made for another base than {base.path} ({verdict}); pass the base it "
                                 "was made for")
    # shapes only: whether a tied base can take an lm_head / embedding LoRA is the GGUF writer's question
    a.check_base(dataclasses.replace(base.spec, tied_embeddings=False), f"base {base.path}")
    return a


def _magic(p: Path) -> bytes:
    with open(p, "rb") as fh:
        return fh.read(4)
