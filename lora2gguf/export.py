"""`lora2gguf export`: a GGUF LoRA (or a torchtune / mlx-lm adapter) → a PEFT adapter directory (adapter_config.json +
adapter_model.safetensors) that `peft.PeftModel.from_pretrained` loads on the matching transformers model.

The GGUF file's run-time meaning is kept exactly: llama.cpp scales each tensor pair by alpha / r_m
(1 when alpha is 0); PEFT scales by lora_alpha / r_m with rank_pattern for the modules whose rank
differs, so writing the file's alpha as lora_alpha gives every module the same scale. q/k rows are
un-permuted and the token embedding pair is turned back into lora_embedding_A/B (adapter_gguf does both).
"""

from __future__ import annotations

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


def export(adapter_in: str | os.PathLike, base: str | os.PathLike, out: str | os.PathLike,
           force: bool = False) -> Path:
    """Write the adapter at `adapter_in` (a GGUF LoRA, or a torchtune / mlx-lm / PEFT directory: adapter_any
    tells), for `base`, as a PEFT adapter directory at `out`."""
    from safetensors.numpy import save_file

    from .adapter_any import adapter_format, load_adapter, say_notes
    from .adapter_gguf import base_match
    from .adapter_gguf_write import refuse_unsupported
    from .base import open_base
    from .gguf_write import fsync_path, part_prefix, remove_stale_parts, umask_mode

    src, out = Path(adapter_in), Path(out)
    check_output_dir(out, force, [src, Path(base)])
    fmt = adapter_format(src)
    with open_base(base) as b:
        adapter = load_adapter(src, b.spec)
        if fmt == "gguf":
            match, verdict = base_match(src, b)
            if match is False:
                raise Lora2GGUFError(f"{src}: was converted for another base than {base} ({verdict}); "
                                     "pass the base it was made for")
            name = adapter.config["gguf"].get("peft_base_model") or b.spec.name or str(base)
        else:  # what a GGUF LoRA can hold, PEFT's plain LoRA can: the same refusals
            refuse_unsupported(adapter)
            adapter.check_base(b.spec, f"base {base}")
            name = adapter.config.get("base_model_name_or_path") or b.spec.name or str(base)
    say_notes(adapter)
    remove_stale_parts(out)
    tmp = Path(tempfile.mkdtemp(prefix=part_prefix(out), suffix=".part", dir=out.parent))
    try:
        (tmp / "adapter_config.json").write_text(json.dumps(peft_config(adapter, name), indent=2) + "\n")
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
