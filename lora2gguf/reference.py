"""The reference: the PyTorch model on the base's (dequantized) weights with adapters applied by PEFT's
exact math (adapter.merged_weight / merged_bias, float64), the yardstick for convert/merge/verify."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import nn

from .adapter import ModuleLoRA, PeftAdapter, merged_bias, merged_weight
from .models.layers import Transformer


def modules_by_target(adapters: list[tuple[PeftAdapter, float]]) -> dict[str, list[tuple[ModuleLoRA, float]]]:
    """HF module path → [(module LoRA, user scale)] over all adapters, in order."""
    out: dict[str, list[tuple[ModuleLoRA, float]]] = {}
    for adapter, scale in adapters:
        for name, m in adapter.modules.items():
            out.setdefault(name, []).append((m, scale))
    return out


def reference_model(base, adapters: list[tuple[PeftAdapter, float]] = (), dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu") -> Transformer:
    """Transformer on `base` with every adapter folded in (user scale per adapter, like llama.cpp's
    --lora-scaled). modules_to_save weights replace the base tensor; the last adapter wins."""
    adapters = list(adapters)
    for a, _ in adapters:
        a.check_base(dataclasses.replace(base.spec, tied_embeddings=False), f"base {base.spec.name}")
    model = Transformer.from_base(base)
    mods = modules_by_target(adapters)
    touched = set(mods) | {t.rsplit(".", 1)[0] for a, _ in adapters for t in a.full_weights}
    # PEFT on a tied base: a LoRA or modules_to_save on embed_tokens changes the lookup only, the head
    # keeps multiplying by the original embedding (and a LoRA on lm_head changes the head only). So untie:
    # the head gets its own copy of the original weight before either side is changed.
    if base.spec.tied_embeddings and touched & {"lm_head", "model.embed_tokens"}:
        model.spec = dataclasses.replace(model.spec, tied_embeddings=False)
        model.lm_head = nn.Linear(base.spec.n_embd, base.spec.n_vocab, bias=False)
        model.lm_head.weight = nn.Parameter(model.model.embed_tokens.weight.detach().clone(), requires_grad=False)
    for name, ms in mods.items():
        module = model.get_submodule(name)
        w = module.weight.detach().numpy()
        module.weight = nn.Parameter(torch.from_numpy(merged_weight(w, ms).astype(np.float32)), requires_grad=False)
        old_b = module.bias.detach().numpy() if getattr(module, "bias", None) is not None else None
        b = merged_bias(old_b, w.shape[0], ms)
        if b is not None:
            module.bias = nn.Parameter(torch.from_numpy(np.asarray(b, np.float32)), requires_grad=False)
    for a, _ in adapters:
        for tname, t in a.full_weights.items():
            mod_name, attr = tname.rsplit(".", 1)
            module = model.get_submodule(mod_name)
            setattr(module, attr, nn.Parameter(torch.from_numpy(np.asarray(t, np.float32)), requires_grad=False))
    return model.to(device=device, dtype=dtype).eval()
