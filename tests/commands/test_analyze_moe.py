"""analyze on expert LoRA (qwen3moe): per expert ΔW_e, which experts the adapter really changed. A real PEFT
target_parameters adapter whose lora_B columns are zero for all but a few experts (what training leaves for experts
no token was routed to): the report names exactly those experts, from the PEFT directory and from the converted GGUF
LoRA, with and without the base; each changed expert's numbers match numpy's SVD of PEFT's own delta."""

import json

import numpy as np
import pytest
from conftest import fixture
from peft_helpers import make_peft_adapter, peft_deltas
from safetensors.numpy import load_file, save_file
from test_analyze import truth
from test_convert_moe import EXPERT_PARAMS

from lora2gguf.cli import main
from lora2gguf.commands.analyze import analyze, format_report
from lora2gguf.commands.convert import convert

ARCH, E, F = "qwen3moe", 8, 256
KEEP = {"base_layer": [1, 5], "experts": [1, 5, 6]}  # gate_up's wrapper (inner), down_proj's (outer): kept experts


@pytest.fixture(scope="module")
def partial_adapter(tmp_path_factory):
    """Expert LoRA on gate_up and down of both layers where only KEEP's experts have non-zero lora_B columns
    (PEFT's lora_B [out, r·E]: expert e's columns are j·E + e)."""
    d = make_peft_adapter(fixture(ARCH, "hf"), tmp_path_factory.mktemp("partial") / "a", r=4, lora_alpha=16,
                          b_std=0.2, target_modules=[], target_parameters=EXPERT_PARAMS)
    st = d / "adapter_model.safetensors"
    t = load_file(st)
    for k, v in t.items():
        if "lora_B" in k:
            keep = KEEP["base_layer" if ".experts.base_layer." in k else "experts"]
            drop = [c for c in range(v.shape[1]) if c % E not in keep]
            v[:, drop] = 0
    save_file(t, str(st), metadata={"format": "pt"})
    return d


def expected(kind: str) -> list[int]:
    return KEEP["experts"] if kind == "down_exps" else KEEP["base_layer"]


@pytest.mark.parametrize("form", ["peft", "gguf"])
@pytest.mark.parametrize("with_base", [False, True])
def test_report_names_exactly_the_changed_experts(form, with_base, tmp_path, partial_adapter):
    src = partial_adapter if form == "peft" else convert(partial_adapter, fixture(ARCH), tmp_path / "a.gguf")
    rep = analyze(src, fixture(ARCH) if with_base else None)
    stacks = [x for x in rep["modules"] if "experts" in x]
    assert sorted((x["layer"], x["kind"]) for x in stacks) == [(i, k) for i in (0, 1)
                                                                for k in ("down_exps", "gate_exps", "up_exps")]
    for x in stacks:
        assert x["experts_changed"] == expected(x["kind"]), x["module"]
        for e in x["experts"]:
            assert (e["fro"] > 0.1) == (e["expert"] in x["experts_changed"]), (x["module"], e["expert"], e["fro"])
            assert with_base == ("rel_fro" in e)
    assert rep["experts_changed"] == [1, 5, 6] and rep["experts_changed_everywhere"] == [1, 5]
    text = format_report(rep)
    assert "    0  gate_exps      2/8    6  e" in text and "    1  down_exps      3/8    5  e" in text, text
    assert "experts changed: 1, 5, 6 (3 of 8); in every expert stack: 1, 5" in text, text


def test_per_expert_numbers_are_peft_deltas_svd(partial_adapter):
    """Each expert's ‖ΔW_e‖_F, ‖ΔW_e‖₂, k99 and entropy rank against numpy on PEFT's own ParamWrapper delta (gate_up
    fused: gate rows first), and the stack's ‖ΔW‖_F; numbers relative to the base use the expert's own weight."""
    truth_deltas = peft_deltas(fixture(ARCH, "hf"), partial_adapter)
    rep = analyze(partial_adapter, fixture(ARCH))
    by = {(x["layer"], x["kind"]): x for x in rep["modules"]}
    import torch
    from safetensors.torch import load_file as load_pt

    hf = load_pt(str(fixture(ARCH, "hf") / "model.safetensors"))
    for i in (0, 1):
        gate_up = truth_deltas[f"model.layers.{i}.mlp.experts.base_layer"]  # (E, 2F, D)
        parts = {"gate_exps": gate_up[:, :F], "up_exps": gate_up[:, F:],
                 "down_exps": truth_deltas[f"model.layers.{i}.mlp.experts"]}
        for kind, delta in parts.items():
            x = by[(i, kind)]
            np.testing.assert_allclose(x["fro"], np.linalg.norm(delta), rtol=1e-5)
            for e in expected(kind):
                t, got = truth(delta[e]), x["experts"][e]
                np.testing.assert_allclose(got["fro"], t["fro"], rtol=1e-5)
                np.testing.assert_allclose(got["spectral"], t["spec"], rtol=1e-5)
                np.testing.assert_allclose(got["entropy_rank"], t["entropy"], rtol=1e-4)
                assert got["rank_99"] == t["k99"]
                proj = {"gate_exps": "gate_proj", "up_exps": "up_proj", "down_exps": "down_proj"}[kind]
                w = hf[f"model.layers.{i}.mlp.experts.{e}.{proj}.weight"].to(torch.float64).numpy()
                np.testing.assert_allclose(got["rel_fro"], t["fro"] / np.linalg.norm(w), rtol=1e-5)


def test_cli_json_and_text(capsys, partial_adapter):
    assert main(["analyze", str(partial_adapter), "--base", str(fixture(ARCH)), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["experts_changed"] == [1, 5, 6] and rep["n_expert"] == E
    assert main(["analyze", str(partial_adapter)]) == 0
    out = capsys.readouterr().out
    assert "expert LoRA, per expert e" in out and "(3 of 8)" in out


@pytest.mark.parametrize("form", ["peft", "gguf"])
def test_inspect_names_the_changed_experts(form, tmp_path, partial_adapter):
    from lora2gguf.commands.inspect import describe, format_description

    src = partial_adapter if form == "peft" else convert(partial_adapter, fixture(ARCH), tmp_path / "a.gguf")
    info = describe(str(src))
    ex = info["experts"]
    assert ex["changed"] == [1, 5, 6] and ex["changed_in_every_stack"] == [1, 5] and ex["n_expert"] == E
    assert ex["0.gate_exps"].startswith("2/8 changed [1, 5]") and ex["1.down_exps"].startswith("3/8 changed [1, 5, 6]")
    assert "experts:" in format_description(info)


def test_inspect_of_a_dense_adapter_has_no_experts_section(tmp_path):
    from lora2gguf.commands.inspect import describe

    d = make_peft_adapter(fixture(ARCH, "hf"), tmp_path / "a", r=2, lora_alpha=4, target_modules=["q_proj"])
    assert "experts" not in describe(str(d))
