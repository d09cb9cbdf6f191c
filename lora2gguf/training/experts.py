"""Trainable LoRA on a mixture-of-experts layer's stacked experts (models.layers.Experts), in the form PEFT
gives transformers 5's fused experts with `target_parameters=["mlp.experts.gate_up_proj",
"mlp.experts.down_proj"]` (lora.ParamWrapper): one LoRA per expert on the fused gate_up (A shared by the gate
and up rows, B over 2·F rows, gate rows first) and one per expert on down. Held per expert as A (E, r, in) and
B (E, out, r), what llama.cpp's *_exps LoRA holds; adapters.peft writes PEFT's [r·E, in] / [out, r·E] layout.

The MoE forward is the reference's (models.layers.MoE: router softmax, top-k, renormalised as the arch does).
Router-auxiliary-free: no load-balancing loss is added, and the router (mlp.gate) stays frozen unless named in
--targets: the auxiliary loss exists to keep a trained router balanced; with the router frozen the routing
cannot collapse, and the loss would only pull the experts' LoRA towards balance rather than the task.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lora2gguf.adapters.peft import lora_scale
from lora2gguf.models.layers import Experts


class Factor(nn.Module):
    """One LoRA factor as a `.weight` parameter, as LoRALinear's lora_A / lora_B are (the optimizer, the
    checkpoint and to_adapter read `.weight`)."""

    def __init__(self, shape: tuple[int, ...], device):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(shape, device=device, dtype=torch.float32))


class ExpertLoRA(nn.Module):
    """The LoRA on one expert parameter: expert e adds B[e]·A[e]·x · scale. A is initialised as PEFT initialises
    its [r·E, in] lora_A (kaiming-uniform, a=√5, fan-in `in`), B zeros. No dropout: PEFT's ParamWrapper cannot
    take it (x is not factored out of the expert matmul), and refuses an adapter that asks for it."""

    def __init__(self, n_expert: int, n_in: int, n_out: int, r: int, alpha: float, rslora: bool, device):
        super().__init__()
        self.r, self.alpha, self.p = r, alpha, 0.0
        self.scale = lora_scale(r, alpha, rslora)
        self.lora_A, self.lora_B = Factor((n_expert, r, n_in), device), Factor((n_expert, n_out, r), device)
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A.weight.view(n_expert * r, n_in), a=math.sqrt(5))

    def forward(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """The LoRA output for x (tokens, in) of the expert whose factors are a (r, in), b (out, r), in x's dtype
        (the LoRA computes in float32, as PEFT's)."""
        return (((x.to(a.dtype) @ a.t()) @ b.t()) * self.scale).to(x.dtype)


class LoRAExperts(nn.Module):
    """models.layers.Experts (frozen) with an ExpertLoRA on the fused gate_up and one on down."""

    def __init__(self, base: Experts, r: int, alpha: float, rslora: bool):
        super().__init__()
        self.base_layer = base
        E, F, D = base.gate_proj.weight.shape
        dev = base.gate_proj.weight.device
        self.gate_up_proj = ExpertLoRA(E, D, 2 * F, r, alpha, rslora, dev)
        self.down_proj = ExpertLoRA(E, F, D, r, alpha, rslora, dev)
        self.n_ff = F
        self.views: tuple = ()

    def bind(self) -> None:
        """Per-expert views of the factors, taken once per MoE forward (a pre-hook on the MoE block): autograd
        then gathers each factor's gradient in one stack (unbind's backward), where indexing A[e] per expert
        would scatter into a zeroed full-size gradient once per expert (E times the work with 128 experts)."""
        self.views = tuple((m.lora_A.weight.unbind(0), m.lora_B.weight.unbind(0))
                           for m in (self.gate_up_proj, self.down_proj))

    def forward(self, x: torch.Tensor, e: int) -> torch.Tensor:
        b, ((a1, b1), (a2, b2)) = self.base_layer, self.views
        gu = self.gate_up_proj(x, a1[e], b1[e])
        gate, up = b.gate_proj(x, e) + gu[:, :self.n_ff], b.up_proj(x, e) + gu[:, self.n_ff:]
        h = b.act(gate) * up
        return b.down_proj(h, e) + self.down_proj(h, a2[e], b2[e])


def inject_expert_lora(model: nn.Module, r: int, alpha: float, rslora: bool,
                       layers: list[int] | None) -> dict[str, ExpertLoRA]:
    """Wrap every layer's experts (of `layers`, default all) in LoRAExperts → PEFT parameter path
    (model.layers.N.mlp.experts.gate_up_proj / down_proj) → its ExpertLoRA."""
    out: dict[str, ExpertLoRA] = {}
    for name, module in list(model.named_modules()):
        if isinstance(module, Experts) and (layers is None or int(name.split(".")[2]) in layers):
            parent, attr = name.rsplit(".", 1)
            wrapped = LoRAExperts(module, r, alpha, rslora)
            moe = model.get_submodule(parent)
            setattr(moe, attr, wrapped)
            moe.register_forward_pre_hook(lambda _m, _args, w=wrapped: w.bind())
            out[f"{name}.gate_up_proj"], out[f"{name}.down_proj"] = wrapped.gate_up_proj, wrapped.down_proj
    return out
