"""The PyTorch reference model against llama.cpp (llama-cpp-python) and against transformers."""

import numpy as np
import pytest
import torch

from conftest import ARCHS, TEXT, fixture, reference_logits, token_ids
from lora2gguf.weights.base_model import open_base
from lora2gguf.parity.metrics import compare
from lora2gguf.models.layers import Transformer
from lora2gguf.llamacpp.runtime import LlamaRuntime


def load_reference(path, dtype=torch.float32):
    with open_base(path) as b:
        return Transformer.from_base(b, dtype=dtype)


@pytest.mark.parametrize("arch", ARCHS)
def test_reference_matches_llama_cpp_f32(arch):
    model = load_reference(fixture(arch))
    with LlamaRuntime(fixture(arch)) as rt:
        tokens = token_ids(rt.n_vocab, 96, seed=1)
        ours, theirs = reference_logits(model, tokens), rt.logits(tokens)
    assert ours.std(-1).mean() > 1.5, "fixture logits should be peaked for a meaningful check"
    m = compare(theirs, ours)
    print(arch, m)
    assert m["mean_kl"] <= 1e-5 and m["top1"] == 1.0


@pytest.mark.parametrize("arch", ARCHS)
def test_llama_cpp_tokenizes_fixture(arch):
    with LlamaRuntime(fixture(arch), vocab_only=True) as rt:
        toks = rt.tokenize(TEXT)
    assert toks[0] == 1 and len(toks) >= 64
    assert 0 not in toks, "every word of the text is in the fixture vocabulary"


@pytest.mark.parametrize("arch", ARCHS)
def test_gguf_and_hf_reference_identical(arch):
    tokens = token_ids(300, 64, seed=2)
    a = reference_logits(load_reference(fixture(arch)), tokens)
    b = reference_logits(load_reference(fixture(arch, "hf")), tokens)
    assert np.array_equal(a, b)


@pytest.mark.parametrize("arch", ARCHS)
def test_reference_matches_transformers(arch):
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(fixture(arch, "hf"), dtype=torch.float32).eval()
    tokens = token_ids(300, 64, seed=3)
    with torch.no_grad():
        theirs = hf(torch.tensor([tokens])).logits[0].float().numpy()
    m = compare(theirs, reference_logits(load_reference(fixture(arch, "hf")), tokens))
    assert m["mean_kl"] <= 1e-5 and m["top1"] == 1.0, m


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", ["q8_0", "q4_k_m"])
def test_reference_on_quantized_matches_llama_cpp(arch, kind):
    """The dequantized weights are what llama.cpp computes with: the remaining KL is llama.cpp's
    activation quantization (q8 vec-dot), far below the quantization error itself."""
    model = load_reference(fixture(arch, kind))
    f32 = load_reference(fixture(arch))
    with LlamaRuntime(fixture(arch, kind)) as rt:
        tokens = token_ids(rt.n_vocab, 96, seed=4)
        theirs = rt.logits(tokens)
    ours, exact = reference_logits(model, tokens), reference_logits(f32, tokens)
    m, floor = compare(theirs, ours), compare(exact, ours)
    print(arch, kind, "llama.cpp vs reference-on-dequantized", m, "quantization itself", floor)
    # below the quantization error, or at float noise where Q8_0 barely moves a model (Gemma's fixtures: 4e-9)
    assert m["mean_kl"] < max(floor["mean_kl"], 1e-7)


