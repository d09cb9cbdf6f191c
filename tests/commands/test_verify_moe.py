"""verify on a mixture of experts (qwen3moe; the pass/fail pair on every MoE arch): routing-aware parity. Expert LoRA made by the real peft
(target_parameters on transformers' fused experts) passes, on the runtime view and on a merged file; the same adapter
converted or merged with lora_B read expert-major, or with gate and up swapped, fails; on a quantized base, where
router near-ties flip experts between the reference and llama.cpp, the flipped tokens carry most of the mean KL and
the correct adapter passes on the routing-aware measures."""

import json
import subprocess
import sys

import pytest
from conftest import fixture
from peft_helpers import make_peft_adapter
from test_convert_moe import EXPERT_PARAMS, wrong_b_expert_major

import lora2gguf.adapters.peft as peft_reader
from lora2gguf import models
from lora2gguf.commands.convert import convert
from lora2gguf.commands.merge import merge
from lora2gguf.commands.verify import format_report, verify
from lora2gguf.parity.routing import judge_pair

ARCH = "qwen3moe"
CLI = [sys.executable, "-m", "lora2gguf.cli"]
ROUTED = ("median_kl", "mean_kl", "mean_kl_routing_agrees", "expert_set_mismatch", "expert_set_mismatch_per_layer",
          "max_kl_allowed", "max_mismatch_allowed")


def _expert_adapter(tmp_path_factory, arch):
    """LoRA on both expert parameters of every layer, rank 4 (small enough that a q8_0 merge stays near its floor)."""
    return make_peft_adapter(fixture(arch, "hf"), tmp_path_factory.mktemp("experts") / "a", r=4, lora_alpha=16,
                             b_std=0.05, target_modules=[], target_parameters=EXPERT_PARAMS)


@pytest.fixture(scope="module")
def expert_adapter(tmp_path_factory):
    return _expert_adapter(tmp_path_factory, ARCH)


@pytest.fixture(scope="module")
def arch_adapter(tmp_path_factory, moe_arch):
    """(arch, its expert adapter) for every MoE arch."""
    return moe_arch, _expert_adapter(tmp_path_factory, moe_arch)


def wrongly(kind: str, mp) -> None:
    """Make the reader get the expert layout wrong, as test_convert_moe does."""
    if kind == "B expert-major":
        mp.setattr(peft_reader, "param_wrapper_factors", wrong_b_expert_major)
        return
    for a in models.all_archs():  # the reader takes the table from every arch (they share these names)
        table = dict(a.expert_params)
        if "mlp.experts.gate_up_proj" in table:
            table["mlp.experts.gate_up_proj"] = ("mlp.experts.up_proj", "mlp.experts.gate_proj")
            mp.setattr(a, "expert_params", table)


