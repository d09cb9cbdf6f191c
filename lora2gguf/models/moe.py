"""What the mixture-of-experts architectures (qwen3moe, mixtral, qwen2moe) share: every layer's MLP is a softmax
router (`mlp.gate`, GGUF ffn_gate_inp) over n_expert SwiGLU experts (models/layers.py: MoE).

Tensors. Inside lora2gguf an expert projection is one stacked tensor (n_expert, out, in) named as llama.cpp's
converter names it before mapping (mlp.experts.gate_proj.weight → ffn_gate_exps, up_proj → ffn_up_exps,
down_proj → ffn_down_exps: gguf-py's table), so that it is one GGUF tensor. transformers 5 holds gate and up
fused in memory (mlp.experts.gate_up_proj (E, 2·F, D), gate rows first) and down as mlp.experts.down_proj:
what PEFT's target_parameters names (`expert_params`). A checkpoint on disk stores each expert apart, and so
does a transformers-4-style adapter (one LoRA per expert module): `expert_modules` names those modules, for
the checkpoint reader (hf_file_parts) and the adapter reader (adapters.peft stacks them).

Hyperparameters. `<arch>.expert_count` and `expert_used_count` from GGUF (llama.cpp also takes one value per
layer: refused unless they are all equal); each arch says where its expert width comes from.
"""

from __future__ import annotations

from lora2gguf.errors import Lora2GGUFError
from lora2gguf.models.arch import ATTN_PROJ, Arch
from lora2gguf.models.spec import MoESpec, check_dims

EXPERTS = ("mlp.experts.gate_proj", "mlp.experts.up_proj", "mlp.experts.down_proj")


class MoEArch(Arch):
    spec_class = MoESpec
    attn_proj = ATTN_PROJ
    mlp_proj = ("mlp.gate",)  # the router: an ordinary (n_expert, n_embd) linear
    expert_proj = EXPERTS
    expert_params = {"mlp.experts.gate_up_proj": ("mlp.experts.gate_proj", "mlp.experts.up_proj"),
                     "mlp.experts.down_proj": ("mlp.experts.down_proj",)}  # transformers 5's fused experts
    # one module per expert, as checkpoints on disk and transformers-4-style adapters name them ({E}: the expert)
    # → the expert_proj stack it is a slice of
    expert_modules = {"mlp.experts.{E}.gate_proj": "mlp.experts.gate_proj", "mlp.experts.{E}.up_proj":
                      "mlp.experts.up_proj", "mlp.experts.{E}.down_proj": "mlp.experts.down_proj"}
    verbs = ("convert", "inspect", "merge", "verify", "analyze", "train")  # the verbs that handle mixture-of-experts so far

    # -- hyperparameters ---------------------------------------------------------------------------------
    def gguf_int(self, f, key: str, where, required: bool = True) -> int | None:
        """<gguf_arch>.<key> as one int (a per-layer array must hold one value); None when absent and optional."""
        a = self.gguf_arch
        v = f.get(f"{a}.{key}")
        if v is not None and not isinstance(v, (int, float)):
            vals = {int(x) for x in v}
            if len(vals) != 1:
                raise Lora2GGUFError(f"{where}: metadata {a}.{key} differs between layers ({sorted(vals)}); "
                                     "lora2gguf supports one value for every layer")
            v = vals.pop()
        if v is None and required:
            raise Lora2GGUFError(f"{where}: metadata {a}.{key} is missing; a {self.name} model needs it")
        return None if v is None else int(v)

    def moe_fields(self, n_expert: int, n_used: int, n_ff_exp: int, keys: tuple[str, str, str], where,
                   **more) -> dict:
        """The MoESpec fields, checked (keys: the names the three sizes came from, for the error)."""
        check_dims(dict(zip(keys, (n_expert, n_used, n_ff_exp))), where)
        if n_used > n_expert:
            raise Lora2GGUFError(f"{where}: {keys[1]} {n_used} exceeds {keys[0]} {n_expert}; the model description "
                                 "is corrupt")
        return dict(n_expert=n_expert, n_expert_used=n_used, n_ff_exp=n_ff_exp, **more)

    # -- tensors -----------------------------------------------------------------------------------------
    def linear_shapes(self, spec: MoESpec) -> dict[str, tuple[int, int]]:
        shapes = {k: v for k, v in super().linear_shapes(spec).items() if k.startswith("self_attn.")}
        return shapes | {"mlp.gate.weight": (spec.n_expert, spec.n_embd)}

    def expert_shapes(self, spec: MoESpec) -> dict[str, tuple[int, int, int]]:
        E, D, F = spec.n_expert, spec.n_embd, spec.n_ff_exp
        return {"mlp.experts.gate_proj.weight": (E, F, D), "mlp.experts.up_proj.weight": (E, F, D),
                "mlp.experts.down_proj.weight": (E, D, F)}

    # -- PyTorch forward ---------------------------------------------------------------------------------
    def moe_block(self, spec: MoESpec):
        from lora2gguf.models.layers import MoE

        return MoE(spec.n_embd, spec.n_ff_exp, spec.n_expert, spec.n_expert_used, spec.norm_topk_prob, "silu")

    def build_layer(self, spec: MoESpec, i: int):
        from lora2gguf.models.layers import Attention, DecoderLayer, RMSNorm

        return DecoderLayer(
            norms={"input_layernorm": RMSNorm(spec.n_embd, spec.norm_eps),
                   "post_attention_layernorm": RMSNorm(spec.n_embd, spec.norm_eps)},
            attn_in="input_layernorm", mlp_in="post_attention_layernorm", self_attn=Attention(spec),
            mlp=self.moe_block(spec))
