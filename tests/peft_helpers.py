"""Make real PEFT adapters (the `peft` library on a transformers model) for the tests."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import torch


# Phi-3 stores q/k/v and gate/up as one projection each: the tests' split target names map onto them
FUSED = {"phi3": {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj",
                  "up_proj": "gate_up_proj"}}


def for_arch(model_type: str, kw: dict) -> dict:
    """LoraConfig kwargs with split projection names renamed to the fused ones the arch has."""
    names = FUSED.get(model_type)
    if not names:
        return kw

    def rename(s: str) -> str:  # whole names only: qkv_proj holds v_proj, gate_up_proj holds up_proj
        return re.sub(r"(?<![a-z_])(" + "|".join(names) + r")", lambda m: names[m.group(1)], s)

    kw = dict(kw)
    if isinstance(kw.get("target_modules"), list):
        kw["target_modules"] = sorted({rename(t) for t in kw["target_modules"]})
    for key in ("rank_pattern", "alpha_pattern"):
        if kw.get(key):
            kw[key] = {rename(k): v for k, v in kw[key].items()}
    return kw


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
    lora_kwargs = for_arch(model.config.model_type, lora_kwargs)
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

    from lora2gguf.weights.base_model import open_base

    out_dir = Path(out_dir)
    if (out_dir / "config.json").is_file():
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    with open_base(base_path) as b:
        save_file({n: np.ascontiguousarray(b.tensor(n)) for n in b.hf_names()}, str(out_dir / "model.safetensors"),
                  metadata={"format": "pt"})
        cfg = b.spec.arch_module.hf_config(b.spec)
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


def assert_converts_like_peft(arch: str, adapter_dir: str | Path, peft_dir: str | Path, out: str | Path,
                              n_tokens: int = 64, seed: int = 4) -> dict:
    """Convert `adapter_dir` (any format) for the `arch` fixture, load it in llama.cpp, and compare its logits
    with transformers + PEFT on `peft_dir` (the same ΔW in PEFT form): KL ≤ 1e-5, same top-1. Also checks
    that the adapter visibly moves the base, so that a dropped or mis-scaled adapter cannot pass."""
    from conftest import fixture, token_ids
    from lora2gguf.commands.convert import convert
    from lora2gguf.parity.metrics import compare
    from lora2gguf.llamacpp.runtime import LlamaRuntime

    gguf = convert(adapter_dir, fixture(arch), out)
    with LlamaRuntime(fixture(arch)) as rt:
        tokens = token_ids(rt.n_vocab, n_tokens, seed=seed)
        base = rt.logits(tokens)
        rt.set_adapters([(gguf, 1.0)])
        ours = rt.logits(tokens)
    assert compare(base, ours)["mean_kl"] > 1e-2, "the adapter must visibly change the output"
    m = compare(peft_logits(fixture(arch, "hf"), peft_dir, tokens), ours)
    assert m["mean_kl"] <= 1e-5 and m["top1"] == 1.0, m
    return m


def assert_merges_like_peft(arch: str, adapter_dir: str | Path, peft_dir: str | Path, out: str | Path,
                            n_tokens: int = 64, seed: int = 11) -> dict:
    """Merge `adapter_dir` (any format) into the F32 `arch` fixture and compare the merged file's llama.cpp
    logits with transformers + PEFT on `peft_dir`: KL ≤ 1e-5, same top-1."""
    from conftest import fixture, token_ids
    from lora2gguf.commands.merge import merge
    from lora2gguf.parity.metrics import compare
    from lora2gguf.llamacpp.runtime import LlamaRuntime

    merged = merge(fixture(arch), [(adapter_dir, 1.0)], out, quant="f32")
    with LlamaRuntime(merged) as rt:
        tokens = token_ids(rt.n_vocab, n_tokens, seed=seed)
        ours = rt.logits(tokens)
    m = compare(peft_logits(fixture(arch, "hf"), peft_dir, tokens), ours)
    assert m["mean_kl"] <= 1e-5 and m["top1"] == 1.0, m
    return m
