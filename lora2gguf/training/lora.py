"""Trainable LoRA on the PyTorch model (models.layers.Transformer), with PEFT's math.

A LoRALinear wraps a frozen nn.Linear: y = base(x) + B(A(dropout(x))) · scale (adapters.peft.lora_scale),
A initialised kaiming-uniform(a=√5) and B zeros, as PEFT does. Each LoRA'd projection is computed as one
LoRAProjection (the fused layer of llama-style archs is training.fused; a mixture of experts' expert stacks
take training.experts' LoRA, named `experts` in --targets). Saving hands the trained weights
over as the in-memory adapter (to_adapter) to PEFT's writer (adapters.peft), so the result loads with
`peft.PeftModel.from_pretrained` and with every lora2gguf verb.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lora2gguf import models
from lora2gguf.adapters.lora import ModuleLoRA, PeftAdapter
from lora2gguf.adapters.peft import (
    PREFIX,
    expert_param_table,
    lora_scale,
    param_wrapper_factors,
    param_wrapper_key,
    split_param_wrapper,
)
from lora2gguf.errors import Lora2GGUFError
from lora2gguf.training.experts import ExpertLoRA, inject_expert_lora
from lora2gguf.weights.quantized import frozen_grad_input, frozen_linear


def dropped_positions(n: int, p: float) -> torch.Tensor:
    """Sorted flat indices of the n inputs that dropout zeroes, each independently with probability p
    (nn.Dropout's Bernoulli mask), drawn as the gaps between them: geometric, P(gap = k) = (1-p)^(k-1)·p,
    so about n·p random numbers rather than n. Drawn on the CPU from torch's generator (which checkpoints
    and activation checkpointing save and restore)."""
    log_q, k = math.log1p(-p), int(n * p + 6 * math.sqrt(n * p) + 16)  # enough gaps, but for ~1e-9
    parts, last = [], -1
    while last < n:
        gaps = torch.rand(k, dtype=torch.float64).neg_().log1p_().div_(log_q).floor_().add_(1)
        parts.append(gaps.cumsum_(0).add_(last).long())
        last = int(parts[-1][-1])
    idx = torch.cat(parts) if len(parts) > 1 else parts[0]
    return idx[:int(torch.searchsorted(idx, n))]


def _drop(x2: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    if idx is None:
        return x2
    x2 = x2.clone()
    x2.view(-1)[idx] = 0
    return x2


class LoRAProjection(torch.autograd.Function):
    """y = x·Wᵀ + bias + residual with W frozen, then for each LoRA j on its block of output columns:
    y[:, a_j:b_j] += (dropout_j(x)·A_jᵀ)·s_j·B_jᵀ — PEFT's lora_B(lora_A(dropout(x)))·scale, with
    s_j = scale_j/(1-p) and the positions in drops_j zeroed.

    One GEMM for the frozen weight however many projections read x (q/k/v, gate/up concatenated); each
    LoRA added into that output by a GEMM (addmm), the residual too; no gradient for frozen weights, so
    backward needs no x: it keeps each LoRA's dropped-out input (x itself without dropout, shared), its
    (N, r) product and its dropped positions (8 bytes each, PEFT keeps a float mask). Computes in W's
    dtype (bf16 under autocast), A/B gradients in theirs."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, spans, drops, *ab):
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1]).to(weight.dtype).contiguous()
            if isinstance(weight, torch.Tensor):
                if residual is None:
                    y = F.linear(x2, weight, bias)
                else:
                    y = torch.addmm(residual.reshape(-1, weight.shape[0]).to(weight.dtype), x2, weight.t())
                    if bias is not None:
                        y += bias
            else:  # kept quantized: dequantized a block of rows at a time, here and again in backward
                y = frozen_linear(x2, weight, bias)
                if residual is not None:
                    y += residual.reshape(-1, weight.shape[0])
            us, xms = [], []
            for (a, b, s), idx, A, B in zip(spans, drops, ab[0::2], ab[1::2]):
                xms.append(_drop(x2, idx))
                us.append((xms[-1] @ A.to(x2.dtype).t()).mul_(s))
                y[:, a:b].addmm_(us[-1], B.to(x2.dtype).t())
        ctx.spans, ctx.x_shape = spans, x.shape
        ctx.weight = None if isinstance(weight, torch.Tensor) else weight
        ctx.save_for_backward(weight if ctx.weight is None else None, *us, *xms, *drops, *ab)
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, gy):
        weight, *rest = ctx.saved_tensors
        weight = ctx.weight if ctx.weight is not None else weight
        n = len(ctx.spans)
        us, xms, drops, ab = rest[:n], rest[n:2 * n], rest[2 * n:3 * n], rest[3 * n:]
        with torch.autocast(gy.device.type, enabled=False):
            gy2 = gy.reshape(-1, gy.shape[-1]).to(weight.dtype)
            gx = frozen_grad_input(gy2, weight) if ctx.needs_input_grad[0] else None
            grads = []
            for (a, b, s), u, xm, idx, A, B in zip(ctx.spans, us, xms, drops, ab[0::2], ab[1::2]):
                g = gy2[:, a:b]
                gu = (g @ B.to(gy2.dtype)).mul_(s)
                grads += [(gu.t() @ xm).to(A.dtype), (g.t() @ u).to(B.dtype)]
                if gx is None:
                    continue
                if idx is None:
                    gx.addmm_(gu, A.to(gy2.dtype))
                else:  # the gradient only reaches the inputs that were kept
                    gl = gu @ A.to(gy2.dtype)
                    gl.view(-1)[idx] = 0
                    gx += gl
        gx = gx.view(ctx.x_shape) if gx is not None else None
        return gx, None, None, gy if ctx.needs_input_grad[3] else None, None, None, *grads


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r: int, alpha: float, rslora: bool = False, dropout: float = 0.0):
        super().__init__()
        self.base_layer = base
        self.r, self.alpha, self.p = r, alpha, dropout
        self.scale = lora_scale(r, alpha, rslora)
        dev = base.weight.device
        # LoRA weights stay float32 whatever the base dtype: optimizer updates are tiny.
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=dev, dtype=torch.float32)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=dev, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled():
            return project(x, self.base_layer.weight, self.base_layer.bias, [(self, 0, self.base_layer.out_features)])
        # as PEFT: the input goes to the LoRA weights' dtype (autocast, if on, picks the compute dtype)
        return self.base_layer(x) + self.lora_B(self.lora_A(x.to(self.lora_A.weight.dtype))) * self.scale


