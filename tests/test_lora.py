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


def test_dropout_lora_is_peft_math_with_a_saved_mask():
    """Training-mode LoRA (custom autograd, boolean mask) == lora_B(lora_A(dropout(x)))·scale with the same
    mask, values and gradients; gradcheck in float64."""
    import torch.nn.functional as F

    from lora2gguf.lora import DropoutLoRA

    torch.manual_seed(0)
    x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    A = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)
    B = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    keep = torch.rand(2, 5, 12) >= 0.3
    ours = DropoutLoRA.apply(x, A, B, keep, 2.0 / 0.7)
    peft_math = F.linear(F.linear(x * keep / 0.7, A), B) * 2.0  # nn.Dropout scales kept inputs by 1/(1-p)
    torch.testing.assert_close(ours, peft_math)
    gy = torch.randn_like(ours)
    for a, b in zip(torch.autograd.grad(ours, (x, A, B), gy), torch.autograd.grad(peft_math, (x, A, B), gy)):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(lambda x, A, B: DropoutLoRA.apply(x, A, B, keep, 2.0 / 0.7), (x, A, B))


def test_lora_dropout_rate_and_eval_mode():
    model, layers = our_model("llama", "q_proj", 8, 16, dropout=0.25)
    layer = next(iter(layers.values()))
    randomize_b(layers)
    x = torch.randn(4, 64, 64)
    with torch.no_grad():
        layer.eval()
        clean = layer(x) - layer.base_layer(x)
    layer.train()
    with torch.enable_grad():
        noisy = layer(x) - layer.base_layer(x)
    assert not torch.allclose(clean, noisy), "dropout is on in training"
    torch.manual_seed(3)
    keep = (torch.rand(x.shape) >= 0.25).float().mean().item()
    assert abs(keep - 0.75) < 0.01
    torch.manual_seed(3)
    noisy = layer(x) - layer.base_layer(x)  # the same mask as drawn above: check against it
    mask = torch.rand(x.shape, generator=torch.Generator().manual_seed(3)) >= 0.25
    want = layer.lora_B(layer.lora_A(x * mask / 0.75)) * layer.scale
    torch.testing.assert_close(noisy, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_training_loss_equals_cross_entropy_of_the_model_logits(arch):
    """LossModel (hidden states, then the head on trained rows a chunk at a time, gradient computed in
    forward) == cross-entropy of Transformer.forward's logits: value and LoRA gradients, padded or not."""
    import torch.nn.functional as F

    from lora2gguf.lora import LossModel, lora_parameters

    model, layers = our_model(arch, "all-linear", 8, 16)
    randomize_b(layers)
    model.train()
    ids = torch.randint(3, 300, (3, 40), generator=torch.Generator().manual_seed(0))
    targets = torch.randint(3, 300, (3, 40), generator=torch.Generator().manual_seed(1))
    targets[:, :7] = -100
    mask = torch.ones(3, 40, dtype=torch.long)
    mask[1, 30:], targets[1, 30:] = 0, -100
    params = lora_parameters(layers)
    for attention_mask in (None, mask):
        want = F.cross_entropy(model(ids, attention_mask).flatten(0, 1), targets.flatten(), reduction="sum")
        want_grads = torch.autograd.grad(want, params)
        for chunk in (1024, 7):
            got = LossModel(model, chunk)(ids, attention_mask, targets)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
            for g, w in zip(torch.autograd.grad(got, params), want_grads):
                torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6 * w.abs().max().item())


def test_gguf_f32_tensors_used_in_place_and_model_unchanged():
    """load_base_model maps F32 GGUF tensors instead of copying them; same model as Transformer.from_base."""
    from lora2gguf.lora import load_base_model

    tokens = token_ids(300, 32, seed=9)
    name = "model.layers.0.mlp.up_proj.weight"
    for kind in ("f32", "q8_0"):
        with open_base(fixture("llama", kind)) as b:
            ours = load_base_model(b, torch.float32, torch.device("cpu"))
            ref = Transformer.from_base(b)
            file_addr = b.file.raw(b.gguf_name(name)).ctypes.data
        assert np.array_equal(reference_logits(ours, tokens), reference_logits(ref, tokens))
        in_place = ours.get_parameter(name).data_ptr() == file_addr
        assert in_place == (kind == "f32"), "F32 is used in place; quantized tensors are dequantized"
