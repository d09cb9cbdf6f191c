"""The reference with adapters (PEFT's math, folded in float64) against transformers + the real PEFT; its head
applied a block of positions at a time (HeadBlocks)."""

import numpy as np
import pytest

from conftest import fixture, reference_logits, token_ids
from lora2gguf.adapters.peft import load_peft
from lora2gguf.weights.base_model import open_base
from lora2gguf.parity.metrics import compare
from lora2gguf.parity.reference import reference_model
from peft_helpers import make_peft_adapter, peft_logits

CASES = {
    "plain-embed-head-save": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "embed_tokens",
                                                                                 "lm_head"], modules_to_save=["model.norm"])),
    "dora": ("qwen2", dict(r=4, lora_alpha=8, target_modules=["v_proj", "down_proj"], use_dora=True)),
    "lora-bias": ("qwen3", dict(r=4, lora_alpha=8, target_modules=["v_proj", "o_proj"], lora_bias=True)),
    "rslora-patterns": ("llama", dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"],
                                      use_rslora=True, rank_pattern={"v_proj": 4, "layers.1.self_attn.q_proj": 2},
                                      alpha_pattern={"up_proj": 3})),
}


@pytest.mark.parametrize("case", CASES)
def test_reference_matches_peft(case, tmp_path):
    arch, kw = CASES[case]
    adapter_dir = make_peft_adapter(fixture(arch, "hf"), tmp_path / "a", seed=3, **kw)
    tokens = token_ids(383, 64, seed=9)
    theirs = peft_logits(fixture(arch, "hf"), adapter_dir, tokens)
    with open_base(fixture(arch)) as base:
        ours = reference_logits(reference_model(base, [(load_peft(adapter_dir), 1.0)]), tokens)
        plain = reference_logits(reference_model(base), tokens)
    m = compare(theirs, ours)
    assert m["mean_kl"] <= 1e-6 and m["top1"] == 1.0, m
    assert compare(plain, ours)["mean_kl"] > 1e-2, "the adapter must visibly change the output"


LAYERWISE_CASES = dict(CASES, **{"tied-embedding": ("gemma3", dict(r=4, lora_alpha=8,
                                                                   target_modules=["embed_tokens", "q_proj"]))})


@pytest.mark.parametrize("case", LAYERWISE_CASES)
def test_layerwise_reference_is_the_reference(case, tmp_path):
    """reference.reference_logits (one layer's tensors at a time, embedding and head kept quantized when
    untouched) gives reference_model's logits on a quantized base, for several sequences at once, and
    matches transformers + PEFT on the F32 base."""
    from lora2gguf.parity.reference import reference_logits as layerwise

    arch, kw = LAYERWISE_CASES[case]
    adapter_dir = make_peft_adapter(fixture(arch, "hf"), tmp_path / "a", seed=3, **kw)
    seqs = [token_ids(383, 64, seed=9), token_ids(383, 21, seed=4)]
    adapters = [(load_peft(adapter_dir), 1.0)]
    with open_base(fixture(arch, "q4_k_m")) as base:
        whole = reference_model(base, adapters)
        got = layerwise(base, adapters, seqs)
        for seq, g in zip(seqs, got):
            want = reference_logits(whole, seq)
            assert g.shape == want.shape
            assert abs(g - want).max() <= 1e-4 * max(1.0, abs(want).max())
    with open_base(fixture(arch)) as base:
        ours = layerwise(base, adapters, seqs[:1])[0]
    m = compare(peft_logits(fixture(arch, "hf"), adapter_dir, seqs[0]), ours)
    assert m["mean_kl"] <= 1e-6 and m["top1"] == 1.0, m


@pytest.mark.parametrize("kind", ["f32", "q4_k_m"])
def test_layer_by_layer_experts_made_one_at_a_time_equal_the_whole_model(tmp_path, moe_arch, kind):
    """reference_logits makes each expert's weight when the router asks (parity.reference.ExpertStack: its
    rows dequantized, its LoRA pair folded in); reference_model holds every stack whole. Same logits, with an
    attention + expert adapter made by peft that moves them."""
    import numpy as np
    import torch

    from lora2gguf.adapters.load import load_adapter
    from lora2gguf.parity.reference import ExpertStack, reference_logits
    from lora2gguf.weights.base_model import open_base

    d = make_peft_adapter(fixture(moe_arch, "hf"), tmp_path / "a", r=4, lora_alpha=16, b_std=0.2,
                          target_modules=["q_proj"],
                          target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    toks = token_ids(300, 40, seed=1)
    with open_base(fixture(moe_arch, kind) if kind != "f32" else fixture(moe_arch)) as b:
        lora = load_adapter(d, b.spec)
        made = []
        real = ExpertStack.__getitem__
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(ExpertStack, "__getitem__", lambda self, e: made.append(e) or real(self, e))
            lazy = reference_logits(b, [(lora, 1.0)], [toks])[0]
        with torch.no_grad():
            whole = reference_model(b, [(lora, 1.0)])(torch.tensor([toks]))[0].numpy()
        alone = reference_logits(b, [], [toks])[0]
    assert made and np.array_equal(lazy, whole)
    assert np.abs(alone - whole).max() > 1.0  # the adapter moves the logits


def test_head_blocks_share_an_untouched_head_and_give_the_reference_logits(tmp_path):
    """HeadBlocks: the base alone and an adapter that leaves the head alone share one product per block
    (one group); an adapter that unties the head (a LoRA on Gemma's tied embedding) gets its own. Every
    view's blocks are reference_logits' values."""
    from lora2gguf.parity.reference import Head, HeadBlocks, ReferenceWeights, reference_states

    seq = token_ids(383, 70, seed=9)
    plain = make_peft_adapter(fixture("gemma3", "hf"), tmp_path / "a", seed=3, r=4, lora_alpha=8,
                              target_modules=["q_proj"])
    untied = make_peft_adapter(fixture("gemma3", "hf"), tmp_path / "b", seed=4, r=4, lora_alpha=8,
                                target_modules=["embed_tokens", "q_proj"])
    with open_base(fixture("gemma3", "q4_k_m")) as base:
        views, want = {}, {}
        for name, adapters in (("base", []), ("plain", [(load_peft(plain), 1.0)]),
                               ("untied", [(load_peft(untied), 1.0)])):
            head, xs = reference_states(base, adapters, [seq])
            views[name] = (head, xs[0])
            want[name] = reference_model(base, adapters)
        views["base"] = (Head(base, ReferenceWeights(base, [])), views["base"][1])
        made = HeadBlocks(views, 32)
        assert sorted(map(sorted, made.groups)) == [["base", "plain"], ["untied"]]
        streams = {k: made.stream(k) for k in views}
        got = {k: [] for k in views}
        for _ in range(3):
            for k, s in streams.items():
                got[k].append(next(s))
        for k, model in want.items():
            w = reference_logits(model, seq)
            g = np.concatenate(got[k])
            assert [len(b) for b in got[k]] == [32, 32, 6]
            assert abs(g - w).max() <= 1e-4 * max(1.0, abs(w).max()), k
    assert abs(np.concatenate(got["plain"]) - np.concatenate(got["base"])).max() > 1e-3
