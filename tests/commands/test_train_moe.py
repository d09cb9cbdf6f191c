"""`lora2gguf train` on the mixture-of-experts fixtures (conftest.MOE_ARCHS): LoRA on attention and on every
expert stack (PEFT's target_parameters form: one LoRA on the fused gate_up, one on down), saved as a PEFT
directory that the real peft loads on transformers' own class (Qwen3MoeForCausalLM, MixtralForCausalLM,
Qwen2MoeForCausalLM) and that matches lora2gguf's reference, and that llama.cpp matches after convert,
routing-aware. A control writes lora_B expert-major and shows peft far off, so the layout check can fail."""

import json

import numpy as np
import pytest
from conftest import fixture, token_ids
from moe_helpers import llama_run, reference_run, routed, transformers_run
from safetensors.numpy import load_file
from test_train import DATA, cfg, log_rows, one_thread  # noqa: F401 (autouse fixture)

import lora2gguf.adapters.peft as peft_io
from lora2gguf.adapters.peft import load_peft, write_peft_files
from lora2gguf.commands.convert import convert
from lora2gguf.commands.train import train
from lora2gguf.parity.metrics import compare
from lora2gguf.parity.reference import reference_model
from lora2gguf.training.experts import LoRAExperts
from lora2gguf.weights.base_model import open_base

TOKENS = token_ids(383, 64, seed=4)
HF_CLASS = {"qwen3moe": "Qwen3MoeForCausalLM", "mixtral": "MixtralForCausalLM", "qwen2moe": "Qwen2MoeForCausalLM"}


def exact(m: dict) -> bool:
    """Float32 rounding only: median and mean per-token KL tiny, every token routed to the same experts."""
    return m["median_kl"] <= 1e-6 and m["mean_kl"] <= 1e-5 and m["expert_set_mismatch"] == 0.0


@pytest.fixture(scope="module")
def trained(tmp_path_factory, moe_arch):
    """6 steps of all-linear (attention + experts, router frozen) at rank 4, rsLoRA, on the F32 fixture."""
    out = tmp_path_factory.mktemp(f"train-{moe_arch}") / "out"
    res = train(cfg(out, moe_arch, rank=4, alpha=8, steps=6, rslora=True))
    return out, res


def reference(arch, adapter_dir=None):
    with open_base(fixture(arch)) as b:
        return reference_run(reference_model(b, [(load_peft(adapter_dir), 1.0)] if adapter_dir else []), TOKENS)


def test_training_moves_loss_and_logits_with_router_frozen_and_plain_layers(moe_arch, trained):
    out, res = trained
    assert res.losses[-1] < 0.7 * res.losses[0], res.losses
    cfg_json = json.loads((out / "adapter_config.json").read_text())
    assert cfg_json["target_parameters"] == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    assert "gate" not in cfg_json["target_modules"] and cfg_json["lora_dropout"] == 0.0
    assert cfg_json["peft_version"].startswith("0.21.") and cfg_json["use_rslora"]
    for layer in res.model.model.layers:  # the plain MoE layer (no fused training layer), experts wrapped
        assert isinstance(layer.mlp.experts, LoRAExperts) and not layer.mlp.gate.weight.requires_grad
    B = [p.lora_B.weight for n, p in res.layers.items() if n.endswith("experts.gate_up_proj")]
    assert B and all(b.abs().max() > 0 for b in B), "the expert LoRA must have trained"
    plain, _ = reference(moe_arch)
    ours, _ = reference(moe_arch, out)
    assert compare(plain, ours)["mean_kl"] > 1e-2, "training must have moved the model"


def test_saved_adapter_loads_in_peft_on_transformers_and_matches_reference(moe_arch, trained):
    import transformers

    out, res = trained
    assert type(transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.from_pretrained(fixture(moe_arch, "hf")))).__name__ == HF_CLASS[moe_arch]
    theirs, r_theirs = transformers_run(moe_arch, TOKENS, adapter_dir=out)
    ours, r_ours = reference(moe_arch, out)
    m = routed(theirs, ours, r_theirs, r_ours)
    print(moe_arch, "peft vs reference", m)
    assert exact(m), m
    live, r_live = reference_run(res.model.eval(), TOKENS)  # the trained model itself, before saving
    assert exact(routed(theirs, live, r_theirs, r_live))


