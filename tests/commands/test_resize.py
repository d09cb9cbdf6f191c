"""`lora2gguf resize`: the truth is numpy's truncated SVD of ΔW as the real PEFT library computes it, and
transformers + PEFT's logits for llama.cpp running the resized GGUF."""

import json

import numpy as np
import pytest

from conftest import fixture, token_ids
from lora2gguf.adapters.gguf_lora import load_gguf_lora
from lora2gguf.weights.base_model import open_base
from lora2gguf.cli import main
from lora2gguf.commands.convert import convert
from lora2gguf.parity.metrics import compare
from lora2gguf.commands.resize import resize
from lora2gguf.llamacpp.runtime import LlamaRuntime
from peft_helpers import make_peft_adapter, peft_deltas, peft_logits
from test_analyze import low_rank_adapter
from test_convert import CASES


def best_rank_k(delta: np.ndarray, k: int) -> np.ndarray:
    u, s, vt = np.linalg.svd(delta, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vt[:k]


def llama_logits(base, lora, tokens):
    with LlamaRuntime(base) as rt:
        rt.set_adapters([(lora, 1.0)])
        return rt.logits(tokens)


@pytest.mark.parametrize("case", ["llama-patterns", "llama-embed-head", "qwen2-rslora-patterns"])
def test_rank_below_true_rank_is_the_optimal_truncation(case, tmp_path):
    arch, kw = CASES[case]
    d = make_peft_adapter(fixture(arch, "hf"), tmp_path / "a", seed=5, **kw)
    k = 3
    report = resize(d, tmp_path / "r", rank=k)
    cfg = json.loads((tmp_path / "r" / "adapter_config.json").read_text())
    want, got = peft_deltas(fixture(arch, "hf"), d), peft_deltas(fixture(arch, "hf"), tmp_path / "r")
    assert set(got) == set(want)
    total = kept = 0.0
    for name, delta in want.items():
        best = best_rank_k(delta, k)
        np.testing.assert_allclose(got[name], best, atol=2e-6 * np.abs(delta).max() + 1e-7)
        s = np.linalg.svd(delta, compute_uv=False)
        assert report["modules"][name]["new_rank"] == min(k, int((s > s[0] * 1e-5).sum()))
        total, kept = total + (s ** 2).sum(), kept + (s[:k] ** 2).sum()
    assert report["energy_kept"] == pytest.approx(kept / total, rel=1e-6)
    # modules of rank < k (rank_pattern) keep their own rank: it goes into rank_pattern
    small = [n for n, x in report["modules"].items() if x["new_rank"] < k]
    assert all(any(n.endswith(p.replace("\\", "")) for p in cfg["rank_pattern"]) for n in small)
    assert report["bytes"] < report["source_bytes"]


def test_rank_at_true_rank_is_exact_through_llama_cpp(tmp_path):
    """ΔW of true rank 3 in an r=8 adapter: --rank 3 loses nothing; llama.cpp with the resized GGUF
    computes what transformers + PEFT compute with the original adapter."""
    d = low_rank_adapter(tmp_path, r=8, lora_alpha=16, use_rslora=True,
                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"])
    out = tmp_path / "r3.gguf"
    report = resize(d, out, rank=3, base=fixture("llama"))
    assert {x["new_rank"] for x in report["modules"].values()} == {3}
    assert report["energy_kept"] == pytest.approx(1.0, abs=1e-9)
    with open_base(fixture("llama")) as b:
        back = load_gguf_lora(out, b.spec)
    want = peft_deltas(fixture("llama", "hf"), d)
    for name, m in back.modules.items():
        np.testing.assert_allclose(m.delta(), want[name], atol=1e-6 * np.abs(want[name]).max())
    tokens = token_ids(383, 64, seed=6)
    theirs = peft_logits(fixture("llama", "hf"), d, tokens)
    with LlamaRuntime(fixture("llama")) as rt:
        assert compare(theirs, rt.logits(tokens))["mean_kl"] > 1e-2, "the adapter must visibly change the output"
    m = compare(theirs, llama_logits(fixture("llama"), out, tokens))
    assert m["mean_kl"] <= 1e-5 and m["top1"] == 1.0, m


def test_energy_target_per_module(tmp_path):
    arch, kw = CASES["qwen2-rslora-patterns"]
    d = make_peft_adapter(fixture(arch, "hf"), tmp_path / "a", seed=6, **kw)
    report = resize(d, tmp_path / "e.gguf", energy=0.9, base=fixture(arch))
    want = peft_deltas(fixture(arch, "hf"), d)
    with open_base(fixture(arch)) as b:
        back = load_gguf_lora(tmp_path / "e.gguf", b.spec)
    for name, delta in want.items():
        s = np.linalg.svd(delta, compute_uv=False)
        k = int(np.argmax(np.cumsum(s ** 2) / (s ** 2).sum() >= 0.9)) + 1
        assert back.modules[name].r == k == report["modules"][name]["new_rank"]
        np.testing.assert_allclose(back.modules[name].delta(), best_rank_k(delta, k), atol=2e-6 * np.abs(delta).max())
        assert report["modules"][name]["energy_kept"] >= 0.9


def test_gguf_in_peft_out_is_exact_for_peft(tmp_path):
    """A GGUF LoRA (llama, permuted q/k) resized at its full rank into a PEFT directory: transformers + PEFT
    with it compute what they compute with the original adapter."""
    arch, kw = CASES["llama-patterns"]
    d = make_peft_adapter(fixture(arch, "hf"), tmp_path / "a", seed=8, **kw)
    gguf = convert(d, fixture(arch), tmp_path / "a.gguf")
    resize(gguf, tmp_path / "r", rank=8, base=fixture(arch))
    tokens = token_ids(383, 64, seed=8)
    m = compare(peft_logits(fixture(arch, "hf"), d, tokens), peft_logits(fixture(arch, "hf"), tmp_path / "r", tokens))
    assert m["mean_kl"] <= 1e-8 and m["top1"] == 1.0, m


def test_cli_and_errors(tmp_path, capsys):
    d = make_peft_adapter(fixture("llama", "hf"), tmp_path / "a", seed=9, r=4, lora_alpha=8, target_modules=["q_proj"])
    capsys.readouterr()
    assert main(["resize", str(d), "--rank", "2", "-o", str(tmp_path / "r")]) == 0
    assert "energy kept" in capsys.readouterr().out
    bad = [["resize", str(d), "-o", str(tmp_path / "x")],  # neither --rank nor --energy
           ["resize", str(d), "--rank", "2", "--energy", "0.9", "-o", str(tmp_path / "x")],
           ["resize", str(d), "--energy", "1.5", "-o", str(tmp_path / "x")],
           ["resize", str(d), "--rank", "2", "-o", str(tmp_path / "x.gguf")],  # GGUF out needs --base
           ["resize", str(d), "--rank", "2", "-o", str(tmp_path / "r")],  # exists, no --force
           ["resize", str(d), "--rank", "2", "-o", str(tmp_path / "y.gguf"), "--base", str(fixture("qwen3"))]]
    for args in bad:
        assert main(args) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), (args, err)
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.gguf").exists() and not (tmp_path / "y.gguf").exists()
