"""`lora2gguf export`: a GGUF LoRA (or a torchtune / mlx-lm adapter) → a PEFT adapter directory (adapter_config.json +
adapter_model.safetensors) that `peft.PeftModel.from_pretrained` loads on the matching transformers model.

The GGUF file's run-time meaning is kept exactly: llama.cpp scales each tensor pair by alpha / r_m
(1 when alpha is 0); PEFT scales by lora_alpha / r_m with rank_pattern for the modules whose rank
differs, so writing the file's alpha as lora_alpha gives every module the same scale. q/k rows are
un-permuted and the token embedding pair is turned back into lora_embedding_A/B (adapters.gguf_lora does both).
"""

from __future__ import annotations

import os
from pathlib import Path

from lora2gguf.adapters.gguf_lora_write import refuse_unsupported
from lora2gguf.adapters.load import adapter_format, load_for_base, say_notes
from lora2gguf.adapters.peft import config_for, write_peft_dir
from lora2gguf.fileio.atomic import check_output_dir
from lora2gguf.weights.base_model import open_base


def export(adapter_in: str | os.PathLike, base: str | os.PathLike, out: str | os.PathLike,
           force: bool = False) -> Path:
    """Write the adapter at `adapter_in` (a GGUF LoRA, or a torchtune / mlx-lm / PEFT directory: adapters.load
    tells), for `base`, as a PEFT adapter directory at `out`."""
    src, out = Path(adapter_in), Path(out)
    check_output_dir(out, force, [src, Path(base)])
    fmt = adapter_format(src)
    with open_base(base) as b:
        b.spec.arch_module.require("export", b.path)
        adapter = load_for_base(src, b)
        if fmt == "gguf":
            name = adapter.config["gguf"].get("peft_base_model") or b.spec.name or str(base)
        else:  # what a GGUF LoRA can hold, PEFT's plain LoRA can: the same refusals
            refuse_unsupported(adapter)
            adapter.check_base(b.spec, f"base {base}")
            name = adapter.config.get("base_model_name_or_path") or b.spec.name or str(base)
    say_notes(adapter)
    return write_peft_dir(out, adapter, config_for(adapter, name))
