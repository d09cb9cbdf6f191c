"""Trainable LoRA layers against the real PEFT library: the saved files, the forward math, the init."""

import json
import math
import warnings

import numpy as np
import pytest
import torch
from safetensors import safe_open

from conftest import ARCHS, fixture, reference_logits, token_ids
from lora2gguf.weights.base_model import open_base
from lora2gguf.errors import Lora2GGUFError
from lora2gguf.adapters.peft import lora_config, write_peft_files
from lora2gguf.training.lora import inject_lora, resolve_targets, to_adapter
from lora2gguf.parity.metrics import compare
from lora2gguf.models.layers import Transformer
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


def save_adapter(d, layers, config):
    """What a training run saves: its LoRA handed over to PEFT's writer."""
    d.mkdir(parents=True, exist_ok=True)
    write_peft_files(d, to_adapter(layers, d, config), config)


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
    save_adapter(tmp_path / "ours", layers, lora_config(4, 8, resolve_targets("q_proj,v_proj,down_proj"), str(hf),
                                                        use_rslora=True, dropout=0.05))

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
                                                    ("qwen3", "gate_proj,up_proj", False), ("gemma3", "all-linear", True),
                                                    ("gemma2", "q_proj,down_proj", False), ("phi3", "all-linear", True)])
def test_forward_matches_peft(tmp_path, arch, targets, rslora):
    """Our LoRA forward on our model == PEFT's on transformers, with the same non-zero weights."""
    model, layers = our_model(arch, targets, 8, 16, rslora)
    randomize_b(layers)
    save_adapter(tmp_path, layers, lora_config(8, 16, resolve_targets(targets), "x", use_rslora=rslora))
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
    from lora2gguf import models

    assert resolve_targets("all-linear", models.get("llama")) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert resolve_targets("all-linear", models.get("phi3")) == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]
    assert resolve_targets(" v_proj , q_proj ") == ["q_proj", "v_proj"]
    with pytest.raises(Lora2GGUFError, match="'q_proj' of phi3"):
        resolve_targets("q_proj", models.get("phi3"))


def test_lora_projection_is_peft_math():
    """Training-mode LoRA (one GEMM on the concatenated frozen weights of projections that read the same
    input, each LoRA with its own dropout positions, the residual and bias added) == PEFT's
    base(x) + lora_B(lora_A(dropout(x)))·scale per projection with the same masks: values and gradients,
    gradcheck in float64; and without dropout or residual."""
    import torch.nn.functional as F

    from lora2gguf.training.lora import LoRAProjection

    torch.manual_seed(0)
    f64 = dict(dtype=torch.float64)
    x = torch.randn(2, 5, 12, **f64, requires_grad=True)
    res = torch.randn(2, 5, 10, **f64, requires_grad=True)
    W1, W2, bias = torch.randn(7, 12, **f64), torch.randn(3, 12, **f64), torch.randn(10, **f64)
    A1, A2 = (torch.randn(4, 12, **f64, requires_grad=True) for _ in range(2))
    B1, B2 = torch.randn(7, 4, **f64, requires_grad=True), torch.randn(3, 4, **f64, requires_grad=True)
    keep1, keep2 = torch.rand(2, 5, 12) >= 0.3, torch.rand(2, 5, 12) >= 0.3
    drops = tuple((~k).flatten().nonzero()[:, 0] for k in (keep1, keep2))
    W = torch.cat([W1, W2])

    def ours(x, res, A1, B1, A2, B2):
        return LoRAProjection.apply(x, W, bias, res, ((0, 7, 2.0 / 0.7), (7, 10, 1.5 / 0.7)), drops, A1, B1, A2, B2)

    def peft_math(x, res, A1, B1, A2, B2):  # nn.Dropout scales kept inputs by 1/(1-p)
        return res + torch.cat([F.linear(x, W1, bias[:7]) + F.linear(F.linear(x * keep1 / 0.7, A1), B1) * 2.0,
                                F.linear(x, W2, bias[7:]) + F.linear(F.linear(x * keep2 / 0.7, A2), B2) * 1.5], -1)

    args = (x, res, A1, B1, A2, B2)
    got, want = ours(*args), peft_math(*args)
    torch.testing.assert_close(got, want)
    gy = torch.randn_like(got)
    for a, b in zip(torch.autograd.grad(got, args, gy), torch.autograd.grad(want, args, gy)):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(ours, args)

    def plain(x, A1, B1):  # one projection, no dropout, no residual or bias
        return LoRAProjection.apply(x, W1, None, None, ((0, 7, 2.0),), (None,), A1, B1)
    torch.testing.assert_close(plain(x, A1, B1), F.linear(x, W1) + F.linear(F.linear(x, A1), B1) * 2.0)
    assert torch.autograd.gradcheck(plain, (x, A1, B1))