def project(x, weight, bias, loras, residual=None) -> torch.Tensor:
    """LoRAProjection for the LoRALinear modules in `loras` [(module, first output column, end)], drawing
    each one's dropout positions when it trains."""
    spans, drops, ab = [], [], []
    for m, a, b in loras:
        p = m.p if m.training and torch.is_grad_enabled() else 0.0
        spans.append((a, b, m.scale / (1 - p)))
        drops.append(dropped_positions(x.numel(), p).to(x.device) if p > 0 else None)
        ab += [m.lora_A.weight, m.lora_B.weight]
    return LoRAProjection.apply(x, weight, bias, residual, tuple(spans), tuple(drops), *ab)


EXPERTS = "experts"  # --targets name of a mixture-of-experts layer's expert stacks (training.experts)
ROUTER = "gate"  # a MoE router (mlp.gate): trained only when named (training.experts: router-auxiliary-free)


def resolve_targets(targets: str | list[str], arch: models.Arch | None = None) -> list[str]:
    """`all-linear` or a comma list of projection names (q_proj, ...) → sorted short names: "all-linear" in
    PEFT's sense for a decoder, every projection of every layer of `arch`, not the LM head; on a
    mixture-of-experts arch also `experts` (every expert's gate_up and down) but not the router `gate`.
    Without an arch (before the base is read) names are checked against every supported arch's projections."""
    archs = [arch] if arch is not None else models.all_archs()
    moe = any(a.expert_params for a in archs)
    known = sorted({p.split(".")[-1] for a in archs for p in a.layer_linears} | ({EXPERTS} if moe else set()))
    names = targets.split(",") if isinstance(targets, str) else list(targets)
    names = [n.strip() for n in names if n.strip()]
    if names == ["all-linear"]:
        return [n for n in known if not (moe and n == ROUTER)]
    bad = [n for n in names if n not in known]
    if bad or not names:
        extra = ("; lm_head and embed_tokens are not trainable targets here (llama.cpp cannot apply LoRA "
                 "to a tied head)" if any(b in ("lm_head", "embed_tokens") for b in bad) else "")
        where = f" of {arch.name}" if arch is not None else ""
        raise Lora2GGUFError(f"--targets: unknown target {bad[0] if bad else '(empty)'!r}{where}; use all-linear "
                             f"or a comma list of {', '.join(known)}{extra}")
    return sorted(set(names))


