"""qwen3moe (Qwen3-30B-A3B, Qwen3-235B-A22B): the qwen3 layer (per-head q/k RMSNorm, NEOX rope, no row
permutation) with every MLP a mixture of experts: a softmax router (`mlp.gate`, GGUF ffn_gate_inp) picks
n_expert_used of n_expert SwiGLU experts per token and mixes them with the top-k probabilities,
renormalised to sum to 1 (models/layers.py: MoE).

Tensors. Inside lora2gguf an expert projection is one stacked tensor (n_expert, out, in) named as
llama.cpp's converter names it before mapping (mlp.experts.gate_proj.weight → ffn_gate_exps, up_proj →
ffn_up_exps, down_proj → ffn_down_exps: gguf-py's table), so that it is one GGUF tensor. A checkpoint on
disk stores each expert apart (mlp.experts.N.gate_proj.weight: what the Hub's files hold and what
transformers 5's save_pretrained writes); `hf_file_parts` names the parts. transformers 5 holds gate and up
fused in memory (mlp.experts.gate_up_proj (E, 2·F, D), gate rows first) and down as mlp.experts.down_proj;
llama.cpp's qwen3moe has no fused ffn_gate_up_exps, so gate and up stay apart here.

Hyperparameters. llama.cpp reads expert_count, expert_used_count and expert_feed_forward_length (n_ff /
n_expert_used when absent) and always renormalises the top-k weights (src/models/qwen3moe.cpp passes
norm_w = true whatever the file says); transformers follows config.json's norm_topk_prob (default false),
so a config with false, or with dense layers (mlp_only_layers, decoder_sparse_step > 1, which llama.cpp's
qwen3moe has no tensors for), describes a model llama.cpp would compute differently: refused by name.
"""

from __future__ import annotations

from gguf import MODEL_ARCH

from lora2gguf.errors import Lora2GGUFError
from lora2gguf.models.arch import ATTN_PROJ, Arch
from lora2gguf.models.spec import MoESpec, check_dims

EXPERTS = ("mlp.experts.gate_proj", "mlp.experts.up_proj", "mlp.experts.down_proj")


