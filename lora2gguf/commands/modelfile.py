"""`lora2gguf modelfile`: an Ollama Modelfile that serves a GGUF base with a GGUF LoRA on top."""

from __future__ import annotations

import os
from pathlib import Path


def modelfile(base: str | os.PathLike, lora: str | os.PathLike) -> str:
    """An Ollama Modelfile that serves `base` with the GGUF LoRA `lora` on top."""
    return f"FROM {Path(base).resolve()}\nADAPTER {Path(lora).resolve()}\n"


def check_pair(base, lora) -> None:
    """The Modelfile is only written for a GGUF base and a GGUF LoRA that fits it: Ollama would otherwise
    fail at `ollama create` or at the first request, far from the mistake."""
    from lora2gguf.adapters.gguf_lora import base_match, load_gguf_lora
    from lora2gguf.weights.base_model import GGUFBase
    from lora2gguf.errors import Lora2GGUFError

    for p in (base, lora):
        if not Path(p).is_file():
            raise Lora2GGUFError(f"{p}: no such file")
    with GGUFBase(base) as b:
        adapter = load_gguf_lora(lora, b.spec)  # refuses a file that is not a GGUF LoRA
        adapter.check_base(b.spec, f"base {base}")
        match, verdict = base_match(lora, b)
        if match is False:
            raise Lora2GGUFError(f"{lora}: made for another base than {base} ({verdict}); give the base it "
                                 "was converted for")


def write_modelfile(base, lora, out: str | os.PathLike, force: bool = False) -> Path:
    from lora2gguf.fileio.atomic import atomic_output, check_output

    out = check_output(out, force, [base, lora])
    check_pair(base, lora)
    with atomic_output(out) as tmp:
        tmp.write_text(modelfile(base, lora))
    return out
