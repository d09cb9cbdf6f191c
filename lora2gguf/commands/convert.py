"""`lora2gguf convert`: an adapter directory (PEFT, torchtune, mlx-lm) → a GGUF LoRA adapter that llama.cpp
loads with --lora.

The conversion itself (PEFT's per-module scales folded in where llama.cpp's single alpha differs) is
adapters.gguf_lora_write's; this verb checks the output path and calls it.
"""

from __future__ import annotations

import os
from pathlib import Path

from lora2gguf.adapters.gguf_lora_write import check_outtype, gguf_from_peft
from lora2gguf.fileio.atomic import check_output


def convert(adapter_dir: str | os.PathLike, base: str | os.PathLike, out: str | os.PathLike,
            outtype: str = "f32", force: bool = False) -> Path:
    """Convert an adapter directory (PEFT, torchtune or mlx-lm) for `base` (GGUF file, HF directory or
    config.json) into a GGUF LoRA at `out`."""
    check_outtype(outtype)
    out = check_output(out, force, inputs=[adapter_dir, base])
    return gguf_from_peft(adapter_dir, base, out, outtype, print_notes=True)
