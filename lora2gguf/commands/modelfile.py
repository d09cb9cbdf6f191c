"""`lora2gguf modelfile`: an Ollama Modelfile that serves a GGUF base with a GGUF LoRA on top."""

from __future__ import annotations

import os
from pathlib import Path

from lora2gguf.adapters.load import load_for_base
from lora2gguf.errors import Lora2GGUFError
from lora2gguf.fileio.atomic import atomic_output, check_output
from lora2gguf.weights.base_model import GGUFBase


def modelfile(base: str | os.PathLike, lora: str | os.PathLike) -> str:
    """An Ollama Modelfile that serves `base` with the GGUF LoRA `lora` on top."""
    return f"FROM {Path(base).resolve()}\nADAPTER {Path(lora).resolve()}\n"


def check_pair(base, lora) -> None:
    """The Modelfile is only written for a GGUF base and a GGUF LoRA that fits it: Ollama would otherwise
    fail at `ollama create` or at the first request, far from the mistake."""
    for p in (base, lora):
        if not Path(p).is_file():
            raise Lora2GGUFError(f"{p}: no such file")
    with GGUFBase(base) as b:
        b.spec.arch_module.require("modelfile", b.path)
        load_for_base(lora, b)  # a file: a GGUF LoRA (anything else is refused) that fits this base


def write_modelfile(base, lora, out: str | os.PathLike, force: bool = False) -> Path:
    out = check_output(out, force, [base, lora])
    check_pair(base, lora)
    with atomic_output(out) as tmp:
        tmp.write_text(modelfile(base, lora))
    return out
