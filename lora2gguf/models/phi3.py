"""phi3 (Phi-3-mini, Phi-3.5-mini, Phi-4-mini): the llama layer with q/k/v as one projection (qkv_proj; GGUF
`attn_qkv`, q then k then v rows) and gate/up as one (gate_up_proj; GGUF `ffn_up`, gate rows first), so a
LoRA targets the fused weights as PEFT does. NEOX rope (no row permutation), optionally on the first
`rope.dimension_count` dimensions of each head only (Phi-4-mini: 0.75 of them).

llama.cpp turns Phi-3's sliding window off ("Phi SWA is currently disabled"), so the reference attends over
the whole context as llama.cpp does. The 128k variants' longrope factor tensors (rope_factors_long/short)
are not implemented: such a base is refused by name.
"""

from __future__ import annotations

from gguf import MODEL_ARCH

from lora2gguf.errors import Lora2GGUFError
from lora2gguf.models.arch import Arch


class Phi3(Arch):
    name = "phi3"
    model_arch = MODEL_ARCH.PHI3
    hf_architectures = ("Phi3ForCausalLM",)
    hf_model_types = ("phi3",)
    attn_proj = ("self_attn.qkv_proj", "self_attn.o_proj")
    mlp_proj = ("mlp.gate_up_proj", "mlp.down_proj")
    fused_training = True  # the fused training layer's q/k/v and gate/up blocks are these projections
    bias_slots = ("self_attn.qkv_proj",)  # llama.cpp's phi3 loads attn_qkv.bias, no other projection bias

    def gguf_extra(self, f, common: dict, where) -> dict:
        longrope = [n for n in ("rope_factors_long.weight", "rope_factors_short.weight") if n in f.tensors]
        if longrope:
            raise Lora2GGUFError(f"{where}: the model carries longrope factor tensors ({', '.join(longrope)}, a "
                                 "128k-context Phi-3); lora2gguf does not implement longrope: use the 4k variant")
        return {}

    def spec_from_hf(self, c: dict, where):
        rs = c.get("rope_scaling") or c.get("rope_parameters") or {}
        kind = rs.get("type", rs.get("rope_type"))
        if kind in ("longrope", "su"):  # before the generic reader's "not supported (none, linear)"
            raise Lora2GGUFError(f"{where}: rope scaling {kind!r} (longrope factors, a 128k-context Phi-3) is not "
                                 "implemented; use the 4k variant")
        factor = c.get("partial_rotary_factor") or (c.get("rope_parameters") or {}).get("partial_rotary_factor")
        return super().spec_from_hf(dict(c, partial_rotary_factor=factor or 1.0), where)

    def hf_config(self, spec) -> dict:
        return super().hf_config(spec) | {"partial_rotary_factor": spec.n_rot / spec.head_dim, "sliding_window": None,
                                          "pad_token_id": None}

    def linear_shapes(self, spec) -> dict[str, tuple[int, int]]:
        n_q, n_kv, e, f = spec.n_head * spec.head_dim, spec.n_head_kv * spec.head_dim, spec.n_embd, spec.n_ff
        return {"self_attn.qkv_proj.weight": (n_q + 2 * n_kv, e), "self_attn.o_proj.weight": (e, n_q),
                "mlp.gate_up_proj.weight": (2 * f, e), "mlp.down_proj.weight": (e, f)}

    def build_layer(self, spec, i: int):
        from lora2gguf.models.layers import MLP, Attention, DecoderLayer, RMSNorm

        return DecoderLayer(
            norms={"input_layernorm": RMSNorm(spec.n_embd, spec.norm_eps),
                   "post_attention_layernorm": RMSNorm(spec.n_embd, spec.norm_eps)},
            attn_in="input_layernorm", mlp_in="post_attention_layernorm",
            self_attn=Attention(spec, fused_qkv=True), mlp=MLP(spec.n_embd, spec.n_ff, "silu", fused=True))


ARCH = Phi3()
