"""The typed hyperparameters every architecture shares (ModelSpec); an architecture with more of its own
subclasses it in its module (models/gemma3.py: Gemma3Spec). Numpy-free and torch-free: GGUF and HF readers,
convert and merge use it without importing torch."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from lora2gguf.errors import Lora2GGUFError
from lora2gguf.models.registry import get, module_for


@dataclass(frozen=True)
class ModelSpec:
    arch: str  # GGUF general.architecture
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_vocab: int
    n_ctx_train: int
    rope_theta: float
    rope_scaling_type: str  # "none" or "linear"
    rope_scaling_factor: float
    norm_eps: float
    tied_embeddings: bool
    qk_norm: bool  # per-head RMSNorm on q and k before rope
    attn_bias: bool  # q/k/v projections carry a bias
    rope_dim: int = 0  # rotated dimensions per head (llama.cpp's n_rot; 0: all of head_dim)
    name: str = ""

    @property
    def arch_module(self):
        """The models/<arch>.py object that owns everything about this architecture."""
        return get(self.arch)

    @property
    def n_rot(self) -> int:
        return self.rope_dim or self.head_dim

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class MoESpec(ModelSpec):
    """A mixture-of-experts decoder: every layer's MLP is n_expert experts of width n_ff_exp, of which a
    softmax router picks n_expert_used per token (models/layers.py: MoE), plus a gated shared expert when
    n_ff_shexp > 0 (SharedExpertMoE)."""
    n_expert: int = 0
    n_expert_used: int = 0
    n_ff_exp: int = 0
    norm_topk_prob: bool = True  # the top-k routing weights are renormalised to sum to 1
    n_ff_shexp: int = 0  # width of an always-on shared expert beside the routed ones (qwen2moe); 0: none

    @property
    def arch_module(self):
        return module_for(self.arch, True)  # `arch` is the GGUF name, shared with a dense form for Mixtral


def check_dims(fields: dict[str, int], where) -> None:
    """Sizes from metadata/config.json must be positive (a zero head count would divide by zero later)."""
    for key, v in fields.items():
        if v < 1:
            raise Lora2GGUFError(f"{where}: {key} is {v}; it must be positive (the model description is corrupt)")
