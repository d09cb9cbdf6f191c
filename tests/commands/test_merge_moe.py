"""merge on the mixture-of-experts archs (conftest.MOE_ARCHS): expert LoRA (PEFT target_parameters, made by the real
peft) baked into the stacked *_exps tensors, expert by expert. The merged file in llama.cpp against
transformers + PEFT, routing-aware; quantized outputs are llama.cpp's own quantizer's (a 3-D tensor quantized
per expert slice, as llama-quant.cpp does): byte-identical to llama-quantize of our F32 merge, and to the
intermediate-file path from a quantized base."""

import gguf
import pytest
from conftest import fixture, token_ids
from moe_helpers import llama_run, routed, transformers_run
from peft_helpers import make_peft_adapter

from lora2gguf.commands.merge import merge
from lora2gguf.fileio.gguf_read import GGUFFile
from lora2gguf.llamacpp.quantize import llama_quantize
from lora2gguf.parity.metrics import compare

TOKENS = token_ids(383, 64, seed=11)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, moe_arch):
    """Attention and both expert parameters (gate_up fused, down) of every layer."""
    return make_peft_adapter(fixture(moe_arch, "hf"), tmp_path_factory.mktemp("experts") / "a", r=4, lora_alpha=16,
                             b_std=0.2, target_modules=["q_proj", "o_proj"],
                             target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])


@pytest.fixture(scope="module")
def merged_f32(tmp_path_factory, moe_arch, adapter):
    return merge(fixture(moe_arch), [(adapter, 1.0)], tmp_path_factory.mktemp("m") / "m-f32.gguf", quant="f32")


def test_merged_expert_lora_matches_transformers_peft(moe_arch, adapter, merged_f32):
    base, _ = llama_run(fixture(moe_arch), TOKENS)
    ours, r_ours = llama_run(merged_f32, TOKENS)
    theirs, r_theirs = transformers_run(moe_arch, TOKENS, adapter_dir=adapter)
    moved, m = compare(base, ours), routed(theirs, ours, r_theirs, r_ours)
    print("merged: moved", moved["mean_kl"], "llama.cpp on the merged file vs transformers+PEFT", m)
    assert moved["mean_kl"] > 1e-2, "the adapter must visibly change the output"
    assert m["median_kl"] <= 1e-6 and m["mean_kl"] <= 1e-5 and m["expert_set_mismatch"] == 0.0, m


@pytest.mark.parametrize("quant", ["q8_0", "q4_k_m"])
def test_quantized_merge_is_llama_quantize_of_the_f32_merge(tmp_path, moe_arch, adapter, merged_f32, quant):
    ours = merge(fixture(moe_arch), [(adapter, 1.0)], tmp_path / f"m-{quant}.gguf", quant=quant)
    theirs = tmp_path / f"lq-{quant}.gguf"
    llama_quantize(merged_f32, theirs, getattr(gguf.LlamaFileType, "MOSTLY_" + quant.upper()))
    assert ours.read_bytes() == theirs.read_bytes()
    with GGUFFile(ours) as f:
        t = f.tensors["blk.0.ffn_down_exps.weight"]
        assert t.shape == (8, 64, 256) and t.type == (gguf.GGMLQuantizationType.Q4_K if quant == "q4_k_m"
                                                        else gguf.GGMLQuantizationType.Q8_0)


