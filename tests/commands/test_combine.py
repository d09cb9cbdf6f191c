"""`lora2gguf combine`: the truth is the weighted sum of the adapters' ΔW from the real PEFT library, and
transformers + PEFT with all adapters active (each scaled) for llama.cpp running the single combined file."""

import numpy as np
import pytest

from conftest import fixture, token_ids
from lora2gguf.adapters.gguf_lora import load_gguf_lora
from lora2gguf.weights.base_model import open_base
from lora2gguf.cli import main
from lora2gguf.commands.combine import combine
from lora2gguf.commands.convert import convert
from lora2gguf.fileio.gguf_read import GGUFFile
from lora2gguf.parity.metrics import compare
from lora2gguf.llamacpp.runtime import LlamaRuntime
from peft_helpers import make_peft_adapter, peft_deltas
from test_merge import peft_multi_logits

# different targets, ranks, rsLoRA and patterns: tensor sets need not match
SPECS = {
    "llama": [dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"],
                   rank_pattern={"v_proj": 4}, alpha_pattern={"down_proj": 3}),
              dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "o_proj", "up_proj"])],
    "qwen3": [dict(r=6, lora_alpha=12, target_modules=["q_proj", "k_proj", "gate_proj"]),
              dict(r=2, lora_alpha=8, use_rslora=True, target_modules=["k_proj", "v_proj", "gate_proj"],
                   layers_to_transform=[1])],
}
SCALES = (0.5, -1.0)


def sum_of_deltas(arch, dirs):
    out = {}
    for d, u in dirs:
        for name, delta in peft_deltas(fixture(arch, "hf"), d, u).items():
            out[name] = out.get(name, 0) + delta
    return out


def make(arch, tmp_path):
    return [(make_peft_adapter(fixture(arch, "hf"), tmp_path / f"a{i}", seed=20 + i, b_std=0.04, **kw), u)
            for i, (kw, u) in enumerate(zip(SPECS[arch], SCALES))]


@pytest.mark.parametrize("arch", list(SPECS))
def test_combine_is_the_weighted_sum(arch, tmp_path):
    dirs = make(arch, tmp_path)
    # one input as a GGUF LoRA made by convert: every input format goes in
    inputs = [(dirs[0][0], dirs[0][1]), (convert(dirs[1][0], fixture(arch), tmp_path / "a1.gguf"), dirs[1][1])]
    out = tmp_path / "c.gguf"
    report = combine(inputs, fixture(arch), out)
    want = sum_of_deltas(arch, dirs)
    with open_base(fixture(arch)) as b:
        got = load_gguf_lora(out, b.spec)
    assert set(got.modules) == set(want)
    for name, delta in want.items():
        np.testing.assert_allclose(got.modules[name].delta(), delta, atol=1e-6 * np.abs(delta).max())
        assert report["modules"][name]["rank"] == sum(report["modules"][name]["ranks"])  # ranks add
    tokens = token_ids(383, 64, seed=21)
    theirs = peft_multi_logits(fixture(arch, "hf"), dirs, tokens)
    with LlamaRuntime(fixture(arch)) as rt:
        base = rt.logits(tokens)
        rt.set_adapters([(out, 1.0)])
        ours = rt.logits(tokens)
    assert compare(base, ours)["mean_kl"] > 1e-2
    m = compare(theirs, ours)
    assert m["mean_kl"] <= 1e-5 and m["top1"] == 1.0, m
    with GGUFFile(out) as f:  # one adapter llama.cpp loads: one alpha, per-tensor ranks
        assert f.get("general.type") == "adapter" and len(np.atleast_1d(f.get("adapter.lora.alpha"))) == 1


def test_rank_recompresses_optimally(tmp_path):
    dirs = make("llama", tmp_path)
    out = tmp_path / "c4.gguf"
    report = combine(dirs, fixture("llama"), out, rank=4)
    want = sum_of_deltas("llama", dirs)
    with open_base(fixture("llama")) as b:
        got = load_gguf_lora(out, b.spec)
    total = kept = 0.0
    for name, delta in want.items():
        u, s, vt = np.linalg.svd(delta, full_matrices=False)
        k = min(4, int((s > s[0] * 1e-5).sum()))
        assert got.modules[name].r == k
        np.testing.assert_allclose(got.modules[name].delta(), (u[:, :k] * s[:k]) @ vt[:k], atol=2e-6 * np.abs(delta).max())
        total, kept = total + (s ** 2).sum(), kept + (s[:k] ** 2).sum()
    assert report["energy_kept"] == pytest.approx(kept / total, rel=1e-6) and report["energy_kept"] < 1


def test_cli_and_errors(tmp_path, capsys):
    dirs = make("llama", tmp_path)
    capsys.readouterr()
    args = ["combine", f"{dirs[0][0]}:0.5", str(dirs[1][0]), "--base", str(fixture("llama"))]
    assert main(args + ["-o", str(tmp_path / "c.gguf")]) == 0
    assert "as one adapter" in capsys.readouterr().out
    for bad in (args + ["-o", str(tmp_path / "c.gguf")],  # exists
                args + ["-o", str(tmp_path / "c-dir")],  # not .gguf
                ["combine", f"{dirs[0][0]}:x", "--base", str(fixture("llama")), "-o", str(tmp_path / "d.gguf")],
                ["combine", str(dirs[0][0]), "--base", str(fixture("qwen2")), "-o", str(tmp_path / "d.gguf")],
                args + ["--rank", "0", "-o", str(tmp_path / "d.gguf")]):
        assert main(bad) == 2, bad
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), (bad, err)
    assert not (tmp_path / "d.gguf").exists()
