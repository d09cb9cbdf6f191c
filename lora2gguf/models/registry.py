"""The registry of architectures: one module per architecture (models/<arch>.py, each exporting ARCH, an
arch.Arch), found from a GGUF `general.architecture` or a transformers `architectures` / `model_type` entry.
The modules are imported by name when first asked for, so that this registry imports none of them (they
import the spec, which asks the registry for its architecture).

Adding an architecture: write models/<name>.py and add its name to NAMES."""

from __future__ import annotations

import importlib
from functools import cache
from typing import TYPE_CHECKING

from lora2gguf.errors import Lora2GGUFError

if TYPE_CHECKING:  # for the annotations only: each arch module imports the spec, which imports this registry
    from lora2gguf.models.arch import Arch

# GGUF general.architecture, one module each
NAMES = ("llama", "qwen2", "qwen3", "gemma3", "gemma2", "phi3", "qwen3moe")


@cache
def get(name: str) -> Arch:
    """The architecture whose GGUF name is `name`."""
    return importlib.import_module(f"lora2gguf.models.{name}").ARCH


def all_archs() -> list[Arch]:
    return [get(n) for n in NAMES]


def find(name: str, where: str = "") -> Arch:
    """The architecture for a GGUF arch name, an HF class name or an HF model_type; a one-line error
    naming the supported ones otherwise."""
    if name in NAMES:
        return get(name)
    for a in all_archs():
        if name in a.hf_architectures or name in a.hf_model_types:
            return a
    prefix = f"{where}: " if where else ""
    raise Lora2GGUFError(f"{prefix}unsupported architecture {name!r}; supported: {', '.join(NAMES)} "
                         "(llama covers Mistral, SmolLM, TinyLlama)")