def parse_layers(spec: str | None, n_layer: int | None = None) -> list[int] | None:
    """`--layers`: a comma list of layer indices and ranges ("20-29", "0,2,4-6") → sorted indices;
    None or "all" → None (every layer). Checked against n_layer when given."""
    if spec is None or spec.strip() in ("", "all"):
        return None
    out: set[int] = set()
    try:
        for part in spec.split(","):
            lo, _, hi = part.strip().partition("-")
            out.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise Lora2GGUFError(f"--layers {spec!r}: use layer indices and ranges, e.g. 20-29 or 0,2,4-6") from None
    if not out or (n_layer is not None and max(out) >= n_layer):
        raise Lora2GGUFError(f"--layers {spec!r}: the model has layers 0-{(n_layer or 1) - 1}")
    return sorted(out)


def inject_lora(model: nn.Module, targets: str | list[str], r: int, alpha: float, rslora: bool = False,
                dropout: float = 0.0, layers: list[int] | None = None) -> dict[str, LoRALinear]:
    """Freeze `model` and wrap every target projection (of `layers`, default all) in a LoRALinear.
    Returns HF module path → layer. Layers below the first adapted one get no backward pass at all:
    nothing there requires a gradient, so autograd records nothing."""
    if r <= 0:
        raise Lora2GGUFError(f"--rank must be positive, got {r}")
    short = resolve_targets(targets, model.spec.arch_module)
    model.requires_grad_(False)
    wrapped: dict[str, LoRALinear | ExpertLoRA] = {}
    if EXPERTS in short:
        wrapped |= inject_expert_lora(model, r, alpha, rslora, layers)
    for name, module in list(model.named_modules()):
        if (isinstance(module, nn.Linear) and name.split(".")[-1] in short and name.startswith("model.layers.")
                and (layers is None or int(name.split(".")[2]) in layers)):
            parent, attr = name.rsplit(".", 1)
            layer = LoRALinear(module, r, alpha, rslora, dropout)
            setattr(model.get_submodule(parent), attr, layer)
            wrapped[name] = layer
    return wrapped


def lora_parameters(layers: dict[str, LoRALinear]) -> list[nn.Parameter]:
    return [p for layer in layers.values() for p in (layer.lora_A.weight, layer.lora_B.weight)]


def to_adapter(layers: dict[str, LoRALinear], path: Path, config: dict) -> PeftAdapter:
    """The trained LoRA as the in-memory adapter every lora2gguf writer takes (float32, HF layout)."""
    modules = {}
    for name, layer in sorted(layers.items()):
        a, b = (w.detach().float().cpu().numpy() for w in (layer.lora_A.weight, layer.lora_B.weight))
        if isinstance(layer, ExpertLoRA):  # model.layers.N.mlp.experts.gate_up_proj → gate_proj and up_proj stacks
            layer_prefix, param = name.split("mlp.", 1)
            modules |= split_param_wrapper(layer_prefix, "mlp." + param, a, b, layer.r, layer.alpha, layer.scale)
        else:
            modules[name] = ModuleLoRA(name, a, b, layer.r, layer.alpha, layer.scale)
    return PeftAdapter(Path(path), config, modules)


def saved_keys(layers: dict[str, LoRALinear | ExpertLoRA]) -> dict[str, tuple[str, str]]:
    """Each LoRA's (lora_A, lora_B) keys in the saved adapter file (PEFT's; experts nested as PEFT nests them)."""
    keys = {}
    for name, layer in layers.items():
        key = name
        if isinstance(layer, ExpertLoRA):
            prefix, param = name.split("mlp.", 1)
            params = [p for p in expert_param_table() if prefix + p in layers]
            key = param_wrapper_key(prefix, params, "mlp." + param)
        keys[name] = (f"{PREFIX}{key}.lora_A.weight", f"{PREFIX}{key}.lora_B.weight")
    return keys


def load_lora_state(layers: dict[str, LoRALinear | ExpertLoRA], state: dict[str, torch.Tensor]) -> None:
    keys = saved_keys(layers)
    if set(state) != {k for pair in keys.values() for k in pair}:
        raise Lora2GGUFError("checkpoint LoRA tensors do not match this run's targets; resume with the same "
                             "--targets and --rank")
    with torch.no_grad():
        for name, layer in layers.items():
            a, b = (state[k] for k in keys[name])
            if isinstance(layer, ExpertLoRA):  # PEFT's [r·E, in] / [out, r·E] → per expert
                a, b = (torch.from_numpy(t) for t in param_wrapper_factors(a.cpu().numpy(), b.cpu().numpy(),
                                                                           layer.lora_A.weight.shape[0]))
            layer.lora_A.weight.copy_(a)
            layer.lora_B.weight.copy_(b)
