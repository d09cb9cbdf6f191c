"""qwen2 (Qwen2, Qwen2.5): the llama layer with q/k/v biases; NEOX rope in llama.cpp, so no row
permutation between HF and GGUF."""

from __future__ import annotations

from gguf import MODEL_ARCH

from lora2gguf.models.arch import Arch


class Qwen2(Arch):
    name = "qwen2"
    model_arch = MODEL_ARCH.QWEN2
    hf_architectures = ("Qwen2ForCausalLM",)
    hf_model_types = ("qwen2",)
    qkv_bias = True
    fused_training = True

    bias_slots = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")  # llama.cpp adds bq/bk/bv only

    def hf_config(self, spec) -> dict:
        return super().hf_config(spec) | {"use_sliding_window": False}


ARCH = Qwen2()