def test_merge_into_a_quantized_base_equals_the_intermediate_path(tmp_path, moe_arch, adapter):
    """From a Q4_K_M base (experts in Q4_K / Q6_K / Q5_0): streamed expert by expert == the intermediate file
    quantized by llama.cpp in a child process; and the merged model carries the adapter: far closer to
    transformers + PEFT than the base is."""
    a = merge(fixture(moe_arch, "q4_k_m"), [(adapter, 1.0)], tmp_path / "a.gguf", quant="q4_k_m")
    b = merge(fixture(moe_arch, "q4_k_m"), [(adapter, 1.0)], tmp_path / "b.gguf", quant="q4_k_m", intermediate=True)
    assert a.read_bytes() == b.read_bytes()
    theirs, _ = transformers_run(moe_arch, TOKENS, adapter_dir=adapter)
    base, _ = llama_run(fixture(moe_arch, "q4_k_m"), TOKENS)
    ours, _ = llama_run(a, TOKENS)
    m, without = compare(theirs, ours), compare(theirs, base)
    print("q4_k_m base + merge vs transformers+PEFT", m, "base alone", without)
    assert m["mean_kl"] < 0.25 * without["mean_kl"] and m["top1"] > without["top1"]


def test_shared_expert_lora_merges(tmp_path):
    """qwen2moe's shared expert and its gate merged: F32 == transformers + PEFT; from the Q4_K_M base, whose
    ffn_gate_inp_shexp llama-quantize stores as a vector, streamed == the intermediate-file path."""
    d = make_peft_adapter(fixture("qwen2moe", "hf"), tmp_path / "a", r=4, lora_alpha=8, b_std=0.2,
                          target_modules=["shared_expert.gate_proj", "shared_expert.up_proj",
                                          "shared_expert.down_proj", "shared_expert_gate"])
    f32 = merge(fixture("qwen2moe"), [(d, 1.0)], tmp_path / "m.gguf", quant="f32")
    base, _ = llama_run(fixture("qwen2moe"), TOKENS)
    ours, r_ours = llama_run(f32, TOKENS)
    theirs, r_theirs = transformers_run("qwen2moe", TOKENS, adapter_dir=d)
    moved, m = compare(base, ours), routed(theirs, ours, r_theirs, r_ours)
    assert moved["mean_kl"] > 1e-2, "the adapter must visibly change the output"
    assert m["median_kl"] <= 1e-6 and m["mean_kl"] <= 1e-5 and m["expert_set_mismatch"] == 0.0, m
    with GGUFFile(fixture("qwen2moe", "q4_k_m")) as f:
        assert f.tensors["blk.0.ffn_gate_inp_shexp.weight"].shape == (64,)
    a = merge(fixture("qwen2moe", "q4_k_m"), [(d, 1.0)], tmp_path / "a.gguf", quant="q4_k_m")
    b = merge(fixture("qwen2moe", "q4_k_m"), [(d, 1.0)], tmp_path / "b.gguf", quant="q4_k_m", intermediate=True)
    assert a.read_bytes() == b.read_bytes()


def test_per_expert_adapter_merges(tmp_path, moe_arch):
    """A transformers-4-style adapter (one LoRA per expert module, experts 0, 2 and 5 only) merged into F32 ==
    transformers 5 + peft on the same adapter with zero pairs on the other experts (peft converts it itself; for
    qwen2moe, which it does not convert, the same pairs as peft's fused-expert adapter)."""
    from test_convert_moe import as_param_wrappers, t4_adapter

    d = t4_adapter(moe_arch, tmp_path / "a", (0, 2, 5))
    ref = (as_param_wrappers(moe_arch, d, tmp_path / "ref") if moe_arch == "qwen2moe"
           else t4_adapter(moe_arch, tmp_path / "ref", (0, 2, 5), (1, 3, 4, 6, 7)))
    merged = merge(fixture(moe_arch), [(d, 1.0)], tmp_path / "m.gguf", quant="f32")
    base, _ = llama_run(fixture(moe_arch), TOKENS)
    ours, r_ours = llama_run(merged, TOKENS)
    theirs, r_theirs = transformers_run(moe_arch, TOKENS, adapter_dir=ref)
    moved, m = compare(base, ours), routed(theirs, ours, r_theirs, r_ours)
    assert moved["mean_kl"] > 1e-2, "the adapter must visibly change the output"
    assert m["median_kl"] <= 1e-6 and m["mean_kl"] <= 1e-5 and m["expert_set_mismatch"] == 0.0, m
