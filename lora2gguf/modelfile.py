"""`lora2gguf modelfile`: an Ollama Modelfile that serves a GGUF base with a GGUF LoRA on top."""

from __future__ import annotations

import os
from pathlib import Path


def modelfile(base: str | os.PathLike, lora: str | os.PathLike) -> str:
    """An Ollama Modelfile that serves `base` with the GGUF LoRA `lora` on top."""
    return f"FROM {Path(base).resolve()}\nADAPTER {Path(lora).resolve()}\n"


def write_modelfile(base, lora, out: str | os.PathLike, force: bool = False) -> Path:
    from .errors import Lora2GGUFError
    from .gguf_write import atomic_output, check_output

    out = check_output(out, force, [base, lora])
    for p in (base, lora):
        if not Path(p).is_file():
            raise Lora2GGUFError(f"{p}: no such file")
    with atomic_output(out) as tmp:
        tmp.write_text(modelfile(base, lora))
    return out
