"""The PyTorch reference model against llama.cpp (llama-cpp-python) and against transformers."""

import numpy as np
import pytest
import torch

from conftest import ARCHS, TEXT, fixture, reference_logits, token_ids
from lora2gguf.base import open_base
from lora2gguf.metrics import compare
from lora2gguf.model import Transformer
from lora2gguf.runtime import LlamaRuntime


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
    assert m["mean_kl"] < floor["mean_kl"]


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
