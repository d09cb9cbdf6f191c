"""`lora2gguf modelfile`: an Ollama Modelfile for a merged GGUF (FROM merged.gguf), or, for Ollama before
0.34.1, for a GGUF base with a GGUF LoRA on top (FROM base, ADAPTER lora).

Ollama's server now refuses every create request that carries an adapter ("LoRA adapters are no longer
supported": server/create.go, ollama PR 14969, in 0.34.1 and later), while models created before keep
serving with `--lora`. So the default is a merged file (`lora2gguf merge --quant q4_k_m --imatrix-data`
keeps most of what the adapter bought at 4 bits); the ADAPTER form stays behind --adapter."""

from __future__ import annotations

import os
from pathlib import Path

from lora2gguf.adapters.load import load_for_base
from lora2gguf.errors import Lora2GGUFError
from lora2gguf.fileio.atomic import atomic_output, check_output
from lora2gguf.fileio.gguf_read import GGUFFile
from lora2gguf.weights.base_model import GGUFBase

ADAPTER_NOTE = ("Ollama 0.34.1 and later refuse ADAPTER at `ollama create` (\"LoRA adapters are no longer "
                "supported\"); for them, merge the adapter into the base and write the Modelfile with --merged")


def modelfile(base: str | os.PathLike, lora: str | os.PathLike | None = None) -> str:
    """FROM base (a merged GGUF), or FROM base + ADAPTER lora."""
    text = f"FROM {Path(base).resolve()}\n"
    return text + (f"ADAPTER {Path(lora).resolve()}\n" if lora is not None else "")


def check_pair(base, lora) -> None:
    """The ADAPTER form is only written for a GGUF base and a GGUF LoRA that fits it: Ollama would otherwise
    fail at `ollama create` or at the first request, far from the mistake."""
    for p in (base, lora):
        if not Path(p).is_file():
            raise Lora2GGUFError(f"{p}: no such file")
    with GGUFBase(base) as b:
        b.spec.arch_module.require("modelfile", b.path)
        load_for_base(lora, b)  # a file: a GGUF LoRA (anything else is refused) that fits this base


def check_merged(merged) -> None:
    """A model GGUF with tensors: not a LoRA adapter (Ollama refuses those in FROM too)."""
    if not Path(merged).is_file():
        raise Lora2GGUFError(f"{merged}: no such file")
    with GGUFFile(merged) as f:
        if f.get("general.type") == "adapter":
            raise Lora2GGUFError(f"{merged}: a LoRA adapter, not a model; merge it into its base first "
                                 "(lora2gguf merge) and pass the merged file")
        if not f.tensors:
            raise Lora2GGUFError(f"{merged}: a GGUF without tensors, not a model")


def write_modelfile(out: str | os.PathLike, merged=None, base=None, lora=None, adapter: bool = False,
                    force: bool = False) -> Path:
    """Modelfile OUT: FROM `merged`; or, with adapter=True, FROM `base` + ADAPTER `lora`."""
    if merged is not None and (base is not None or lora is not None or adapter):
        raise Lora2GGUFError("--merged is the whole model: give it alone, or --base and --lora with --adapter")
    if merged is None:
        if base is None or lora is None:
            raise Lora2GGUFError("give --merged MERGED.gguf, or --base and --lora with --adapter")
        if not adapter:
            raise Lora2GGUFError(f"{ADAPTER_NOTE}: `lora2gguf merge --base {base} --lora {lora} --quant q4_k_m "
                                 "--imatrix-data DATA -o merged.gguf`; or pass --adapter for an older Ollama")
    out = check_output(out, force, [p for p in (merged, base, lora) if p is not None])
    if merged is not None:
        check_merged(merged)
    else:
        check_pair(base, lora)
    with atomic_output(out) as tmp:
        tmp.write_text(modelfile(merged, None) if merged is not None else modelfile(base, lora))
    return out
