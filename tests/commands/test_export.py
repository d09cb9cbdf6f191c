"""`lora2gguf export`: GGUF LoRA → PEFT directory, loaded by the real peft library."""

import json

import numpy as np
import pytest

from conftest import fixture, token_ids
from lora2gguf.adapters.peft import load_peft
from lora2gguf.cli import main
from lora2gguf.commands.convert import convert
from lora2gguf.errors import Lora2GGUFError
from lora2gguf.commands.export import export
from lora2gguf.parity.metrics import compare
from lora2gguf.llamacpp.runtime import LlamaRuntime
from peft_helpers import make_peft_adapter, peft_logits
from test_gguf_lora import assert_same_deltas, rewrite_gguf, shuffled_base
from test_convert import CASES


@pytest.mark.parametrize("case", ["llama-patterns", "llama-embed-head", "llama-layers", "qwen2-rslora-patterns",
                                  "qwen3-embed-head"])
def test_peft_gguf_peft_round_trip(case, tmp_path):
    arch, kw = CASES[case]
    original = make_peft_adapter(fixture(arch, "hf"), tmp_path / "a", seed=30, **kw)
    gguf = convert(original, fixture(arch), tmp_path / "a.gguf")
    exported = export(gguf, fixture(arch), tmp_path / "exported")
    assert sorted(p.name for p in exported.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert_same_deltas(load_peft(exported), load_peft(original))
    tokens = token_ids(383, 64, seed=30)
    theirs = peft_logits(fixture(arch, "hf"), original, tokens)
    ours = peft_logits(fixture(arch, "hf"), exported, tokens)
    m = compare(theirs, ours)
    assert m["mean_kl"] <= 1e-8 and m["top1"] == 1.0, m


def test_rank_pattern_in_config(tmp_path):
    arch, kw = CASES["llama-patterns"]
    original = make_peft_adapter(fixture(arch, "hf"), tmp_path / "a", seed=31, **kw)
    exported = export(convert(original, fixture(arch), tmp_path / "a.gguf"), fixture(arch), tmp_path / "e")
    cfg = json.loads((exported / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16.0 and not cfg["use_rslora"]
    assert sorted(cfg["rank_pattern"].values()) == [2, 4, 4, 6]  # v_proj ×2, layer 1 q_proj, layer 0 down_proj
    assert len(cfg["target_modules"]) == 10  # exact module paths: PEFT adapts nothing else


@pytest.mark.parametrize("alpha", [0.0, 5.0], ids=["alpha0", "alpha5"])
def test_export_keeps_llama_cpp_meaning(alpha, tmp_path):
    """A GGUF whose alpha is not what PEFT had (alpha 0 = scale 1, or another alpha): the exported PEFT
    adapter reproduces what llama.cpp computes with that file."""
    arch, kw = CASES["llama-patterns"]
    original = make_peft_adapter(fixture(arch, "hf"), tmp_path / "a", seed=32, b_std=0.03, **kw)
    gguf = rewrite_gguf(convert(original, fixture(arch), tmp_path / "a.gguf"), tmp_path / "b.gguf", alpha=alpha)
    exported = export(gguf, fixture(arch), tmp_path / "e")
    tokens = token_ids(383, 64, seed=32)
    with LlamaRuntime(fixture(arch)) as rt:
        rt.set_adapters([(gguf, 1.0)])
        llama = rt.logits(tokens)
    m = compare(llama, peft_logits(fixture(arch, "hf"), exported, tokens))
    assert m["mean_kl"] <= 1e-5 and m["top1"] == 1.0, m


def test_output_rules(tmp_path, capsys):
    original = make_peft_adapter(fixture("qwen3", "hf"), tmp_path / "a", seed=33, r=4, lora_alpha=8, target_modules=["q_proj"])
    gguf = convert(original, fixture("qwen3"), tmp_path / "a.gguf")
    out = tmp_path / "e"
    base = str(fixture("qwen3"))
    assert main(["export", str(gguf), "--base", base, "-o", str(out)]) == 0
    first = (out / "adapter_model.safetensors").read_bytes()
    assert main(["export", str(gguf), "--base", base, "-o", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["export", str(gguf), "--base", base, "-o", str(out), "--force"]) == 0
    assert (out / "adapter_model.safetensors").read_bytes() == first
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".e.")], "temp dirs cleaned up"
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    capsys.readouterr()
    assert main(["export", str(gguf), "--base", base, "-o", str(other), "--force"]) == 2
    assert "not an adapter directory" in capsys.readouterr().err and (other / "keep.txt").is_file()
    assert main(["export", str(gguf), "--base", base, "-o", str(tmp_path), "--force"]) == 2
    assert "holds an input" in capsys.readouterr().err and gguf.is_file()


def test_wrong_base_refused(tmp_path):
    original = make_peft_adapter(fixture("llama", "hf"), tmp_path / "a", seed=34, r=4, lora_alpha=8, target_modules=["k_proj"])
    gguf = convert(original, fixture("llama"), tmp_path / "a.gguf")
    with pytest.raises(Lora2GGUFError, match="another base"):
        export(gguf, shuffled_base("llama", tmp_path / "other.gguf"), tmp_path / "e")
    with pytest.raises(Lora2GGUFError, match="arch mismatch"):
        export(gguf, fixture("qwen3"), tmp_path / "e")
    assert not (tmp_path / "e").exists()
    export(gguf, fixture("llama", "q4_k_m"), tmp_path / "e")  # the same model quantized is fine
    assert np.isfinite(load_peft(tmp_path / "e").modules["model.layers.0.self_attn.k_proj"].delta()).all()
