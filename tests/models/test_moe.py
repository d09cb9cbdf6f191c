"""The mixture-of-experts archs (models/qwen3moe.py, mixtral.py; conftest.MOE_ARCHS) against their two independent
references: transformers' own class (Qwen3MoeForCausalLM, MixtralForCausalLM) on fixtures/<arch>/hf and llama.cpp
(llama-cpp-python) on the GGUF files. A mixture of experts is compared
routing-aware: a near-tie in a router flips one expert choice on a few tokens, so the median per-token KL
(unmoved by those tokens), the mean KL and the share of tokens whose top-k expert set differs in any layer
are reported together (llama.cpp's choices are read from its graph, `ffn_moe_topk-<layer>`)."""

import json

import numpy as np
import pytest
from conftest import fixture, token_ids
from moe_helpers import gguf_arch, llama_run, reference_run, routed, transformers_run

from lora2gguf.errors import Lora2GGUFError
from lora2gguf.parity.reference import reference_logits, reference_model
from lora2gguf.weights.base_model import open_base


def test_llama_cpp_matches_transformers(moe_arch):
    """The fixture itself, independently of our code: llama.cpp on the GGUF == transformers on hf/ (per-expert
    tensors in the checkpoint, stacked *_exps in the GGUF), over 96 tokens."""
    tokens = token_ids(383, 96, seed=9)
    theirs, r_theirs = transformers_run(moe_arch, tokens)
    ours, r_ours = llama_run(fixture(moe_arch), tokens)
    m = routed(theirs, ours, r_theirs, r_ours)
    print("llama.cpp vs transformers", m)
    assert theirs.std(-1).mean() > 1.5, "fixture logits should be peaked for a meaningful check"
    assert len({tuple(r) for r in np.sort(r_theirs[0], -1)}) > 4, "the router should use many expert pairs"
    assert m["median_kl"] <= 1e-6 and m["mean_kl"] <= 1e-5 and m["expert_set_mismatch"] == 0.0, m


# (n_expert, n_expert_used, n_ff_exp, norm_topk_prob, n_ff_shexp) of each fixture: qwen2moe has a shared expert
# and does not renormalise its top-k weights
SPEC = {"qwen3moe": (8, 2, 256, True, 0), "mixtral": (8, 2, 256, True, 0), "qwen2moe": (8, 2, 256, False, 256)}


@pytest.mark.parametrize("kind", ["f32", "hf"])
def test_reference_matches_transformers_and_llama_cpp(moe_arch, kind):
    """parity.reference's two forms (reference_model whole, reference_logits layer by layer) on the GGUF and
    on the HF directory: the same logits, and the same as transformers and llama.cpp, routing included."""
    tokens = token_ids(383, 96, seed=3)
    with open_base(fixture(moe_arch, kind)) as b:
        assert b.spec.arch_module.name == moe_arch
        s = b.spec
        assert (s.n_expert, s.n_expert_used, s.n_ff_exp, s.norm_topk_prob, s.n_ff_shexp) == SPEC[moe_arch]
        ours, r_ours = reference_run(reference_model(b), tokens)
        layered = reference_logits(b, [], [tokens])[0]
    np.testing.assert_array_equal(ours, layered)
    theirs, r_theirs = transformers_run(moe_arch, tokens)
    lc, r_lc = llama_run(fixture(moe_arch), tokens)
    m_hf, m_lc = routed(theirs, ours, r_theirs, r_ours), routed(lc, ours, r_lc, r_ours)
    print(kind, "reference vs transformers", m_hf, "vs llama.cpp", m_lc)
    for m in (m_hf, m_lc):
        assert m["median_kl"] <= 1e-6 and m["mean_kl"] <= 1e-5 and m["expert_set_mismatch"] == 0.0, m


