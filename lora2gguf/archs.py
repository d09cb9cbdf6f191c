"""Architecture facts in one place: which archs we support, how HF names map to GGUF names, and which
projections llama.cpp stores permuted.

Names come from gguf-py's `TensorNameMap` (the tables llama.cpp's own converter uses); this module
only lists the HF modules each arch has and asks gguf-py for their GGUF names.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from gguf import MODEL_ARCH, MODEL_ARCH_NAMES, get_tensor_name_map

from .errors import Lora2GGUFError


@dataclass(frozen=True)
class ArchFacts:
    name: str  # GGUF general.architecture
    model_arch: MODEL_ARCH
    hf_architectures: tuple[str, ...]  # config.json "architectures" entries
    hf_model_types: tuple[str, ...]  # config.json "model_type"
    # llama.cpp rotates interleaved pairs ("normal" rope) for the llama family, so convert_hf_to_gguf
    # permutes the rows of q/k per head; qwen2/qwen3 use NEOX rope and keep HF's row order.
    permute_qk: bool
    qkv_bias: bool  # q/k/v projections carry a bias
    qk_norm: bool  # per-head RMSNorm on q and k before rope


ARCHS: dict[str, ArchFacts] = {
    "llama": ArchFacts("llama", MODEL_ARCH.LLAMA, ("LlamaForCausalLM", "MistralForCausalLM"),
                       ("llama", "mistral"), permute_qk=True, qkv_bias=False, qk_norm=False),
    "qwen2": ArchFacts("qwen2", MODEL_ARCH.QWEN2, ("Qwen2ForCausalLM",), ("qwen2",),
                       permute_qk=False, qkv_bias=True, qk_norm=False),
    "qwen3": ArchFacts("qwen3", MODEL_ARCH.QWEN3, ("Qwen3ForCausalLM",), ("qwen3",),
                       permute_qk=False, qkv_bias=False, qk_norm=True),
}
assert all(MODEL_ARCH_NAMES[a.model_arch] == a.name for a in ARCHS.values())

# The linear projections inside each decoder layer, by their HF module path; these are what LoRA targets.
ATTN_PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
MLP_PROJ = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
LAYER_LINEARS = ATTN_PROJ + MLP_PROJ


def arch_facts(name: str, where: str = "") -> ArchFacts:
    facts = ARCHS.get(name)
    if facts is None:
        for f in ARCHS.values():  # also accept HF class names and model_type
            if name in f.hf_architectures or name in f.hf_model_types:
                return f
        prefix = f"{where}: " if where else ""
        raise Lora2GGUFError(f"{prefix}unsupported architecture {name!r}; "
                             f"supported: {', '.join(sorted(ARCHS))} (llama covers Mistral, SmolLM, TinyLlama)")
    return facts


def hf_tensor_names(arch: str, n_layer: int, tied: bool) -> list[str]:
    """Every HF tensor name a model of this shape has, in a stable order."""
    facts = ARCHS[arch]
    names = ["model.embed_tokens.weight"]
    for i in range(n_layer):
        p = f"model.layers.{i}."
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
        names += [p + m + ".weight" for m in LAYER_LINEARS]
        if facts.qkv_bias:
            names += [p + m + ".bias" for m in ATTN_PROJ[:3]]
        if facts.qk_norm:
            names += [p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight"]
    names.append("model.norm.weight")
    if not tied:
        names.append("lm_head.weight")
    return names


@lru_cache(maxsize=32)
def _name_map(arch: str, n_layer: int):
    return get_tensor_name_map(ARCHS[arch].model_arch, n_layer)


def gguf_name(arch: str, n_layer: int, hf_name: str) -> str:
    """GGUF tensor name for an HF tensor name (e.g. model.layers.0.self_attn.q_proj.weight → blk.0.attn_q.weight)."""
    name = _name_map(arch, n_layer).get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise Lora2GGUFError(f"tensor {hf_name} has no GGUF name for arch {arch}")
    return name


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF row order → llama.cpp row order for a q or k projection (rows = n_head * head_dim).

    Same as `permute()` in llama.cpp's convert_hf_to_gguf.py: within each head, the rotate-half
    halves become interleaved pairs. Works on any array whose first axis is the output rows
    (a weight, a bias, or LoRA B)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of permute_rows: llama.cpp row order → HF row order."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def qk_heads(hf_name: str, n_head: int, n_head_kv: int) -> int | None:
    """How many heads to permute over for this HF tensor, or None if it is not a q/k projection."""
    if ".self_attn.q_proj." in hf_name:
        return n_head
    if ".self_attn.k_proj." in hf_name:
        return n_head_kv
    return None
