"""gemma2 (Gemma 2): Gemma 3's conventions (1 + w norms, sqrt(n_embd) embedding scale, pre and post norms,
GELU-tanh MLP, tied head) with Gemma 2's choices:
- attention scores and final logits are tanh soft-capped (llama.cpp's defaults 50 and 30 when the file
  does not say);
- sliding-window attention (4096 unless the file says) on alternating layers, from layer 0, with the global
  rope on every layer;
- no per-head q/k norm;
- llama.cpp always multiplies the output by token_embd (no output.weight tensor), so no untied head.
"""

from __future__ import annotations

from gguf import MODEL_ARCH

from lora2gguf.models.gemma3 import Gemma3


class Gemma2(Gemma3):
    name = "gemma2"
    model_arch = MODEL_ARCH.GEMMA2
    hf_architectures = ("Gemma2ForCausalLM",)
    hf_model_types = ("gemma2",)
    qk_norm = False
    swa_pattern = 2
    window_default = 4096
    attn_softcap_default, final_softcap_default = 50.0, 30.0
    local_rope_scaled = True
    can_untie = False

    def local_rope(self, common: dict) -> float:
        return common["rope_theta"]  # rope_freq_base_train_swa = rope_freq_base_train

    def hf_config(self, spec) -> dict:
        cfg = super().hf_config(spec)
        cfg["rope_parameters"] = cfg["rope_parameters"]["full_attention"]  # one rope for both layer types
        cfg["rope_theta"] = spec.rope_theta
        return cfg


ARCH = Gemma2()
