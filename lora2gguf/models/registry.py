"""The registry of architectures: one module per architecture (models/<arch>.py, each exporting ARCH, an
arch.Arch), found from a GGUF `general.architecture` or a transformers `architectures` / `model_type` entry.
The modules are imported by name when first asked for, so that this registry imports none of them (they
import the spec, which asks the registry for its architecture).

Adding an architecture: write models/<name>.py and add its name to NAMES. A module is named after its GGUF
`general.architecture` except where llama.cpp uses one GGUF architecture for a dense model and a mixture of
experts (MOE_FORMS: a "llama" file with experts is Mixtral)."""

from __future__ import annotations

import importlib
from functools import cache
from typing import TYPE_CHECKING

from lora2gguf.errors import Lora2GGUFError

if TYPE_CHECKING:  # for the annotations only: each arch module imports the spec, which imports this registry
    from lora2gguf.models.arch import Arch

# GGUF general.architecture, one module each
NAMES = ("llama", "qwen2", "qwen3", "gemma3", "gemma2", "phi3", "qwen3moe", "mixtral", "qwen2moe")
# a GGUF architecture whose graph builds routed experts when the file has them (llama.cpp's llama: n_expert > 0)
# → the module of that mixture-of-experts form; its files keep the dense architecture's name and keys
MOE_FORMS = {"llama": "mixtral"}
# architectures refused by name (GGUF name, HF class, HF model_type) → what lora2gguf lacks for them
REFUSED = {("gpt-oss", "GptOssForCausalLM", "gpt_oss"):
           "gpt-oss is not supported: lora2gguf has no MXFP4 expert weights, expert biases, HF's interleaved gate/up "
           "(gate_up_proj[..., ::2] / [..., 1::2]), the clamped SwiGLU, attention sinks or the alternating sliding "
           "window that it needs"}


@cache
def get(name: str) -> Arch:
    """The architecture whose GGUF name is `name`."""
    return importlib.import_module(f"lora2gguf.models.{name}").ARCH


def module_for(gguf_arch: str, experts: bool) -> Arch:
    """The module for a GGUF architecture name, in its mixture-of-experts form when the model has experts."""
    return get(MOE_FORMS.get(gguf_arch, gguf_arch) if experts else gguf_arch)


def for_gguf(f, where: str = "") -> Arch:
    """The architecture of a GGUF file (a model or a LoRA adapter; f: fileio.gguf_read.GGUFFile): its
    general.architecture, in its mixture-of-experts form when the file declares experts (<arch>.expert_count)
    or holds expert tensors (ffn_gate_inp, *_exps: an adapter has no expert_count)."""
    name = f.string("general.architecture")
    arch = find(name, where)
    if name in MOE_FORMS and (f.number(f"{name}.expert_count", 0, int) > 0
                              or any(".ffn_gate_inp." in t or "_exps." in t for t in f.tensors)):
        return get(MOE_FORMS[name])
    return arch


def all_archs() -> list[Arch]:
    return [get(n) for n in NAMES]


def find(name: str, where: str = "") -> Arch:
    """The architecture for a GGUF arch name, an HF class name or an HF model_type; a one-line error
    naming the supported ones otherwise."""
    if name in NAMES:
        return get(name)
    prefix = f"{where}: " if where else ""
    for names, why in REFUSED.items():
        if name in names:
            raise Lora2GGUFError(prefix + why)
    for a in all_archs():
        if name in a.hf_architectures or name in a.hf_model_types:
            return a
    raise Lora2GGUFError(f"{prefix}unsupported architecture {name!r}; supported: {', '.join(NAMES)} "
                         "(llama covers Mistral, SmolLM, TinyLlama)")
