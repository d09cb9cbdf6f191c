"""`lora2gguf extract`: fine-tunes made as base + a known low-rank update (by the real PEFT library, merged
by PEFT itself or by our merge), recovered and checked against PEFT's ΔW and through llama.cpp."""

import warnings

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from conftest import fixture, token_ids
from lora2gguf.adapters import lowrank
from lora2gguf.adapters.gguf_lora import load_gguf_lora
from lora2gguf.weights.base_model import open_base
from lora2gguf.cli import main
from lora2gguf.commands.extract import extract
from lora2gguf.commands.merge import merge
from lora2gguf.parity.metrics import compare
from lora2gguf.llamacpp.runtime import LlamaRuntime
from peft_helpers import make_peft_adapter, peft_deltas, peft_logits

KW = dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"])


def peft_merged_dir(arch, adapter, out, norm_noise=0.0):
    """transformers + PEFT's merge_and_unload saved as an HF directory: a 'full fine-tune' whose ΔW is the
    adapter's; norm_noise also changes every RMSNorm weight (what a LoRA cannot hold)."""
    import peft
    import transformers

    warnings.filterwarnings("ignore", category=UserWarning)
    model = transformers.AutoModelForCausalLM.from_pretrained(fixture(arch, "hf"), dtype=torch.float32)
    merged = peft.PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    merged.save_pretrained(out, safe_serialization=True)
    if norm_noise:
        st = out / "model.safetensors"
        t = load_file(st)
        rng = np.random.default_rng(0)
        for k in t:
            if k.endswith("norm.weight"):
                t[k] = (t[k] * (1 + norm_noise * rng.standard_normal(t[k].shape))).astype(np.float32)
        save_file(t, str(st), metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_recovers_known_update_from_hf_fine_tune(arch, tmp_path):
    adapter = make_peft_adapter(fixture(arch, "hf"), tmp_path / "a", seed=40, b_std=0.05, **KW)
    tuned = peft_merged_dir(arch, adapter, tmp_path / "tuned")
    out = tmp_path / "x.gguf"
    report = extract(fixture(arch), tuned, out, rank=4)  # GGUF base, HF tuned
    want = peft_deltas(fixture(arch, "hf"), adapter)
    with open_base(fixture(arch)) as b:
        got = load_gguf_lora(out, b.spec)
    assert set(got.modules) == set(want) and not report["left_out"]
    for name, delta in want.items():
        np.testing.assert_allclose(got.modules[name].delta(), delta, atol=1e-5 * np.abs(delta).max())
        assert got.modules[name].r == 4
    tokens = token_ids(383, 64, seed=41)
    theirs = peft_logits(fixture(arch, "hf"), adapter, tokens)
    with LlamaRuntime(fixture(arch)) as rt:
        rt.set_adapters([(out, 1.0)])
        m = compare(theirs, rt.logits(tokens))
    assert m["mean_kl"] <= 1e-5 and m["top1"] == 1.0, m


def test_gguf_pair_randomized_svd_and_peft_out(tmp_path, monkeypatch):
    """Both models GGUF (tuned written by our merge at f32); the randomized SVD forced on these small
    matrices must recover the update too; PEFT directory out loads in the real PEFT library."""
    adapter = make_peft_adapter(fixture("llama", "hf"), tmp_path / "a", seed=42, b_std=0.05, **KW)
    tuned = merge(fixture("llama"), [(adapter, 1.0)], tmp_path / "tuned.gguf", quant="f32")
    monkeypatch.setattr(lowrank, "DENSE_SVD_MAX", 8)
    extract(fixture("llama"), tuned, tmp_path / "x", rank=6)
    got, want = peft_deltas(fixture("llama", "hf"), tmp_path / "x"), peft_deltas(fixture("llama", "hf"), adapter)
    assert set(got) == set(want)
    for name, delta in want.items():
        np.testing.assert_allclose(got[name], delta, atol=1e-5 * np.abs(delta).max())


def test_left_out_norms_and_energy_target(tmp_path):
    adapter = make_peft_adapter(fixture("llama", "hf"), tmp_path / "a", seed=43, b_std=0.05, **KW)
    tuned = peft_merged_dir("llama", adapter, tmp_path / "tuned", norm_noise=0.05)
    report = extract(fixture("llama"), tuned, tmp_path / "x.gguf", energy=0.9)
    with open_base(fixture("llama")) as b, open_base(tuned) as t:
        norms = {n: float(((t.tensor(n).astype(np.float64) - b.tensor(n)) ** 2).sum())
                 for n in b.hf_names() if n.endswith("norm.weight")}
        lora = {n: float(((t.tensor(n).astype(np.float64) - b.tensor(n)) ** 2).sum())
                for n in b.hf_names() if n.removesuffix(".weight") in report["modules"]}
    assert set(report["left_out"]) == set(norms)
    assert report["left_out_share"] == pytest.approx(sum(norms.values()) / (sum(norms.values()) + sum(lora.values())),
                                                     rel=1e-6)
    want = peft_deltas(fixture("llama", "hf"), adapter)
    for name, delta in want.items():
        s = np.linalg.svd(delta, compute_uv=False)
        k = int(np.argmax(np.cumsum(s ** 2) / (s ** 2).sum() >= 0.9)) + 1
        assert report["modules"][name]["rank"] == k and report["modules"][name]["energy_kept"] >= 0.9


def test_quantized_pair_runs(tmp_path):
    """Any GGUF type: a q4_k_m base against a q8_0 fine-tune (quantization noise everywhere)."""
    adapter = make_peft_adapter(fixture("llama", "hf"), tmp_path / "a", seed=44, b_std=0.05, **KW)
    tuned = merge(fixture("llama", "f32"), [(adapter, 1.0)], tmp_path / "tuned.gguf", quant="q8_0")
    report = extract(fixture("llama", "q4_k_m"), tuned, tmp_path / "x", rank=4)
    assert all(x["rank"] == 4 for x in report["modules"].values())
    assert 0 < report["energy_kept"] < 1


def test_cli_and_errors(tmp_path, capsys):
    adapter = make_peft_adapter(fixture("llama", "hf"), tmp_path / "a", seed=45, **KW)
    tuned = merge(fixture("llama"), [(adapter, 1.0)], tmp_path / "tuned.gguf", quant="f32")
    capsys.readouterr()
    assert main(["extract", "--base", str(fixture("llama")), "--tuned", str(tuned), "--rank", "4",
                 "-o", str(tmp_path / "x.gguf")]) == 0
    assert "energy kept" in capsys.readouterr().out
    for bad in (["--base", str(fixture("llama")), "--tuned", str(fixture("qwen2")), "--rank", "4"],
                ["--base", str(fixture("llama")), "--tuned", str(fixture("llama")), "--rank", "4"],
                ["--base", str(fixture("llama")), "--tuned", str(tuned)]):
        assert main(["extract", *bad, "-o", str(tmp_path / "y.gguf")]) == 2, bad
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), (bad, err)
    assert not (tmp_path / "y.gguf").exists()