@pytest.mark.parametrize("kind", ["q8_0", "q4_k_m"])
def test_reference_on_quantized_matches_llama_cpp(moe_arch, kind):
    """The dequantized weights are what llama.cpp computes with: the median KL between llama.cpp and the reference
    on them is its activation rounding (q8 vec-dot), no more than the weight quantization's own median KL
    (the exact f32 reference against the dequantized one); on this fixture Q8_0's activation rounding is about
    as large as its weight rounding (qwen3moe: medians 1.5e-3 and 1.7e-3 measured), Q4_K_M's far below (1.5e-3,
    7.5e-2)."""
    tokens = token_ids(383, 96, seed=4)
    with open_base(fixture(moe_arch, kind)) as b:
        ours, r_ours = reference_run(reference_model(b), tokens)
    with open_base(fixture(moe_arch)) as b:
        exact, r_exact = reference_run(reference_model(b), tokens)
    lc, r_lc = llama_run(fixture(moe_arch, kind), tokens)
    m, floor = routed(lc, ours, r_lc, r_ours), routed(exact, ours, r_exact, r_ours)
    print(kind, "llama.cpp vs reference-on-dequantized", m, "quantization itself", floor)
    # top-1 and the mean move with the few tokens whose routing flips on q8-rounded router activations (qwen2moe
    # Q8_0: 4% of the tokens' expert sets, top-1 0.94 measured); the median does not
    assert m["median_kl"] < 1.25 * floor["median_kl"] and m["top1"] >= 0.9, (m, floor)


def test_spec_from_gguf_equals_spec_from_config(moe_arch):
    """The GGUF's metadata, our config.json, the config transformers writes (num_local_experts) and the one our
    hf_config writes all describe the same model."""
    import transformers

    with open_base(fixture(moe_arch)) as g, open_base(fixture(moe_arch, "hf")) as h:
        assert g.spec.to_dict() | {"name": ""} == h.spec.to_dict() | {"name": ""}
        arch = g.spec.arch_module
        saved = transformers.AutoConfig.from_pretrained(fixture(moe_arch, "hf")).to_dict()
        assert moe_arch != "qwen3moe" or "num_local_experts" in saved  # transformers writes both names for qwen3moe
        for cfg in (saved, arch.hf_config(g.spec)):
            assert arch.spec_from_hf(cfg, "config").to_dict() | {"name": ""} == g.spec.to_dict() | {"name": ""}


@pytest.mark.parametrize("arch, change, what", [
    ("qwen3moe", {"norm_topk_prob": False}, "norm_topk_prob is false"),
    ("qwen3moe", {"mlp_only_layers": [1]}, "dense layers"),
    ("qwen3moe", {"decoder_sparse_step": 2}, "dense layers"),
    ("qwen2moe", {"norm_topk_prob": True}, "norm_topk_prob is true"),
    ("qwen2moe", {"mlp_only_layers": [0]}, "dense layers"),
    ("qwen2moe", {"shared_expert_intermediate_size": 0}, "shared_expert_intermediate_size is 0"),
    ("qwen2moe", {"use_sliding_window": True, "sliding_window": 8}, "use_sliding_window is true"),
    ("mixtral", {"sliding_window": 8}, "sliding_window is 8")])
def test_config_llama_cpp_would_compute_differently_is_refused(tmp_path, arch, change, what):
    """llama.cpp's qwen3moe renormalises the top-k weights whatever the file says, its qwen2moe never does, neither
    has dense layers, and neither qwen2moe nor llama (Mixtral) has a sliding window; transformers follows config.json."""
    import shutil

    d = tmp_path / "hf"
    shutil.copytree(fixture(arch, "hf"), d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(cfg | change))
    with pytest.raises(Lora2GGUFError, match=what) as e:
        open_base(d)
    assert "\n" not in str(e.value)


# one expert's up projection in each arch's checkpoint names
EXPERT_5_UP = {"qwen3moe": "model.layers.1.mlp.experts.5.up_proj.weight",
               "mixtral": "model.layers.1.block_sparse_moe.experts.5.w3.weight",
               "qwen2moe": "model.layers.1.mlp.experts.5.up_proj.weight"}