class Qwen3Moe(Arch):
    name = "qwen3moe"
    model_arch = MODEL_ARCH.QWEN3MOE
    hf_architectures = ("Qwen3MoeForCausalLM",)
    hf_model_types = ("qwen3_moe",)
    spec_class = MoESpec
    qk_norm = True
    attn_proj = ATTN_PROJ
    mlp_proj = ("mlp.gate",)  # the router: an ordinary (n_expert, n_embd) linear
    expert_proj = EXPERTS
    expert_params = {"mlp.experts.gate_up_proj": ("mlp.experts.gate_proj", "mlp.experts.up_proj"),
                     "mlp.experts.down_proj": ("mlp.experts.down_proj",)}  # Qwen3MoeExperts (transformers 5)
    bias_slots = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")  # llama.cpp adds bq/bk/bv only
    verbs = ("convert", "inspect", "merge", "verify", "analyze")  # the verbs that handle mixture-of-experts so far

    # -- hyperparameters ---------------------------------------------------------------------------------
    def gguf_extra(self, f, common: dict, where) -> dict:
        a = self.name

        def need(key):
            v = f.get(f"{a}.{key}")
            if v is not None and not isinstance(v, (int, float)):  # llama.cpp also takes one value per layer
                vals = {int(x) for x in v}
                if len(vals) != 1:
                    raise Lora2GGUFError(f"{where}: metadata {a}.{key} differs between layers ({sorted(vals)}); "
                                         "lora2gguf supports one value for every layer")
                v = vals.pop()
            if v is None:
                raise Lora2GGUFError(f"{where}: metadata {a}.{key} is missing; a qwen3moe model needs it")
            return int(v)

        n_expert, n_used = need("expert_count"), need("expert_used_count")
        n_ff_exp = f.number(f"{a}.expert_feed_forward_length", 0, int) or common["n_ff"] // max(n_used, 1)
        check_dims({f"{a}.expert_count": n_expert, f"{a}.expert_used_count": n_used,
                    f"{a}.expert_feed_forward_length": n_ff_exp}, where)
        if n_used > n_expert:
            raise Lora2GGUFError(f"{where}: metadata {a}.expert_used_count {n_used} exceeds expert_count {n_expert}; "
                                 "the file is corrupt")
        return dict(n_expert=n_expert, n_expert_used=n_used, n_ff_exp=n_ff_exp, norm_topk_prob=True)

    def hf_extra(self, c: dict, common: dict, where) -> dict:
        n_expert = int(c.get("num_experts") or c.get("num_local_experts") or 0)
        n_used, n_ff_exp = int(c.get("num_experts_per_tok") or 0), int(c.get("moe_intermediate_size") or 0)
        check_dims({"num_experts": n_expert, "num_experts_per_tok": n_used, "moe_intermediate_size": n_ff_exp}, where)
        if n_used > n_expert:
            raise Lora2GGUFError(f"{where}: num_experts_per_tok {n_used} exceeds num_experts {n_expert}")
        if not c.get("norm_topk_prob", False):
            raise Lora2GGUFError(f"{where}: norm_topk_prob is false, but llama.cpp's qwen3moe always renormalises the "
                                 "top-k routing weights (as Qwen3-30B-A3B sets it); such a model is not supported")
        if c.get("mlp_only_layers") or int(c.get("decoder_sparse_step", 1)) != 1:
            raise Lora2GGUFError(f"{where}: dense layers (mlp_only_layers / decoder_sparse_step) are not supported: "
                                 "llama.cpp's qwen3moe makes every layer a mixture of experts")
        return dict(n_expert=n_expert, n_expert_used=n_used, n_ff_exp=n_ff_exp, norm_topk_prob=True)

    def hf_config(self, spec: MoESpec) -> dict:
        return super().hf_config(spec) | {
            "num_experts": spec.n_expert, "num_experts_per_tok": spec.n_expert_used,
            "moe_intermediate_size": spec.n_ff_exp, "norm_topk_prob": spec.norm_topk_prob,
            "decoder_sparse_step": 1, "mlp_only_layers": [], "use_sliding_window": False}

    # -- tensors -----------------------------------------------------------------------------------------
    def linear_shapes(self, spec: MoESpec) -> dict[str, tuple[int, int]]:
        shapes = {k: v for k, v in super().linear_shapes(spec).items() if k.startswith("self_attn.")}
        return shapes | {"mlp.gate.weight": (spec.n_expert, spec.n_embd)}

    def expert_shapes(self, spec: MoESpec) -> dict[str, tuple[int, int, int]]:
        E, D, F = spec.n_expert, spec.n_embd, spec.n_ff_exp
        return {"mlp.experts.gate_proj.weight": (E, F, D), "mlp.experts.up_proj.weight": (E, F, D),
                "mlp.experts.down_proj.weight": (E, D, F)}

    def hf_file_parts(self, spec: MoESpec, hf_name: str) -> list[str] | None:
        head, sep, proj = hf_name.partition(".mlp.experts.")
        if not sep or proj.count(".") != 1:  # model.layers.N.mlp.experts.gate_proj.weight
            return None
        return [f"{head}.mlp.experts.{e}.{proj}" for e in range(spec.n_expert)]

    # -- PyTorch forward ---------------------------------------------------------------------------------
    def build_layer(self, spec: MoESpec, i: int):
        from lora2gguf.models.layers import Attention, DecoderLayer, MoE, RMSNorm

        return DecoderLayer(
            norms={"input_layernorm": RMSNorm(spec.n_embd, spec.norm_eps),
                   "post_attention_layernorm": RMSNorm(spec.n_embd, spec.norm_eps)},
            attn_in="input_layernorm", mlp_in="post_attention_layernorm", self_attn=Attention(spec),
            mlp=MoE(spec.n_embd, spec.n_ff_exp, spec.n_expert, spec.n_expert_used, spec.norm_topk_prob, "silu"))


ARCH = Qwen3Moe()
