"""Trainable LoRA on the reference model, with PEFT's math and PEFT's file format.

A LoRALinear wraps a frozen nn.Linear: y = base(x) + B(A(dropout(x))) · scale, scale = alpha/r
(alpha/√r with rsLoRA), A initialised kaiming-uniform(a=√5) and B zeros, as PEFT does. Saving writes
adapter_config.json + adapter_model.safetensors with the keys PEFT's save_pretrained writes
(`base_model.model.<module>.lora_A.weight`), so the result loads with `peft.PeftModel.from_pretrained`
and with every lora2gguf verb.

Also the rest of the trainable model: the frozen base loaded from a GGUF without copying what needs no
conversion, and the training loss, which applies the (frozen) LM head to trained positions only and a
chunk at a time.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import archs
from .errors import Lora2GGUFError
from .gguf_write import atomic_output

PREFIX = "base_model.model."
# "all-linear" in PEFT's sense for a decoder: every projection of every layer, not the LM head.
ALL_LINEAR = tuple(p.split(".")[-1] for p in archs.LAYER_LINEARS)


class DropoutLoRA(torch.autograd.Function):
    """PEFT's lora_B(lora_A(dropout(x))) · scale in training, as (x ⊙ mask) Aᵀ Bᵀ · scale/(1-p).

    Same math, less memory: autograd through nn.Dropout keeps, per projection, a float copy of the
    dropped-out input and a float mask (8 bytes an element; q, k and v each keep their own). This keeps
    x, which the projections reading the same input share, and a boolean mask (1 byte), and rebuilds the
    dropped-out input in backward. Computes in x's dtype (bf16 under autocast), gradients in A/B's."""

    @staticmethod
    def forward(ctx, x, A, B, mask, scale: float):
        with torch.autocast(x.device.type, enabled=False):
            a, b = A.to(x.dtype), B.to(x.dtype)
            u = F.linear(torch.where(mask, x, 0), a)
            ctx.save_for_backward(x, mask, a, b, u)
            ctx.scale, ctx.param_dtype = scale, A.dtype
            return F.linear(u, b) * scale

    @staticmethod
    def backward(ctx, g):
        x, mask, a, b, u = ctx.saved_tensors
        with torch.autocast(x.device.type, enabled=False):
            g2 = g.reshape(-1, g.shape[-1])
            gu = F.linear(g2, b.t()) * ctx.scale  # (N, r)
            grad_b = (g2.t() @ u.reshape(-1, u.shape[-1])) * ctx.scale
            grad_a = gu.t() @ torch.where(mask, x, 0).reshape(-1, x.shape[-1])
            grad_x = torch.where(mask, F.linear(gu, a.t()).reshape(x.shape), 0) if ctx.needs_input_grad[0] else None
        return grad_x, grad_a.to(ctx.param_dtype), grad_b.to(ctx.param_dtype), None, None


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r: int, alpha: float, rslora: bool = False, dropout: float = 0.0):
        super().__init__()
        self.base_layer = base
        self.r, self.alpha, self.p = r, alpha, dropout
        self.scale = alpha / math.sqrt(r) if rslora else alpha / r
        dev = base.weight.device
        # LoRA weights stay float32 whatever the base dtype: optimizer updates are tiny.
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=dev, dtype=torch.float32)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=dev, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.training and self.p > 0 and torch.is_grad_enabled():
            keep = torch.rand(x.shape, device=x.device) >= self.p
            lora = DropoutLoRA.apply(x, self.lora_A.weight, self.lora_B.weight, keep, self.scale / (1 - self.p))
        else:  # as PEFT: the input goes to the LoRA weights' dtype (autocast, if on, picks the compute dtype)
            lora = self.lora_B(self.lora_A(x.to(self.lora_A.weight.dtype))) * self.scale
        return y + lora


def resolve_targets(targets: str | list[str]) -> list[str]:
    """`all-linear` or a comma list of projection names (q_proj, ...) → sorted short names."""
    names = targets.split(",") if isinstance(targets, str) else list(targets)
    names = [n.strip() for n in names if n.strip()]
    if names == ["all-linear"]:
        return sorted(ALL_LINEAR)
    bad = [n for n in names if n not in ALL_LINEAR]
    if bad or not names:
        extra = ("; lm_head and embed_tokens are not trainable targets here (llama.cpp cannot apply LoRA "
                 "to a tied head)" if any(b in ("lm_head", "embed_tokens") for b in bad) else "")
        raise Lora2GGUFError(f"--targets: unknown target {bad[0] if bad else '(empty)'!r}; use all-linear or "
                             f"a comma list of {', '.join(ALL_LINEAR)}{extra}")
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
    short = resolve_targets(targets)
    model.requires_grad_(False)
    wrapped: dict[str, LoRALinear] = {}
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


def lora_state_dict(layers: dict[str, LoRALinear]) -> dict[str, torch.Tensor]:
    """PEFT's keys (as save_pretrained writes them), float32 on CPU."""
    out = {}
    for name, layer in sorted(layers.items()):
        out[f"{PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight.detach().float().cpu().contiguous()
        out[f"{PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight.detach().float().cpu().contiguous()
    return out


def load_lora_state(layers: dict[str, LoRALinear], state: dict[str, torch.Tensor]) -> None:
    want = {f"{PREFIX}{n}.lora_{ab}.weight" for n in layers for ab in "AB"}
    if set(state) != want:
        raise Lora2GGUFError("checkpoint LoRA tensors do not match this run's targets; resume with the same "
                             "--targets and --rank")
    with torch.no_grad():
        for name, layer in layers.items():
            layer.lora_A.weight.copy_(state[f"{PREFIX}{name}.lora_A.weight"])
            layer.lora_B.weight.copy_(state[f"{PREFIX}{name}.lora_B.weight"])


def adapter_config(targets: list[str], r: int, alpha: float, rslora: bool, dropout: float, base_name: str,
                   layers: list[int] | None = None) -> dict:
    """The adapter_config.json PEFT writes for this LoraConfig (the keys PEFT reads, plus its defaults)."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
        "r": r, "lora_alpha": alpha, "use_rslora": rslora, "lora_dropout": dropout,
        "target_modules": sorted(targets), "bias": "none", "fan_in_fan_out": False, "use_dora": False,
        "lora_bias": False, "modules_to_save": None, "init_lora_weights": True, "inference_mode": True,
        "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": layers, "layers_pattern": None,
        "revision": None,
    }


def save_adapter(out_dir: str | Path, layers: dict[str, LoRALinear], config: dict) -> Path:
    """Write a PEFT adapter directory; each file appears whole or not at all."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_output(out_dir / "adapter_model.safetensors") as tmp:
        save_file(lora_state_dict(layers), str(tmp), metadata={"format": "pt"})
    with atomic_output(out_dir / "adapter_config.json") as tmp:
        tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out_dir


class HeadLoss(torch.autograd.Function):
    """Σ cross-entropy of (h @ headᵀ) over rows of h, a chunk of rows at a time. The head is frozen, so
    the only gradient is w.r.t. h: computed here, chunk by chunk, and kept (rows × width) for backward.
    Full-vocabulary logits never exist for the whole batch, unlike model(ids) followed by the loss."""

    @staticmethod
    def forward(ctx, h, head, targets, chunk: int):
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        for i in range(0, h.shape[0], chunk):
            logits = F.linear(h[i:i + chunk], head).float()
            t = targets[i:i + chunk]
            lse = logits.logsumexp(-1)
            total += (lse - logits.gather(1, t[:, None])[:, 0]).sum()
            if grad is not None:  # d loss / d logits = softmax - onehot
                p = logits.sub_(lse[:, None]).exp_()
                p[torch.arange(len(t), device=t.device), t] -= 1
                grad[i:i + chunk] = F.linear(p.to(h.dtype), head.t().to(h.dtype))
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, g):
        (grad,) = ctx.saved_tensors
        return grad * g, None, None, None


class LossModel(nn.Module):
    """Summed next-token loss in one forward, so that DistributedDataParallel sees the whole step."""

    def __init__(self, model: nn.Module, chunk: int = 1024):
        super().__init__()
        self.model, self.chunk = model, chunk

    def forward(self, ids, attention_mask, targets):
        h = self.model.hidden_states(ids, attention_mask)
        keep = targets != -100
        m = self.model
        head = m.model.embed_tokens.weight if m.spec.tied_embeddings else m.lm_head.weight
        return HeadLoss.apply(h[keep], head, targets[keep], self.chunk)


def load_base_model(base, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """Transformer.from_base, except that on CPU in fp32 the F32 tensors of a GGUF are used in place,
    straight from the file's memory map: the frozen base is never written, so it costs the file's
    pages and no copy (quantized tensors and permuted q/k rows are still dequantized/copied)."""
    from .base import GGUFBase
    from .model import Rope, Transformer

    if not (isinstance(base, GGUFBase) and dtype == torch.float32 and device.type == "cpu"):
        return Transformer.from_base(base, dtype=dtype, device=device)
    import warnings

    from gguf import GGMLQuantizationType

    from .archs import qk_heads

    spec = base.spec
    with torch.device("meta"):
        model = Transformer(spec, None)
    state = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not writable.*")
        for name in base.hf_names():
            info = base.file.tensors[base.gguf_name(name)]
            permuted = spec.facts.permute_qk and qk_heads(name, spec.n_head, spec.n_head_kv)
            if info.type == GGMLQuantizationType.F32 and not permuted:
                arr = base.file.raw(info.name).view(np.float32).reshape(info.shape)
            else:
                arr = base.tensor(name)
            state[name] = torch.from_numpy(arr)
    model.load_state_dict(state, strict=True, assign=True)
    ff = base.rope_freqs()
    model.rope = Rope(spec, torch.from_numpy(ff) if ff is not None else None)
    return model.eval().requires_grad_(False)
