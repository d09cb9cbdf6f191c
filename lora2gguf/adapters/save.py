"""Adapters out, for the verbs that reshape them (resize, combine, extract): a PEFT directory or a GGUF LoRA,
chosen by the output path (adapters.load reads them in, against an optional base).

PEFT out: adapter_config.json with the most common rank as r and rank_pattern / alpha_pattern for the
modules that differ, so that PEFT's scale alpha_m / r_m is each module's; written atomically (a temp
directory renamed into place). GGUF out: adapters.gguf_lora_write, which folds each module's scale into
lora_b where llama.cpp's single alpha / r_m differs.
"""

from __future__ import annotations

import os
from pathlib import Path

from lora2gguf.adapters.gguf_lora_write import write_gguf_lora
from lora2gguf.adapters.lora import PeftAdapter
from lora2gguf.adapters.peft import config_for, write_peft_dir
from lora2gguf.adapters.rules import check_tied_embedding
from lora2gguf.errors import Lora2GGUFError
from lora2gguf.fileio.atomic import check_output, check_output_dir
from lora2gguf.weights.fingerprint import fingerprint


def is_gguf_out(out: str | os.PathLike) -> bool:
    """A .gguf output path means a GGUF LoRA, anything else a PEFT directory."""
    return str(out).lower().endswith(".gguf")


def check_out(out: str | os.PathLike, force: bool, inputs: list, base) -> Path:
    """Validate the output path before any work; a GGUF LoRA is written for a base, so it needs one."""
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
        adapter.check_base(base.spec, f"base {base.path}")
        check_tied_embedding(adapter.modules, base.spec, out, f"base {base.path}")
        alpha = config_for(adapter, "")["lora_alpha"]  # the common modules then need no fold
        write_gguf_lora(out, adapter, base.spec, alpha, outtype, fingerprint(base))
        return out.stat().st_size
    name = str(adapter.config.get("base_model_name_or_path") or (base.spec.name if base is not None else ""))
    write_peft_dir(out, adapter, config_for(adapter, name))
    return sum(f.stat().st_size for f in out.iterdir())


