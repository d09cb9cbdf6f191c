"""llama (also Mistral, SmolLM, TinyLlama, Llama 3.x): pre-norm decoder, SwiGLU MLP, GQA, rope.

llama.cpp rotates interleaved pairs ("normal" rope) for this family, so convert_hf_to_gguf permutes the
rows of q and k within each head; the reference (HF layout, rotate-half) un-permutes them on load, and a
LoRA's B rows for q/k are permuted the same way on the way out. The layer is the default Arch layer.
"""

from __future__ import annotations

import numpy as np
from gguf import MODEL_ARCH

from lora2gguf.models.arch import Arch


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF row order → llama.cpp row order for a q or k projection (rows = n_head * head_dim).

    Same as `permute()` in llama.cpp's convert_hf_to_gguf.py: within each head, the rotate-half halves
    become interleaved pairs. Works on any array whose first axis is the output rows (a weight, a bias,
    LoRA B, row indices)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of permute_rows: llama.cpp row order → HF row order."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class Llama(Arch):
    name = "llama"
    model_arch = MODEL_ARCH.LLAMA
    hf_architectures = ("LlamaForCausalLM", "MistralForCausalLM")
    hf_model_types = ("llama", "mistral")
    fused_training = True

    def _heads(self, spec, hf_name: str) -> int | None:
        """How many heads to permute over for this HF tensor, or None if it is not a q/k projection."""
        if ".self_attn.q_proj." in hf_name:
            return spec.n_head
        if ".self_attn.k_proj." in hf_name:
            return spec.n_head_kv
        return None

    def permutes_rows(self, spec, hf_name: str) -> bool:
        return ".self_attn.q_proj." in hf_name or ".self_attn.k_proj." in hf_name

    def rows_to_gguf(self, spec, hf_name: str, x):
        heads = self._heads(spec, hf_name)
        return permute_rows(x, heads) if heads else x

    def rows_from_gguf(self, spec, hf_name: str, x):
        heads = self._heads(spec, hf_name)
        return unpermute_rows(x, heads) if heads else x


ARCH = Llama()
