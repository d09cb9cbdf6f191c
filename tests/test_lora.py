"""Trainable LoRA layers against the real PEFT library: the saved files, the forward math, the init."""

import json
import math
import warnings

import numpy as np
import pytest
import torch
from safetensors import safe_open

from conftest import fixture, reference_logits, token_ids
from lora2gguf.base import open_base
from lora2gguf.errors import Lora2GGUFError
from lora2gguf.lora import adapter_config, inject_lora, resolve_targets, save_adapter
from lora2gguf.metrics import compare
from lora2gguf.model import Transformer
from peft_helpers import peft_logits


def our_model(arch, targets, r, alpha, rslora=False, dropout=0.0, seed=0):
    with open_base(fixture(arch, "hf")) as b:
        model = Transformer.from_base(b)
    torch.manual_seed(seed)
    return model, inject_lora(model, targets, r, alpha, rslora, dropout)


def randomize_b(layers, seed=1, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * std)


def read_st(path):
    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_saved_files_match_peft_save_pretrained(tmp_path):
    import peft
    import transformers

    warnings.filterwarnings("ignore", category=UserWarning)
    hf = fixture("llama", "hf")
    kw = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.05,
              use_rslora=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", **kw)).save_pretrained(tmp_path / "peft")
    _, layers = our_model("llama", "q_proj,v_proj,down_proj", 4, 8, rslora=True, dropout=0.05)
    save_adapter(tmp_path / "ours", layers, adapter_config(resolve_targets("q_proj,v_proj,down_proj"), 4, 8, True,
                                                           0.05, str(hf)))

    theirs, their_meta = read_st(tmp_path / "peft" / "adapter_model.safetensors")
    ours, our_meta = read_st(tmp_path / "ours" / "adapter_model.safetensors")
    assert sorted(ours) == sorted(theirs) and our_meta == their_meta
    assert all(ours[k].shape == theirs[k].shape and ours[k].dtype == theirs[k].dtype for k in ours)
    their_cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    our_cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    for key, value in our_cfg.items():
        want = their_cfg[key]
        assert (sorted(value) == sorted(want)) if key == "target_modules" else value == want, key
    # PEFT reads it back as the same configuration
    loaded = peft.LoraConfig.from_pretrained(tmp_path / "ours")
    assert (loaded.r, loaded.lora_alpha, loaded.use_rslora, loaded.target_modules) == (
        4, 8, True, {"q_proj", "v_proj", "down_proj"})


@pytest.mark.parametrize("arch, targets, rslora", [("llama", "all-linear", False), ("qwen2", "q_proj,k_proj,o_proj", True),
                                                    ("qwen3", "gate_proj,up_proj", False)])
def test_forward_matches_peft(tmp_path, arch, targets, rslora):
    """Our LoRA forward on our model == PEFT's on transformers, with the same non-zero weights."""
    model, layers = our_model(arch, targets, 8, 16, rslora)
    randomize_b(layers)
    save_adapter(tmp_path, layers, adapter_config(resolve_targets(targets), 8, 16, rslora, 0.0, "x"))
    tokens = token_ids(300, 48, seed=7)
    ours = reference_logits(model.eval(), tokens)
    theirs = peft_logits(fixture(arch, "hf"), tmp_path, tokens)
    with open_base(fixture(arch, "hf")) as b:
        plain = reference_logits(Transformer.from_base(b), tokens)
    assert compare(plain, ours)["mean_kl"] > 1e-3, "the adapter must move the output for the check to mean much"
    m = compare(theirs, ours)
    assert m["mean_kl"] <= 1e-9 and m["top1"] == 1.0, m


def test_init_like_peft_and_base_frozen():
    model, layers = our_model("llama", "all-linear", 8, 16)
    assert len(layers) == 2 * 7
    for name, layer in layers.items():
        fan_in = layer.base_layer.in_features
        a = layer.lora_A.weight
        # kaiming_uniform(a=sqrt(5)) bound is 1/sqrt(fan_in); a uniform draw fills most of it
        assert a.abs().max() <= 1 / math.sqrt(fan_in) and a.abs().max() > 0.9 / math.sqrt(fan_in)
        assert layer.lora_B.weight.eq(0).all() and layer.scale == 2.0
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * len(layers)
    tokens = token_ids(300, 32, seed=8)
    with open_base(fixture("llama", "hf")) as b:
        plain = reference_logits(Transformer.from_base(b), tokens)
    assert np.array_equal(reference_logits(model.eval(), tokens), plain), "B = 0: output unchanged at init"


def test_rslora_scale():
    _, layers = our_model("llama", "q_proj", 16, 32, rslora=True)
    assert all(layer.scale == 32 / 4 for layer in layers.values())


@pytest.mark.parametrize("spec, msg", [("lm_head", "tied head"), ("q_proj,foo", "'foo'"), ("", "empty")])
def test_bad_targets(spec, msg):
    with pytest.raises(Lora2GGUFError, match=msg):
        resolve_targets(spec)


def test_all_linear_is_every_projection_not_the_head():
    assert resolve_targets("all-linear") == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert resolve_targets(" v_proj , q_proj ") == ["q_proj", "v_proj"]
