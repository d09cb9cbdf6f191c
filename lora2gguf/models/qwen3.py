"""qwen3: the llama layer with a per-head RMSNorm on q and k before rope; NEOX rope in llama.cpp, so no
row permutation between HF and GGUF."""

from __future__ import annotations

from gguf import MODEL_ARCH

from lora2gguf.models.arch import Arch


class Qwen3(Arch):
    name = "qwen3"
    model_arch = MODEL_ARCH.QWEN3
    hf_architectures = ("Qwen3ForCausalLM",)
    hf_model_types = ("qwen3",)
    qk_norm = True
    fused_training = True
    bias_slots = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")  # llama.cpp adds bq/bk/bv only


ARCH = Qwen3()