def test_checkpoint_missing_an_expert_is_refused(tmp_path, moe_arch):
    import re

    from safetensors.numpy import load_file, save_file

    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text((fixture(moe_arch, "hf") / "config.json").read_text())
    w = load_file(str(fixture(moe_arch, "hf") / "model.safetensors"))
    del w[EXPERT_5_UP[moe_arch]]
    save_file(w, str(d / "model.safetensors"))
    with pytest.raises(Lora2GGUFError, match=re.escape(EXPERT_5_UP[moe_arch]) + " is missing") as e:
        open_base(d)
    assert "\n" not in str(e.value)


def test_inspect_describes_the_base(capsys, moe_arch):
    from lora2gguf.cli import main

    assert main(["inspect", str(fixture(moe_arch)), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["architecture"] == gguf_arch(moe_arch) and info["supported"] is True
    spec = info["spec"]
    assert (spec["n_expert"], spec["n_expert_used"], spec["n_ff_exp"], spec["norm_topk_prob"],
            spec["n_ff_shexp"]) == SPEC[moe_arch]


def test_a_llama_file_with_experts_is_mixtral_and_one_without_stays_llama(tmp_path):
    """registry.MOE_FORMS, the one rule: a "llama" GGUF is Mixtral when it declares or holds experts. An attention-only
    Mixtral LoRA (no expert tensors: a plain llama adapter by its header) still loads against the Mixtral base, and
    a llama file with expert tensors but no llama.expert_count is refused in one line."""
    import gguf

    from lora2gguf import models
    from lora2gguf.adapters.gguf_lora import load_gguf_lora
    from lora2gguf.commands.convert import convert
    from lora2gguf.fileio.gguf_read import GGUFFile
    from peft_helpers import make_peft_adapter

    with GGUFFile(fixture("mixtral")) as f, GGUFFile(fixture("llama")) as g:
        assert f.string("general.architecture") == g.string("general.architecture") == "llama"
        assert models.for_gguf(f).name == "mixtral" and models.for_gguf(g).name == "llama"
    d = make_peft_adapter(fixture("mixtral", "hf"), tmp_path / "a", r=2, lora_alpha=4, target_modules=["q_proj"])
    lora = convert(d, fixture("mixtral"), tmp_path / "a.gguf")
    with GGUFFile(lora) as f:
        assert f.string("general.architecture") == "llama" and models.for_gguf(f).name == "llama"
    with open_base(fixture("mixtral")) as b:
        back = load_gguf_lora(lora, b.spec)
    assert set(back.modules) == {"model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"}

    bad = tmp_path / "no-count.gguf"  # the mixtral fixture's tensors, without llama.expert_count
    with GGUFFile(fixture("mixtral")) as f:
        w = gguf.GGUFWriter(str(bad), "llama")
        for key in ("block_count", "embedding_length", "feed_forward_length", "attention.head_count",
                    "attention.head_count_kv", "attention.layer_norm_rms_epsilon", "expert_used_count"):
            v = f.get(f"llama.{key}")
            (w.add_float32 if isinstance(v, float) else w.add_uint32)(f"llama.{key}", v)
        for name in f.tensors:
            w.add_tensor(name, f.tensor(name))
        w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(Lora2GGUFError, match="llama.expert_count is missing; a mixtral model needs it") as e:
        open_base(bad)
    assert "\n" not in str(e.value)


def test_what_transformers_save_pretrained_writes_reads_back_equal(tmp_path, moe_arch):
    """transformers 5 holds the experts fused (gate_up_proj) and Mixtral's router as mlp.gate, but its
    save_pretrained writes the Hub's per-expert names (Mixtral: block_sparse_moe.*): read back, the same tensors."""
    import torch
    import transformers
    from safetensors import safe_open

    model = transformers.AutoModelForCausalLM.from_pretrained(fixture(moe_arch, "hf"), dtype=torch.float32)
    model.save_pretrained(tmp_path / "saved")
    with safe_open(str(tmp_path / "saved" / "model.safetensors"), "pt") as f:
        assert not any("gate_up_proj" in k for k in f.keys())
    with open_base(tmp_path / "saved") as b, open_base(fixture(moe_arch, "hf")) as c:
        assert b.hf_names() == c.hf_names()
        for n in c.hf_names():
            np.testing.assert_array_equal(b.tensor(n), c.tensor(n))