def test_dropped_positions_are_independent_bernoulli():
    """Dropout positions drawn as geometric gaps: every position dropped with probability p, independently
    of the others (rate, per-position spread and neighbour correlation of 400 draws)."""
    from lora2gguf.training.lora import dropped_positions

    torch.manual_seed(0)
    n, draws = 5000, 400
    for p in (0.05, 0.5):
        counts, pairs = torch.zeros(n), 0.0
        for _ in range(draws):
            idx = dropped_positions(n, p)
            assert idx.dtype == torch.int64 and bool((idx[1:] > idx[:-1]).all()) and 0 <= idx.min() and idx.max() < n
            m = torch.zeros(n)
            m[idx] = 1
            counts += m
            pairs += (m[1:] * m[:-1]).mean().item()
        rate = counts.sum().item() / (n * draws)
        assert abs(rate - p) < 4 * math.sqrt(p * (1 - p) / (n * draws)), (p, rate)
        assert 0.85 < counts.var().item() / (draws * p * (1 - p)) < 1.15, "per-position counts are binomial"
        assert abs(pairs / draws - p * p) < 0.1 * p * p, "neighbours drop independently"
    assert dropped_positions(1, 0.5).numel() in (0, 1)


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
    from lora2gguf.training.lora import dropped_positions

    torch.manual_seed(3)
    keep = torch.ones(x.numel(), dtype=torch.bool)
    keep[dropped_positions(x.numel(), 0.25)] = False
    assert abs(keep.float().mean().item() - 0.75) < 0.01
    torch.manual_seed(3)
    noisy = layer(x) - layer.base_layer(x)  # the same positions as drawn above: check against them
    want = layer.lora_B(layer.lora_A(x * keep.view(x.shape) / 0.75)) * layer.scale
    torch.testing.assert_close(noisy, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_training_loss_equals_cross_entropy_of_the_model_logits(arch):
    """The training loss == cross-entropy of the reference forward's logits (model.py's layers, PEFT's LoRA
    formula, autograd throughout): value and LoRA gradients, within fp32 tolerance, unpadded and left-padded
    (positions shift, attention masked). Both training forms: LoRALinear in the model's own layers, and
    the fused TrainingLayer (q/k/v and gate/up as one GEMM each, custom autograd functions); and the head
    applied a chunk of rows at a time."""
    import torch.nn.functional as F

    from lora2gguf.training.fused import TrainingLayer, fuse_for_training
    from lora2gguf.training.loss import LossModel
    from lora2gguf.training.lora import lora_parameters

    model, layers = our_model(arch, "all-linear", 8, 16)
    randomize_b(layers)
    ids = torch.randint(3, 300, (3, 40), generator=torch.Generator().manual_seed(0))
    targets = torch.randint(3, 300, (3, 40), generator=torch.Generator().manual_seed(1))
    targets[:, :7] = -100
    mask = torch.ones(3, 40, dtype=torch.long)
    mask[1, :12], targets[1, :12] = 0, -100
    params = lora_parameters(layers)
    want = {}
    model.eval()  # dropout is 0: eval's LoRA formula is the training math, through autograd
    for attention_mask in (None, mask):
        loss = F.cross_entropy(model(ids, attention_mask).flatten(0, 1), targets.flatten(), reduction="sum")
        want[attention_mask is None] = loss, torch.autograd.grad(loss, params)
    model.train()
    for fused in (False, True):
        if fused:  # only archs whose layer is the fused form's (pre-norm SwiGLU, full rope) fuse; Gemma does not
            spec = model.spec  # phi3's fixture rotates half of each head: the fused form needs full rope
            if not fuse_for_training(model):
                assert not (spec.arch_module.fused_training and spec.n_rot == spec.head_dim)
                continue
            assert all(type(layer) is TrainingLayer for layer in model.model.layers)
        for attention_mask in (None, mask):
            loss, grads = want[attention_mask is None]
            for chunk in (1024, 7):
                got = LossModel(model, chunk)(ids, attention_mask, targets)
                torch.testing.assert_close(got, loss, rtol=1e-5, atol=0)
                for g, w in zip(torch.autograd.grad(got, params), grads):  # fp32 summation-order noise
                    torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5 * w.abs().max().item())
                    assert (g - w).norm() <= 1e-5 * w.norm()


def test_fused_weights_are_views_and_the_model_computes_the_same():
    """fuse_for_training concatenates q/k/v and gate/up without duplicating them: each module's weight is a
    view of its group's block, and gate/up, stored next to each other in the GGUF, stay in the mapped file
    (no copy at all). The fused model's forward (eval) equals the reference; layers without LoRA too."""
    from lora2gguf.training.fused import fuse_for_training
    from lora2gguf.weights.frozen import load_base_model

    tokens = token_ids(300, 32, seed=9)
    with open_base(fixture("llama")) as b:
        model = load_base_model(b, torch.float32, torch.device("cpu"))
        ref = reference_logits(Transformer.from_base(b), tokens)
        gate_addr = b.file.raw(b.gguf_name("model.layers.0.mlp.gate_proj.weight")).ctypes.data
    inject_lora(model, "q_proj,v_proj,down_proj", 4, 8, layers=[1])
    fuse_for_training(model)
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for group, mods in ((layer.qkv, (attn.q_proj, attn.k_proj, attn.v_proj)), (layer.gate_up, (mlp.gate_proj, mlp.up_proj))):
            block, row = group.weight, 0
            for m in mods:
                w = getattr(m, "base_layer", m).weight
                assert w.data_ptr() == block[row:].data_ptr() and w.untyped_storage().data_ptr() == block.untyped_storage().data_ptr()
                row += w.shape[0]
            assert row == block.shape[0]
    assert model.model.layers[0].gate_up.weight.data_ptr() == gate_addr, "gate/up fused in place in the mapped file"
    np.testing.assert_allclose(reference_logits(model.eval(), tokens), ref, rtol=1e-4, atol=1e-4)


def test_gguf_f32_tensors_used_in_place_and_model_unchanged():
    """load_base_model maps F32 GGUF tensors instead of copying them; same model as Transformer.from_base."""
    from lora2gguf.weights.frozen import load_base_model

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
