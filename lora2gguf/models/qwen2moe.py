"""qwen2moe (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): the qwen2 layer (q/k/v biases, NEOX rope, no row permutation)
with every MLP a mixture of experts (models/moe.py) plus a shared expert that every token goes through,
scaled per token by sigmoid(shared_expert_gate(x)) (models/layers.py: SharedExpertMoE). The shared expert
(mlp.shared_expert.{gate,up,down}_proj → ffn_{gate,up,down}_shexp) and its gate (mlp.shared_expert_gate, a
(1, n_embd) linear → ffn_gate_inp_shexp) are ordinary linears: they take 2-D LoRA.

Hyperparameters (src/models/qwen2moe.cpp). llama.cpp reads expert_count, expert_used_count,
expert_feed_forward_length (n_ff / n_expert_used when absent) and expert_shared_feed_forward_length (n_ff when
absent), and never renormalises the top-k routing weights (norm_w = false): a config.json with norm_topk_prob
true, dense layers (mlp_only_layers, decoder_sparse_step > 1) or a sliding window (use_sliding_window),
describes a model llama.cpp would compute differently: refused by name. transformers names the attention bias qkv_bias (default true).
"""

from __future__ import annotations

from gguf import MODEL_ARCH

from lora2gguf.errors import Lora2GGUFError
from lora2gguf.models.moe import MoEArch
from lora2gguf.models.qwen3moe import refuse_dense_layers
from lora2gguf.models.spec import MoESpec, check_dims

SHARED = ("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj", "mlp.shared_expert.down_proj",
          "mlp.shared_expert_gate")


class Qwen2Moe(MoEArch):
    name = "qwen2moe"
    model_arch = MODEL_ARCH.QWEN2MOE
    hf_architectures = ("Qwen2MoeForCausalLM",)
    hf_model_types = ("qwen2_moe",)
    qkv_bias = True
    mlp_proj = MoEArch.mlp_proj + SHARED
    bias_slots = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")  # llama.cpp adds bq/bk/bv only

    # -- hyperparameters ---------------------------------------------------------------------------------
    def gguf_extra(self, f, common: dict, where) -> dict:
        a = self.gguf_arch
        n_expert, n_used = self.gguf_int(f, "expert_count", where), self.gguf_int(f, "expert_used_count", where)
        n_ff_exp = self.gguf_int(f, "expert_feed_forward_length", where, False) or common["n_ff"] // max(n_used, 1)
        n_ff_shexp = self.gguf_int(f, "expert_shared_feed_forward_length", where, False) or common["n_ff"]
        check_dims({f"{a}.expert_shared_feed_forward_length": n_ff_shexp}, where)
        return self.moe_fields(n_expert, n_used, n_ff_exp, (f"{a}.expert_count", f"{a}.expert_used_count",
                                                            f"{a}.expert_feed_forward_length"), where,
                               norm_topk_prob=False, n_ff_shexp=n_ff_shexp)

    def spec_from_hf(self, c: dict, where) -> MoESpec:
        return super().spec_from_hf(c | {"attention_bias": bool(c.get("qkv_bias", True))}, where)

    def hf_extra(self, c: dict, common: dict, where) -> dict:
        n_ff_shexp = int(c.get("shared_expert_intermediate_size") or 0)
        check_dims({"shared_expert_intermediate_size": n_ff_shexp}, where)
        fields = self.moe_fields(int(c.get("num_experts") or 0), int(c.get("num_experts_per_tok") or 0),
                                 int(c.get("moe_intermediate_size") or 0),
                                 ("num_experts", "num_experts_per_tok", "moe_intermediate_size"), where,
                                 norm_topk_prob=False, n_ff_shexp=n_ff_shexp)
        if c.get("norm_topk_prob", False):
            raise Lora2GGUFError(f"{where}: norm_topk_prob is true, but llama.cpp's qwen2moe never renormalises the "
                                 "top-k routing weights (Qwen1.5-MoE and Qwen2-MoE set it false); such a model is not "
                                 "supported")
        refuse_dense_layers(c, where, self.name)
        if c.get("use_sliding_window"):
            raise Lora2GGUFError(f"{where}: use_sliding_window is true, but llama.cpp's qwen2moe attends to the whole "
                                 "context; such a model is not supported")
        return fields

    def hf_config(self, spec: MoESpec) -> dict:
        return super().hf_config(spec) | {
            "num_experts": spec.n_expert, "num_experts_per_tok": spec.n_expert_used,
            "moe_intermediate_size": spec.n_ff_exp, "shared_expert_intermediate_size": spec.n_ff_shexp,
            "norm_topk_prob": spec.norm_topk_prob, "qkv_bias": spec.attn_bias, "decoder_sparse_step": 1,
            "mlp_only_layers": [], "use_sliding_window": False}

    # -- tensors -----------------------------------------------------------------------------------------
    def linear_shapes(self, spec: MoESpec) -> dict[str, tuple[int, int]]:
        D, S = spec.n_embd, spec.n_ff_shexp
        return super().linear_shapes(spec) | {
            "mlp.shared_expert.gate_proj.weight": (S, D), "mlp.shared_expert.up_proj.weight": (S, D),
            "mlp.shared_expert.down_proj.weight": (D, S), "mlp.shared_expert_gate.weight": (1, D)}

    # -- PyTorch forward ---------------------------------------------------------------------------------
    def moe_block(self, spec: MoESpec):
        from lora2gguf.models.layers import SharedExpertMoE

        return SharedExpertMoE(spec.n_embd, spec.n_ff_exp, spec.n_expert, spec.n_expert_used, spec.norm_topk_prob,
                               "silu", spec.n_ff_shexp)


ARCH = Qwen2Moe()
