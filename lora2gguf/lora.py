"""Trainable LoRA on the reference model, with PEFT's math and PEFT's file format.

A LoRALinear wraps a frozen nn.Linear: y = base(x) + B(A(dropout(x))) · scale, scale = alpha/r
(alpha/√r with rsLoRA), A initialised kaiming-uniform(a=√5) and B zeros, as PEFT does. Saving writes
adapter_config.json + adapter_model.safetensors with the keys PEFT's save_pretrained writes
(`base_model.model.<module>.lora_A.weight`), so the result loads with `peft.PeftModel.from_pretrained`
and with every lora2gguf verb.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from . import archs
from .errors import Lora2GGUFError
from .gguf_write import atomic_output

PREFIX = "base_model.model."
# "all-linear" in PEFT's sense for a decoder: every projection of every layer, not the LM head.
ALL_LINEAR = tuple(p.split(".")[-1] for p in archs.LAYER_LINEARS)


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r: int, alpha: float, rslora: bool = False, dropout: float = 0.0):
        super().__init__()
        self.base_layer = base
        self.r, self.alpha = r, alpha
        self.scale = alpha / math.sqrt(r) if rslora else alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        dev = base.weight.device
        # LoRA weights stay float32 whatever the base dtype: optimizer updates are tiny.
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=dev, dtype=torch.float32)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=dev, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # As PEFT: the input goes to the LoRA weights' dtype (autocast, if on, then picks the compute dtype).
        lora = self.lora_B(self.lora_A(self.dropout(x.to(self.lora_A.weight.dtype))))
        return self.base_layer(x) + lora * self.scale


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


def inject_lora(model: nn.Module, targets: str | list[str], r: int, alpha: float, rslora: bool = False,
                dropout: float = 0.0) -> dict[str, LoRALinear]:
    """Freeze `model` and wrap every target projection in a LoRALinear. Returns HF module path → layer."""
    if r <= 0:
        raise Lora2GGUFError(f"--rank must be positive, got {r}")
    short = resolve_targets(targets)
    model.requires_grad_(False)
    wrapped: dict[str, LoRALinear] = {}
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name.split(".")[-1] in short and name.startswith("model.layers."):
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


def adapter_config(targets: list[str], r: int, alpha: float, rslora: bool, dropout: float, base_name: str) -> dict:
    """The adapter_config.json PEFT writes for this LoraConfig (the keys PEFT reads, plus its defaults)."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
        "r": r, "lora_alpha": alpha, "use_rslora": rslora, "lora_dropout": dropout,
        "target_modules": sorted(targets), "bias": "none", "fan_in_fan_out": False, "use_dora": False,
        "lora_bias": False, "modules_to_save": None, "init_lora_weights": True, "inference_mode": True,
        "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None,
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