def wrong_b_expert_major(A3, B3):
    """lora_B written expert-major (column e·r + j) instead of PEFT's expert-minor j·E + e."""
    return np.ascontiguousarray(A3.reshape(-1, A3.shape[-1])), np.ascontiguousarray(
        B3.transpose(1, 0, 2).reshape(B3.shape[1], -1))


def test_layout_control_b_expert_major_is_far_off(tmp_path, monkeypatch, moe_arch, trained):
    """Rewriting the same adapter gives the same file; rewriting it with lora_B expert-major puts peft far off."""
    out, _ = trained
    adapter = load_peft(out)
    same = tmp_path / "same"
    same.mkdir()
    write_peft_files(same, adapter, adapter.config)
    a, b = load_file(str(out / "adapter_model.safetensors")), load_file(str(same / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    monkeypatch.setattr(peft_io, "param_wrapper_weights", wrong_b_expert_major)
    write_peft_files(wrong, adapter, adapter.config)
    plain, _ = reference(moe_arch)
    ours, _ = reference(moe_arch, out)
    theirs, _ = transformers_run(moe_arch, TOKENS, adapter_dir=wrong)
    w, moved = compare(theirs, ours), compare(plain, ours)
    print("B expert-major", w)
    assert w["mean_kl"] > 1e-4 and w["mean_kl"] > 0.05 * moved["mean_kl"], (w, moved)


def test_converted_adapter_matches_llama_cpp_routing_aware(tmp_path, moe_arch, trained):
    out, _ = trained
    gguf = convert(out, fixture(moe_arch), tmp_path / "a.gguf")
    base, _ = llama_run(fixture(moe_arch), TOKENS)
    theirs, r_theirs = llama_run(fixture(moe_arch), TOKENS, [(gguf, 1.0)])
    ours, r_ours = reference(moe_arch, out)
    m = routed(theirs, ours, r_theirs, r_ours)
    print(moe_arch, "llama.cpp vs reference", m)
    assert compare(base, theirs)["mean_kl"] > 1e-2 and exact(m), m


def test_router_trains_only_when_named_and_peft_agrees(tmp_path):
    """--targets gate,experts: the router takes an ordinary LoRA (target_modules "gate"), which peft loads on the
    router and which moves the logits beyond what the experts' LoRA does."""
    out = tmp_path / "out"
    res = train(cfg(out, "qwen3moe", rank=4, alpha=8, steps=6, targets="gate,experts", dropout=0.0))
    assert sorted(res.layers)[:3] == ["model.layers.0.mlp.experts.down_proj",
                                      "model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.gate"]
    assert json.loads((out / "adapter_config.json").read_text())["target_modules"] == ["gate"]
    theirs, r_theirs = transformers_run("qwen3moe", TOKENS, adapter_dir=out)
    ours, r_ours = reference("qwen3moe", out)
    assert exact(routed(theirs, ours, r_theirs, r_ours))
    no_router = load_peft(out)
    no_router.modules = {k: v for k, v in no_router.modules.items() if not k.endswith("mlp.gate")}
    with open_base(fixture("qwen3moe")) as b:
        without, r_without = reference_run(reference_model(b, [(no_router, 1.0)]), TOKENS)
    assert routed(theirs, without, r_theirs, r_without)["expert_set_mismatch"] > 0, "the router LoRA must route"


def test_experts_only_resume_equals_uninterrupted(tmp_path):
    """--targets experts, a checkpoint at step 2 and --resume from it: the same adapter as one run (the
    checkpoint's expert tensors are read back through PEFT's layout)."""
    from test_checkpoint import interrupt_at

    kw = dict(rank=4, alpha=8, steps=4, batch_size=2, targets="experts", dropout=0.0)
    train(cfg(tmp_path / "full", "qwen3moe", **kw))
    with pytest.raises(KeyboardInterrupt):
        train(cfg(tmp_path / "cut", "qwen3moe", **kw), on_step=interrupt_at(2))
    res = train(cfg(tmp_path / "cut", "qwen3moe", resume=True, **kw))
    assert res.steps == 4 and set(res.layers) == {f"model.layers.{i}.mlp.experts.{p}" for i in range(2)
                                                  for p in ("gate_up_proj", "down_proj")}
    a, b = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("full", "cut"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in log_rows(tmp_path / "cut")] == [r["loss"] for r in log_rows(tmp_path / "full")]


def test_dropout_is_dropped_with_a_warning_and_bad_targets_are_one_line(tmp_path, capsys):
    from lora2gguf.cli import main

    base, data = str(fixture("qwen3moe")), str(DATA / "text.jsonl")
    args = ["train", "--base", base, "--data", data, "--steps", "1", "--rank", "2", "--seq-len", "32"]
    assert main(args + ["-o", str(tmp_path / "a"), "--targets", "experts"]) == 0
    assert "--dropout 0.05 ignored" in capsys.readouterr().err
    assert main(args + ["-o", str(tmp_path / "b"), "--targets", "experts,w1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown target 'w1'" in err[0] and "experts" in err[0], err
    llama = ["train", "--base", str(fixture("llama")), "--data", data, "-o", str(tmp_path / "c"), "--targets", "experts"]
    assert main(llama) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown target 'experts' of llama" in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"], "refusals write nothing"


def test_quantized_base_kept_quantized_and_one_layer(tmp_path):
    """On the Q4_K_M file with its quant blocks kept (--base-weights quantized), --layers 1: only layer 1's
    attention and experts are saved (layers_to_transform; the expert parameters by path), peft agrees with the
    reference, and so does llama.cpp with the GGUF LoRA train writes (--gguf)."""
    out = tmp_path / "out"
    res = train(cfg(out, "qwen3moe", "q4_k_m", rank=4, alpha=8, steps=4, layers="1", base_weights="quantized",
                    gguf=str(tmp_path / "a.gguf")))
    assert res.losses[-1] < res.losses[0], res.losses
    keys = load_file(str(out / "adapter_model.safetensors"))
    assert any(".experts.base_layer.lora_A" in k for k in keys) and all(".layers.1." in k for k in keys)
    # by path: peft would otherwise wrap layer 0's experts too (and warn that their tensors are missing)
    assert json.loads((out / "adapter_config.json").read_text())["target_parameters"] == [
        "model.layers.1.mlp.experts.down_proj", "model.layers.1.mlp.experts.gate_up_proj"]
    theirs, r_theirs = transformers_run("qwen3moe", TOKENS, adapter_dir=out)
    plain, _ = reference("qwen3moe")
    ours, r_ours = reference("qwen3moe", out)
    assert compare(plain, ours)["mean_kl"] > 1e-3 and exact(routed(theirs, ours, r_theirs, r_ours))
    served, r_served = llama_run(fixture("qwen3moe"), TOKENS, [(res.gguf, 1.0)])  # train --gguf: converted
    assert exact(routed(served, ours, r_served, r_ours))


def test_grad_checkpointing_same_update(tmp_path):
    """Recomputing a MoE layer in backward takes fresh per-expert views of the LoRA factors (LoRAExperts.bind)."""
    kw = dict(rank=4, alpha=8, steps=3, targets="experts", dropout=0.0)
    train(cfg(tmp_path / "a", "qwen3moe", **kw))
    train(cfg(tmp_path / "b", "qwen3moe", grad_checkpointing=True, **kw))
    a, b = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in "ab")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-7)
    assert any(np.abs(a[k]).max() > 0 for k in a if "lora_B" in k)


def test_torchrun_two_processes_match_one(tmp_path):
    """DDP over the expert LoRA: each stack is one parameter whose gradient exists on every rank (the experts a
    rank's tokens did not reach contribute zeros), so two gloo ranks train what one process does."""
    import os
    import subprocess
    import sys

    from conftest import ROOT

    from lora2gguf.cli import main

    args = ["train", "--base", str(fixture("qwen3moe")), "--data", str(DATA / "text.jsonl"), "--rank", "4", "--lr",
            "1e-2", "--dropout", "0", "--seq-len", "64", "--steps", "3", "--batch-size", "4", "--grad-accum", "2"]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
                        "lora2gguf.cli", *args, "-o", str(tmp_path / "ddp")], capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert main(args + ["-o", str(tmp_path / "one")]) == 0
    np.testing.assert_allclose([r["loss"] for r in log_rows(tmp_path / "ddp")],
                               [r["loss"] for r in log_rows(tmp_path / "one")], rtol=1e-4)
    a, b = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("ddp", "one"))
    assert a.keys() == b.keys() and any("experts.base_layer" in k for k in a)
    for k in a:  # relative Frobenius error, as test_train's torchrun test (Adam amplifies summation-order noise)
        assert np.linalg.norm(a[k] - b[k]) <= 1e-3 * np.linalg.norm(b[k]), k
