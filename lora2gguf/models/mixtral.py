"""mixtral (Mixtral 8x7B, 8x22B): the llama layer (llama.cpp's llama graph, q/k rows permuted per head as in
models/llama.py) with every MLP a mixture of experts (models/moe.py): softmax router, top-k, the top-k weights
renormalised to sum to 1 (transformers' MixtralTopKRouter; llama.cpp's llama passes norm_w = true).

GGUF. llama.cpp has no "mixtral" architecture: a Mixtral file is general.architecture "llama" with
llama.expert_count > 0 and ffn_gate_inp / ffn_*_exps tensors (the registry's MOE_FORMS finds this module for
it), and the experts are llama.feed_forward_length wide (config.json's intermediate_size).

Checkpoints. The Hub's files and transformers 5's save_pretrained (which reverts its loading conversion) store
model.layers.N.block_sparse_moe.gate.weight (the router) and block_sparse_moe.experts.E.w1 / w3 / w2 (gate, up,
down); in memory transformers 5 names them mlp.gate and mlp.experts.gate_up_proj / down_proj, which is what
PEFT's adapters name and what lora2gguf uses. A config.json with a sliding window shorter than the context (which
transformers applies and llama.cpp's llama does not) is refused by name.
"""

from __future__ import annotations

from lora2gguf.errors import Lora2GGUFError
from lora2gguf.models.arch import ATTN_PROJ
from lora2gguf.models.llama import Llama
from lora2gguf.models.moe import MoEArch
from lora2gguf.models.spec import MoESpec


class Mixtral(MoEArch, Llama):
    name = "mixtral"
    gguf_arch = "llama"
    hf_architectures = ("MixtralForCausalLM",)
    hf_model_types = ("mixtral",)
    fused_training = False
    bias_slots = ATTN_PROJ  # llama.cpp's llama adds bq/bk/bv/bo when present, no router bias
    expert_modules = {"block_sparse_moe.experts.{E}.w1": "mlp.experts.gate_proj",
                      "block_sparse_moe.experts.{E}.w3": "mlp.experts.up_proj",
                      "block_sparse_moe.experts.{E}.w2": "mlp.experts.down_proj"}
    module_aliases = {"block_sparse_moe.gate": "mlp.gate"}

    # -- hyperparameters ---------------------------------------------------------------------------------
    def gguf_extra(self, f, common: dict, where) -> dict:
        a = self.gguf_arch  # the experts are feed_forward_length wide (llama.cpp's llama has no n_ff_exp)
        return self.moe_fields(self.gguf_int(f, "expert_count", where), self.gguf_int(f, "expert_used_count", where),
                               common["n_ff"], (f"{a}.expert_count", f"{a}.expert_used_count",
                                                f"{a}.feed_forward_length"), where, norm_topk_prob=True)

    def hf_extra(self, c: dict, common: dict, where) -> dict:
        window = c.get("sliding_window")
        if window and int(window) < common["n_ctx_train"]:
            raise Lora2GGUFError(f"{where}: sliding_window is {window}, but llama.cpp's llama (which runs Mixtral) "
                                 "attends to the whole context; such a model is not supported")
        return self.moe_fields(int(c.get("num_local_experts") or 0), int(c.get("num_experts_per_tok") or 0),
                               common["n_ff"], ("num_local_experts", "num_experts_per_tok", "intermediate_size"),
                               where, norm_topk_prob=True)

    def hf_config(self, spec: MoESpec) -> dict:
        return super().hf_config(spec) | {
            "num_local_experts": spec.n_expert, "num_experts_per_tok": spec.n_expert_used,
            "router_jitter_noise": 0.0, "sliding_window": None}


ARCH = Mixtral()
