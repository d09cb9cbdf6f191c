"""qwen3moe (Qwen3-30B-A3B, Qwen3-235B-A22B): the qwen3 layer (per-head q/k RMSNorm, NEOX rope, no row
permutation) with every MLP a mixture of experts (models/moe.py): a softmax router picks n_expert_used of
n_expert SwiGLU experts per token and mixes them with the top-k probabilities, renormalised to sum to 1.

A checkpoint on disk stores each expert apart (mlp.experts.N.gate_proj.weight: what the Hub's files hold and
what transformers 5's save_pretrained writes); llama.cpp's qwen3moe has no fused ffn_gate_up_exps, so gate
and up stay apart here.

Hyperparameters. llama.cpp reads expert_count, expert_used_count and expert_feed_forward_length (n_ff /
n_expert_used when absent) and always renormalises the top-k weights (src/models/qwen3moe.cpp passes
norm_w = true whatever the file says); transformers follows config.json's norm_topk_prob (default false),
so a config with false, or with dense layers (mlp_only_layers, decoder_sparse_step > 1, which llama.cpp's
qwen3moe has no tensors for), describes a model llama.cpp would compute differently: refused by name.
"""

from __future__ import annotations

from gguf import MODEL_ARCH

from lora2gguf.errors import Lora2GGUFError
from lora2gguf.models.moe import MoEArch
from lora2gguf.models.spec import MoESpec


def refuse_dense_layers(c: dict, where, arch: str) -> None:
    """Qwen's MoE configs can make some layers dense; llama.cpp's qwen2moe / qwen3moe cannot."""
    if c.get("mlp_only_layers") or int(c.get("decoder_sparse_step", 1)) != 1:
        raise Lora2GGUFError(f"{where}: dense layers (mlp_only_layers / decoder_sparse_step) are not supported: "
                             f"llama.cpp's {arch} makes every layer a mixture of experts")


class Qwen3Moe(MoEArch):
    name = "qwen3moe"
    model_arch = MODEL_ARCH.QWEN3MOE
    hf_architectures = ("Qwen3MoeForCausalLM",)
    hf_model_types = ("qwen3_moe",)
    qk_norm = True
    bias_slots = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")  # llama.cpp adds bq/bk/bv only

    # -- hyperparameters ---------------------------------------------------------------------------------
    def gguf_extra(self, f, common: dict, where) -> dict:
        a = self.gguf_arch
        n_expert, n_used = self.gguf_int(f, "expert_count", where), self.gguf_int(f, "expert_used_count", where)
        n_ff_exp = self.gguf_int(f, "expert_feed_forward_length", where, False) or common["n_ff"] // max(n_used, 1)
        return self.moe_fields(n_expert, n_used, n_ff_exp, (f"{a}.expert_count", f"{a}.expert_used_count",
                                                            f"{a}.expert_feed_forward_length"), where,
                               norm_topk_prob=True)

    def hf_extra(self, c: dict, common: dict, where) -> dict:
        n_expert = int(c.get("num_experts") or c.get("num_local_experts") or 0)
        n_used, n_ff_exp = int(c.get("num_experts_per_tok") or 0), int(c.get("moe_intermediate_size") or 0)
        fields = self.moe_fields(n_expert, n_used, n_ff_exp,
                                 ("num_experts", "num_experts_per_tok", "moe_intermediate_size"), where,
                                 norm_topk_prob=True)
        if not c.get("norm_topk_prob", False):
            raise Lora2GGUFError(f"{where}: norm_topk_prob is false, but llama.cpp's qwen3moe always renormalises the "
                                 "top-k routing weights (as Qwen3-30B-A3B sets it); such a model is not supported")
        refuse_dense_layers(c, where, self.name)
        return fields

    def hf_config(self, spec: MoESpec) -> dict:
        return super().hf_config(spec) | {
            "num_experts": spec.n_expert, "num_experts_per_tok": spec.n_expert_used,
            "moe_intermediate_size": spec.n_ff_exp, "norm_topk_prob": spec.norm_topk_prob,
            "decoder_sparse_step": 1, "mlp_only_layers": [], "use_sliding_window": False}


ARCH = Qwen3Moe()
