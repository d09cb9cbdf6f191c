"""adapter_gguf_write: activated LoRA (aLoRA). The adapter is made by the real peft library
(LoraConfig(alora_invocation_tokens=...)); the GGUF is read by llama.cpp itself through llama-cpp-python.

llama-cpp-python ships no llama-server, which is what switches an aLoRA on after its invocation tokens
(tools/server/server-context.cpp: it finds the last occurrence of the tokens in the prompt, evaluates the
tokens before it with the adapter's scale set to 0, then the rest with the adapter). Here llama.cpp's C API
does the same steps: it reads the invocation tokens from our file (llama_adapter_get_alora_*), and the
prompt is evaluated in two parts on one KV cache, without then with the adapter."""

import ctypes

import numpy as np
import pytest

from conftest import fixture, token_ids
from lora2gguf.commands.convert import convert
from lora2gguf.errors import Lora2GGUFError
from lora2gguf.commands.merge import merge
from lora2gguf.parity.metrics import compare
from lora2gguf.llamacpp.runtime import LlamaRuntime
from peft_helpers import make_peft_adapter, peft_logits

INVOCATION = [17, 23, 5]  # three ids of the tiny vocabulary: a "<|assistant|>"-like marker
START = 40  # where the marker sits in the prompt


def split_eval(rt: LlamaRuntime, gguf, tokens, start: int) -> np.ndarray:
    """Logits of `tokens` with the adapter off for tokens[:start] and on from `start`, on one KV cache."""
    rt.set_adapters([])
    rt.llm.eval(list(tokens[:start]))
    rt.set_adapters([(gguf, 1.0)])  # resets llama-cpp-python's token count, not llama.cpp's KV cache
    rt.llm.n_tokens = start  # continue after the cached prefix
    rt.llm.eval(list(tokens[start:]))
    out = np.array(rt.llm.scores[: len(tokens)], dtype=np.float32)
    rt.set_adapters([])
    return out


@pytest.fixture(scope="module")
def alora(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("alora")
    peft_dir = make_peft_adapter(fixture("llama", "hf"), tmp / "a", seed=71, b_std=0.08, r=4, lora_alpha=8,
                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
                                 alora_invocation_tokens=INVOCATION, task_type="CAUSAL_LM")
    return peft_dir, convert(peft_dir, fixture("llama"), tmp / "a.gguf")


def test_invocation_tokens_written_as_uint32_and_read_by_llama_cpp(alora):
    from gguf import GGUFReader, GGUFValueType

    _, gguf = alora
    field = GGUFReader(gguf).fields["adapter.alora.invocation_tokens"]
    assert field.types == [GGUFValueType.ARRAY, GGUFValueType.UINT32]
    assert [int(field.parts[i][0]) for i in field.data] == INVOCATION
    with LlamaRuntime(fixture("llama")) as rt:
        rt.set_adapters([(gguf, 1.0)])
        lc = rt._lc
        ptr = next(iter(rt._adapters.values()))
        n = lc.llama_adapter_get_alora_n_invocation_tokens(ptr)
        toks = lc.llama_adapter_get_alora_invocation_tokens(ptr)
        assert [toks[i] for i in range(n)] == INVOCATION
    from lora2gguf.commands.inspect import describe

    assert describe(str(gguf))["alora_invocation_tokens"] == INVOCATION
    assert describe(str(alora[0]))["alora_invocation_tokens"] == INVOCATION


def test_activation_after_invocation_matches_peft(alora):
    """PEFT's aLoRA adapts the positions from the start of the last invocation sequence on
    (peft.tuners.lora.variants.calculate_alora_offsets); llama.cpp evaluated that way matches it, the
    positions before the marker are the base's, and the ones after it change."""
    peft_dir, gguf = alora
    tokens = token_ids(383, 64, seed=71)
    tokens[START:START + len(INVOCATION)] = INVOCATION
    theirs = peft_logits(fixture("llama", "hf"), peft_dir, tokens)
    with LlamaRuntime(fixture("llama")) as rt:
        base = rt.logits(tokens)
        ours = split_eval(rt, gguf, tokens, START)
        server = split_eval(rt, gguf, tokens, START - 1)  # llama-server's boundary: see the print
    m = compare(theirs, ours)
    assert m["mean_kl"] <= 1e-5 and m["top1"] == 1.0, m
    assert np.array_equal(ours[:START], base[:START])
    assert compare(base[START:], ours[START:])["mean_kl"] > 1e-2, "the adapter must act after the marker"
    # llama-server stops the adapter-free batch at alora_invocation_start - 1, so it adapts one token more
    print("PEFT boundary", m, "llama-server boundary", compare(theirs, server))


def test_without_invocation_peft_is_the_base(alora):
    """The check above is not vacuous: without the marker PEFT leaves the base alone."""
    peft_dir, _ = alora
    tokens = [t if t not in INVOCATION else 30 for t in token_ids(383, 48, seed=72)]
    with LlamaRuntime(fixture("llama")) as rt:
        base = rt.logits(tokens)
    assert compare(base, peft_logits(fixture("llama", "hf"), peft_dir, tokens))["mean_kl"] <= 1e-5


def test_merge_refuses_alora(alora, tmp_path):
    peft_dir, gguf = alora
    for src in (peft_dir, gguf):
        with pytest.raises(Lora2GGUFError, match="activated LoRA"):
            merge(fixture("llama"), [(src, 1.0)], tmp_path / "m.gguf", quant="f32")


def test_export_keeps_alora(alora, tmp_path):
    """GGUF aLoRA → PEFT directory: the invocation tokens come back and PEFT activates it the same way."""
    import json

    from lora2gguf.commands.export import export

    peft_dir, gguf = alora
    out = export(gguf, fixture("llama"), tmp_path / "e")
    assert json.loads((out / "adapter_config.json").read_text())["alora_invocation_tokens"] == INVOCATION
    tokens = token_ids(383, 64, seed=73)
    tokens[START:START + len(INVOCATION)] = INVOCATION
    m = compare(peft_logits(fixture("llama", "hf"), peft_dir, tokens), peft_logits(fixture("llama", "hf"), out, tokens))
    assert m["mean_kl"] <= 1e-8 and m["top1"] == 1.0, m