def test_correct_expert_lora_passes_runtime_and_merged_with_routing_in_the_json(tmp_path, arch_adapter):
    arch, expert_adapter = arch_adapter
    merged = merge(fixture(arch), [(str(expert_adapter), 1.0)], tmp_path / "m.gguf", quant="q8_0")
    r = subprocess.run(CLI + ["verify", "--base", fixture(arch), "--lora", expert_adapter, "--merged", merged,
                              "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["pass"] and rep["adapter_effect"]["kl_base_to_reference"] > 1e-2
    for view in ("runtime", "merged"):
        m = rep["pairs"][view]
        print(view, {k: m[k] for k in ROUTED})
        assert m["pass"] and all(k in m for k in ROUTED), (view, m)
        assert len(m["expert_set_mismatch_per_layer"]) == 2  # one share per layer of the fixture
        assert m["median_kl"] <= m["max_kl_allowed"] and m["expert_set_mismatch"] <= m["max_mismatch_allowed"]
    assert rep["pairs"]["runtime"]["mean_kl"] <= 1e-6  # F32: llama.cpp and the reference agree to rounding
    assert rep["merged_carries_adapter"]["pass"]
    assert "rule" in rep["routing_aware"] and "merged_floor_expert_set_mismatch" in rep["routing_aware"]


@pytest.mark.parametrize("kind", ["B expert-major", "gate/up swapped"])
def test_wrong_expert_layouts_fail_runtime_and_merged(kind, tmp_path, monkeypatch, arch_adapter):
    arch, expert_adapter = arch_adapter
    good = convert(expert_adapter, fixture(arch), tmp_path / "good.gguf")
    with monkeypatch.context() as mp:
        wrongly(kind, mp)
        bad = convert(expert_adapter, fixture(arch), tmp_path / "bad.gguf")
        bad_merge = merge(fixture(arch), [(str(expert_adapter), 1.0)], tmp_path / "bad-m.gguf", quant="f32")
    rep = verify(fixture(arch), [(str(expert_adapter), 1.0)], runtime_lora=bad)
    m = rep["pairs"]["runtime"]
    print(kind, {k: m[k] for k in ROUTED})
    assert not rep["pass"] and not m["pass"] and m["mean_kl_routing_agrees"] > 10 * m["max_kl_allowed"], m
    rep = verify(fixture(arch), [(str(good), 1.0)], merged=bad_merge)
    assert rep["pairs"]["runtime"]["pass"] and not rep["pairs"]["merged"]["pass"] and not rep["pass"]
    assert rep["pairs"]["merged"]["median_kl"] > rep["pairs"]["merged"]["max_kl_allowed"]


def test_quantized_base_flipped_tokens_carry_the_mean_and_the_report_says_so(expert_adapter):
    """On the q8_0 base the reference (dequantized weights, F32 activations) and llama.cpp (q8 activations) route
    some tokens to other experts: those tokens carry most of the mean KL (the plain mean is over the routing-aware
    limit, the mean over tokens routed alike within it); the report says so in its table and rule lines."""
    rep = verify(fixture(ARCH, "q8_0"), [(str(expert_adapter), 1.0)])
    m = rep["pairs"]["runtime"]
    print({k: m[k] for k in ROUTED})
    assert rep["pass"] and m["pass"]
    assert m["expert_set_mismatch"] > 0 and rep["routing_aware"]["base_expert_set_mismatch"] > 0
    assert m["mean_kl"] > m["max_kl_allowed"] >= m["mean_kl_routing_agrees"], m
    text = format_report(rep)
    for needle in ("median KL", "KL|alike", "flipped", "flip cap", "routing-aware (mixture of experts)",
                   "tokens whose top-k expert set flips between reference and llama.cpp: base", "per layer: runtime"):
        assert needle in text, (needle, text)
    print(text)


def test_routing_rule_caps_flips_and_judges_the_median():
    """judge_pair on measures as routed_compare gives them: the share of flipped tokens is capped at twice the
    floor's + 2%, and the median KL is judged beside the mean over tokens routed alike; a dense pair keeps the
    plain mean KL rule."""
    floor = {"mean_kl": 1e-3, "median_kl": 1e-6, "mean_kl_routing_agrees": 1e-6, "expert_set_mismatch": 0.01}
    ok = {"mean_kl": 5e-3, "median_kl": 1e-6, "mean_kl_routing_agrees": 2e-6, "expert_set_mismatch": 0.03}
    assert judge_pair(dict(ok), floor, 1e-4, None)
    assert not judge_pair(ok | {"expert_set_mismatch": 0.05}, floor, 1e-4, None)  # cap 2 × 1% + 2%
    assert not judge_pair(ok | {"median_kl": 2e-4}, floor, 1e-4, None)
    assert not judge_pair(ok | {"mean_kl_routing_agrees": 2e-4}, floor, 1e-4, None)
    dense = {"mean_kl": 5e-3, "median_kl": 1e-6}
    assert not judge_pair(dense, {"mean_kl": 1e-6}, 1e-4, None) and judge_pair(dense, {"mean_kl": 1e-6}, 1e-2, None)


def test_bad_input_on_a_mixture_of_experts_is_one_line(tmp_path, capsys, expert_adapter):
    """verify on a MoE with a bad input: one line, exit 2 (a merged file of another model)."""
    from lora2gguf.cli import main

    assert main(["verify", "--base", str(fixture(ARCH)), "--lora", str(expert_adapter), "--merged",
                 str(fixture("qwen3"))]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err


def test_same_type_merge_floor_is_routing_aware_too(tmp_path, expert_adapter):
    """A q8_0 base merged to q8_0: the floor is the reference's merged weights quantized by llama.cpp, its routing
    recorded as well, and the merge passes against it."""
    merged = merge(fixture(ARCH, "q8_0"), [(str(expert_adapter), 1.0)], tmp_path / "m.gguf", quant="q8_0")
    rep = verify(fixture(ARCH, "q8_0"), [(str(expert_adapter), 1.0)], merged=merged)
    m = rep["pairs"]["merged"]
    print({k: m[k] for k in ROUTED}, rep["routing_aware"])
    assert "merged_floor_source" in rep and "merged_floor_expert_set_mismatch" in rep["routing_aware"]
    assert rep["pass"] and m["pass"] and all(k in m for k in ROUTED)


def test_reference_routing_is_the_first_sequences_whatever_its_batch(expert_adapter):
    """reference_logits' routing (hooks on the MoE blocks, run layer by layer over padded batches) is what the whole
    reference model routes for the first sequence, batched with longer and shorter ones or alone."""
    import numpy as np
    from conftest import token_ids
    from moe_helpers import reference_run

    from lora2gguf.adapters.load import load_adapter
    from lora2gguf.parity.reference import reference_logits, reference_model
    from lora2gguf.weights.base_model import open_base

    tokens = token_ids(383, 40, seed=1)
    with open_base(fixture(ARCH)) as b:
        pairs = [(load_adapter(expert_adapter), 1.0)]
        _, want = reference_run(reference_model(b, pairs), tokens)
        for others in ([], [token_ids(383, 48, seed=2), token_ids(383, 30, seed=3)]):
            got: dict = {}
            reference_logits(b, pairs, [tokens, *others], got)
            assert sorted(got) == [0, 1]
            for i in got:
                np.testing.assert_array_equal(np.sort(got[i], -1), np.sort(want[i], -1))