def test_padding_mask_matches_unpadded():
    model = load_reference(fixture("llama"))
    a, b = token_ids(300, 10, seed=5), token_ids(300, 16, seed=6)
    ids = torch.tensor([a + [0] * 6, b])
    mask = torch.tensor([[1] * 10 + [0] * 6, [1] * 16])
    with torch.no_grad():
        padded = model(ids, attention_mask=mask)
    np.testing.assert_allclose(padded[0, :10].numpy(), reference_logits(model, a), atol=1e-4)
    np.testing.assert_allclose(padded[1].numpy(), reference_logits(model, b), atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_close(dtype):
    tokens = token_ids(300, 32, seed=7)
    ref = reference_logits(load_reference(fixture("qwen3")), tokens)
    half = reference_logits(load_reference(fixture("qwen3"), dtype), tokens)
    assert compare(ref, half)["top1"] >= 0.9


@pytest.mark.slow
def test_smollm2_reference_matches_llama_cpp(smollm2_f32):
    model = load_reference(smollm2_f32)
    with LlamaRuntime(smollm2_f32) as rt:
        tokens = rt.tokenize(TEXT * 2)[:128]
        theirs = rt.logits(tokens)
    m = compare(theirs, reference_logits(model, tokens))
    print("smollm2", m)
    assert m["mean_kl"] <= 1e-5 and m["top1"] == 1.0


@pytest.mark.parametrize("qk_norm", [False, True])
def test_training_forms_are_the_reference_math(qk_norm):
    """The autograd functions training uses (RMSNormFunction, RopeQKV with and without qwen3's per-head
    q/k norm, SwiGLU) == autograd through the reference modules' arithmetic: values and gradients in
    float64 (and gradcheck); RMSNorm's and SwiGLU's forward bit for bit with the modules' in float32."""
    import torch.nn.functional as F

    from lora2gguf.models.layers import RMSNorm, rotate_half
    from lora2gguf.training.fused import RMSNormFunction, RopeQKV, SwiGLU

    torch.manual_seed(0)
    B, T, H, Hkv, D = 2, 5, 4, 2, 8

    def norm(dim, dtype=torch.float64):
        n = RMSNorm(dim, 1e-5).to(dtype).requires_grad_(False)
        n.weight.normal_()
        return n

    def rms(x, n):  # RMSNorm.forward's arithmetic in float64 (the module itself computes in fp32)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + n.eps) * n.weight

    n = norm(D)
    x = torch.randn(B, T, D, dtype=torch.float64, requires_grad=True)
    ours, want = RMSNormFunction.apply(x, n.weight, n.eps), rms(x, n)
    torch.testing.assert_close(ours, want)
    gy = torch.randn_like(want)
    torch.testing.assert_close(torch.autograd.grad(ours, x, gy)[0], torch.autograd.grad(want, x, gy)[0])
    assert torch.autograd.gradcheck(lambda x: RMSNormFunction.apply(x, n.weight, n.eps), (x,))
    n32, x32 = norm(64, torch.float32), torch.randn(3, 64)
    assert torch.equal(RMSNormFunction.apply(x32, n32.weight, n32.eps), n32(x32))

    ang = torch.randn(B, 1, T, D // 2, dtype=torch.float64)  # rope angles per position, one head-half
    cos, sin = ang.cos(), ang.sin()
    qn, kn = (norm(D), norm(D)) if qk_norm else (None, None)
    norm_weights = (qn.weight, kn.weight) if qk_norm else (None, None)

    def reference(qkv):  # Attention.forward's arithmetic
        q, k, v = qkv.view(B, T, H + 2 * Hkv, D).split([H, Hkv, Hkv], dim=2)
        if qk_norm:
            q, k = rms(q, qn), rms(k, kn)
        c, s = torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        return q * c + rotate_half(q) * s, k * c + rotate_half(k) * s, v

    def fused(qkv):
        return RopeQKV.apply(qkv, cos, sin, H, Hkv, *norm_weights, 1e-5)

    qkv = torch.randn(B, T, (H + 2 * Hkv) * D, dtype=torch.float64, requires_grad=True)
    ours, want = fused(qkv), reference(qkv)
    for a, b in zip(ours, want):
        assert a.is_contiguous()
        torch.testing.assert_close(a, b)
    gys = [torch.randn_like(t) for t in want]
    torch.testing.assert_close(torch.autograd.grad(ours, qkv, gys)[0], torch.autograd.grad(want, qkv, gys)[0])
    assert torch.autograd.gradcheck(fused, (qkv,))

    h = torch.randn(B, T, 2 * D, dtype=torch.float64, requires_grad=True)
    ours, want = SwiGLU.apply(h), F.silu(h[..., :D]) * h[..., D:]
    torch.testing.assert_close(ours, want)
    gy = torch.randn_like(want)
    torch.testing.assert_close(torch.autograd.grad(ours, h, gy)[0], torch.autograd.grad(want, h, gy)[0])
    assert torch.autograd.gradcheck(SwiGLU.apply, (h,))
    h32 = torch.randn(3, 2 * 64)
    assert torch.equal(SwiGLU.apply(h32), F.silu(h32[:, :64]) * h32[:, 64:])


@pytest.mark.parametrize("arch", ARCHS)
def test_llama_cpp_matches_transformers(arch):
    """The fixture itself, independently of our reference: llama.cpp on the GGUF (norm shifts, q/k row order,
    fused or split tensors as our writer laid them out) == transformers' own class on the HF directory, over
    96 tokens (Gemma's 8-token sliding window is crossed many times)."""
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(fixture(arch, "hf"), dtype=torch.float32).eval()
    with LlamaRuntime(fixture(arch)) as rt:
        tokens = token_ids(rt.n_vocab, 96, seed=9)
        theirs = rt.logits(tokens)
    with torch.no_grad():
        ours = hf(torch.tensor([tokens])).logits[0].float().numpy()
    m = compare(theirs, ours)
    assert ours.std(-1).mean() > 1.5 and m["mean_kl"] <= 1e-5 and m["top1"] == 1.0, m


def test_windowed_layers_see_only_their_window():
    """Gemma 3's local layers: a token further back than the window changes the output only through the global
    layer; with every layer local it cannot change the output at all (the masks, not just the numbers)."""
    import dataclasses

    with open_base(fixture("gemma3")) as b:
        spec = dataclasses.replace(b.spec, swa_layers=tuple(range(b.spec.n_layer)))
        model = Transformer.from_base(b)
        local = Transformer(spec)
        local.load_state_dict(model.state_dict())
    a = token_ids(300, 40, seed=3)
    b2 = [a[0], (a[1] + 1) % 300 or 5] + a[2:]  # differs at position 1 only
    pos = 2 + b.spec.n_layer * (b.spec.sliding_window - 1)  # beyond what stacked windows reach from position 1
    ra, rb = reference_logits(model.eval(), a), reference_logits(model.eval(), b2)
    assert np.abs(ra[pos:] - rb[pos:]).max() > 1e-3, "the global layer sees the whole context"
    la, lb = reference_logits(local.eval(), a), reference_logits(local.eval(), b2)
    assert np.array_equal(la[pos:], lb[pos:]) and np.abs(la[1] - lb[1]).max() > 1e-3


def test_inspect_describes_a_gguf_of_any_architecture(tmp_path, capsys):
    """A GGUF of an architecture no verb supports (a mamba header, written with gguf-py): inspect describes it
    and says which verbs cannot use it; a verb refuses it in one line."""
    import json

    import gguf

    from lora2gguf.cli import main

    path = tmp_path / "mamba.gguf"
    w = gguf.GGUFWriter(str(path), "mamba")
    w.add_block_count(2)
    w.add_embedding_length(64)
    w.add_uint32("mamba.ssm.state_size", 16)
    w.add_tensor("token_embd.weight", np.zeros((10, 64), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file()
    w.close()
    capsys.readouterr()
    assert main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["architecture"] == "mamba" and info["supported"] is False and "cannot use it" in info["verdict"]
    assert info["metadata"]["mamba.ssm.state_size"] == 16 and info["tensor_count"] == 1
    assert main(["merge", "--base", str(path), "--lora", str(tmp_path), "-o", str(tmp_path / "m.gguf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "unsupported architecture 'mamba'" in err


@pytest.mark.slow
def test_gemma3_270m_reference_matches_llama_cpp(gemma3_f32):
    """The real Gemma 3 270M, every tensor dequantized to F32: our reference == llama.cpp over 700 tokens, past
    its 512-token sliding window (measured: mean KL 4.4e-7 at 700 tokens)."""
    model = load_reference(gemma3_f32)
    with LlamaRuntime(gemma3_f32, n_ctx=768) as rt:
        tokens = rt.tokenize((TEXT + " ") * 12)[:700]
        assert len(tokens) == 700
        theirs = rt.logits(tokens)
    ours = reference_logits(model, tokens)
    for part in (slice(0, 512), slice(512, 700)):
        m = compare(theirs[part], ours[part])
        print("gemma3 270m", part, m)
        assert m["mean_kl"] <= 1e-5 and m["top1"] >= 0.99, m
