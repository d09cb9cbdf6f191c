"""Make real PEFT adapters (the `peft` library on a transformers model) for the tests."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch


def make_peft_adapter(hf_dir: str | Path, out_dir: str | Path, seed: int = 0, b_std: float = 0.05,
                      **lora_kwargs) -> Path:
    """A PEFT adapter saved by `save_pretrained`, for the transformers model in hf_dir, with random
    non-zero A and B (PEFT initialises B to zero, which would make every check pass trivially).
    b_std sets the size of B and so how far the adapter moves the output."""
    import peft
    import transformers

    warnings.filterwarnings("ignore", category=UserWarning)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    pm = peft.get_peft_model(model, peft.LoraConfig(init_lora_weights=False, **lora_kwargs))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * b_std)
            elif "lora_magnitude_vector" in name:  # move DoRA magnitudes off their init too
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith("modules_to_save.default.weight"):
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    out_dir = Path(out_dir)
    pm.save_pretrained(out_dir)
    return out_dir


def peft_logits(hf_dir: str | Path, adapter_dir: str | Path, tokens: list[int]) -> np.ndarray:
    """Logits of transformers + PEFT (the real libraries) with the adapter loaded from disk."""
    import peft
    import transformers

    warnings.filterwarnings("ignore", category=UserWarning)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    pm = peft.PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    with torch.no_grad():
        return pm(torch.tensor([tokens])).logits[0].float().numpy()


def hf_dir_from_base(base_path: str | Path, out_dir: str | Path) -> Path:
    """Write a transformers-loadable directory (config.json + model.safetensors) holding the same weights
    as a GGUF base (dequantized, HF layout), so that the real PEFT library can make adapters for it."""
    import json

    from safetensors.numpy import save_file

    from lora2gguf.archs import ARCHS
    from lora2gguf.base import open_base

    out_dir = Path(out_dir)
    if (out_dir / "config.json").is_file():
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    with open_base(base_path) as b:
        s, facts = b.spec, ARCHS[b.spec.arch]
        save_file({n: np.ascontiguousarray(b.tensor(n)) for n in b.hf_names()}, str(out_dir / "model.safetensors"),
                  metadata={"format": "pt"})
        cfg = {"architectures": [facts.hf_architectures[0]], "model_type": facts.hf_model_types[0],
               "vocab_size": s.n_vocab, "hidden_size": s.n_embd, "intermediate_size": s.n_ff,
               "num_hidden_layers": s.n_layer, "num_attention_heads": s.n_head, "num_key_value_heads": s.n_head_kv,
               "head_dim": s.head_dim, "max_position_embeddings": s.n_ctx_train, "rms_norm_eps": s.norm_eps,
               "rope_theta": s.rope_theta, "hidden_act": "silu", "tie_word_embeddings": s.tied_embeddings,
               "attention_bias": s.attn_bias, "torch_dtype": "float32"}
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    return out_dir


def peft_deltas(hf_dir: str | Path, adapter_dir: str | Path, scale: float = 1.0) -> dict[str, np.ndarray]:
    """HF module path → ΔW as the real PEFT library computes it (LoraLayer.get_delta_weight, base weight
    layout), times `scale`: the truth for every low-rank check."""
    import peft
    import transformers
    from peft.tuners.lora import LoraLayer

    warnings.filterwarnings("ignore", category=UserWarning)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    pm = peft.PeftModel.from_pretrained(model, str(adapter_dir))
    out = {}
    with torch.no_grad():
        for name, mod in pm.base_model.model.named_modules():
            if isinstance(mod, LoraLayer) and "default" in (mod.lora_A.keys() | mod.lora_embedding_A.keys()):
                out[name] = mod.get_delta_weight("default").double().numpy() * scale
    return out
