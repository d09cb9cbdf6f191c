"""`lora2gguf convert`: adapters made by the real peft library, converted, loaded by llama.cpp
(llama-cpp-python) on the F32 base, compared with the PyTorch reference (PEFT's math) and with
transformers + PEFT themselves."""

import json
import os
import pickle
import shutil

import numpy as np
import pytest

from conftest import TEXT, fixture, reference_logits, token_ids
from lora2gguf.adapters.peft import load_peft
from lora2gguf.weights.base_model import open_base
from lora2gguf.cli import main
from lora2gguf.commands.convert import convert
from lora2gguf.errors import Lora2GGUFError
from lora2gguf.fileio.gguf_read import GGUFFile
from lora2gguf.parity.metrics import compare
from lora2gguf.parity.reference import reference_model
from lora2gguf.llamacpp.runtime import LlamaRuntime
from peft_helpers import make_peft_adapter, peft_logits

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# (arch, LoraConfig kwargs): every feature on at least one arch, llama (permuted q/k) on all of them.
CASES = {
    "llama-all-r8": ("llama", dict(r=8, lora_alpha=16, target_modules=ALL)),
    "llama-qv-r3": ("llama", dict(r=3, lora_alpha=5, target_modules=["q_proj", "v_proj"])),
    "llama-rslora": ("llama", dict(r=16, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "k_proj", "o_proj", "down_proj"])),
    "llama-patterns": ("llama", dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"],
                                     rank_pattern={"v_proj": 4, r"layers\.1\.self_attn\.q_proj": 2, "model.layers.0.mlp.down_proj": 6},
                                     alpha_pattern={"up_proj": 3, r"layers\.0\.self_attn\.k_.*": 32})),
    "llama-layers": ("llama", dict(r=4, lora_alpha=8, target_modules=["k_proj", "gate_proj"], layers_to_transform=[1])),
    "llama-embed-head": ("llama", dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "lm_head", "o_proj"])),
    "qwen2-all-r8": ("qwen2", dict(r=8, lora_alpha=16, target_modules=ALL)),
    "qwen2-rslora-patterns": ("qwen2", dict(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "k_proj", "v_proj", "up_proj"],
                                            rank_pattern={"k_proj": 2}, alpha_pattern={r"layers\.1\.mlp\.up_proj": 4})),
    "qwen2-layers": ("qwen2", dict(r=4, lora_alpha=4, target_modules=["gate_proj", "up_proj", "down_proj"], layers_to_transform=[0])),
    "qwen3-rslora-all": ("qwen3", dict(r=4, lora_alpha=16, use_rslora=True, target_modules=ALL)),
    "qwen3-patterns": ("qwen3", dict(r=6, lora_alpha=12, target_modules=["q_proj", "k_proj", "o_proj"],
                                     rank_pattern={"o_proj": 2}, alpha_pattern={"q_proj": 1})),
    "qwen3-embed-head": ("qwen3", dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "lm_head", "v_proj"])),
    # Gemma: 1 + w norms, sqrt(n_embd) embedding scale, windowed local layers (the 96-token texts cross them)
    "gemma3-all-r8": ("gemma3", dict(r=8, lora_alpha=16, target_modules=ALL)),
    "gemma3-rslora-patterns": ("gemma3", dict(r=8, lora_alpha=16, use_rslora=True, target_modules=ALL,
                                              rank_pattern={"v_proj": 4, r"layers\.1\.mlp\.up_proj": 2},
                                              alpha_pattern={"o_proj": 3, "down_proj": 40})),
    "gemma2-all-r4": ("gemma2", dict(r=4, lora_alpha=8, target_modules=ALL)),
    "gemma2-rslora-patterns": ("gemma2", dict(r=8, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "k_proj", "gate_proj"],
                                              rank_pattern={"k_proj": 2}, alpha_pattern={"gate_proj": 24})),
    # Phi-3: fused qkv_proj / gate_up_proj (PEFT's targets on that arch), rope on half of each head
    "phi3-all-r8": ("phi3", dict(r=8, lora_alpha=16, target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])),
    "phi3-rslora-patterns": ("phi3", dict(r=8, lora_alpha=16, use_rslora=True, target_modules="all-linear",
                                          rank_pattern={"qkv_proj": 4, r"layers\.1\.mlp\.gate_up_proj": 2},
                                          alpha_pattern={"o_proj": 3})),
    "gemma2-layers": ("gemma2", dict(r=8, lora_alpha=16, target_modules=["v_proj", "o_proj", "down_proj"], layers_to_transform=[1])),
}


@pytest.fixture(scope="module")
def runtime():
    """One llama.cpp model per arch for the whole module; adapters are swapped with set_adapters."""
    cache = {}

    def get(arch):
        if arch not in cache:
            cache[arch] = LlamaRuntime(fixture(arch))
        return cache[arch]

    yield get
    for rt in cache.values():
        rt.close()


def llama_logits(rt, adapter_path, tokens, scale=1.0):
    rt.set_adapters([(adapter_path, scale)])
    try:
        return rt.logits(tokens)
    finally:
        rt.set_adapters([])


def ref_logits(base_path, adapter_dir, tokens, scale=1.0):
    with open_base(base_path) as b:
        return reference_logits(reference_model(b, [(load_peft(adapter_dir), scale)]), tokens)


@pytest.mark.parametrize("case", CASES)
def test_convert_matches_reference_and_peft(case, tmp_path, runtime):
    arch, kw = CASES[case]
    adapter_dir = make_peft_adapter(fixture(arch, "hf"), tmp_path / "a", seed=len(case), b_std=0.05, **kw)
    out = convert(adapter_dir, fixture(arch), tmp_path / "a.gguf")
    rt = runtime(arch)
    tokens = token_ids(rt.n_vocab, 64, seed=4)
    base = rt.logits(tokens)
    ours = llama_logits(rt, out, tokens)
    assert compare(base, ours)["mean_kl"] > 1e-2, "the adapter must visibly change the output"
    for name, theirs in (("reference", ref_logits(fixture(arch), adapter_dir, tokens)),
                         ("peft", peft_logits(fixture(arch, "hf"), adapter_dir, tokens))):
        m = compare(theirs, ours)
        print(case, name, m)
        assert m["mean_kl"] <= 1e-5 and m["top1"] == 1.0, (name, m)


def test_user_scale_is_linear(tmp_path, runtime):
    """llama.cpp's --lora-scaled multiplies the update: check against the reference at scale 0.5."""
    adapter_dir = make_peft_adapter(fixture("llama", "hf"), tmp_path / "a", seed=5, r=4, lora_alpha=8, use_rslora=True,
                                    target_modules=["q_proj", "down_proj"])
    out = convert(adapter_dir, fixture("llama"), tmp_path / "a.gguf")
    tokens = token_ids(383, 48, seed=5)
    m = compare(ref_logits(fixture("llama"), adapter_dir, tokens, 0.5), llama_logits(runtime("llama"), out, tokens, 0.5))
    assert m["mean_kl"] <= 1e-5 and m["top1"] == 1.0, m


def test_metadata_and_fold(tmp_path):
    kw = CASES["llama-patterns"][1]
    adapter_dir = make_peft_adapter(fixture("llama", "hf"), tmp_path / "a", seed=1, **kw)
    out = convert(adapter_dir, fixture("llama", "q4_k_m"), tmp_path / "a.gguf")  # any quantization as --base
    with GGUFFile(out) as f:
        assert f.get("general.type") == "adapter" and f.get("adapter.type") == "lora"
        assert f.get("general.architecture") == "llama" and f.get("adapter.lora.alpha") == 16.0
        assert list(f.get("lora2gguf.ranks")) == [2, 4, 6, 8]
        assert json.loads(f.get("lora2gguf.peft_config"))["rank_pattern"] == kw["rank_pattern"]
        assert f.get("lora2gguf.base.name") == "tiny-llama" and len(f.get("lora2gguf.base.fingerprint")) == 16
        folded = set(f.get("lora2gguf.scale_folded"))
        # alpha_pattern changed up_proj (both layers) and layer 0's k_proj; ranks alone change nothing
        assert folded == {"blk.0.ffn_up.weight", "blk.1.ffn_up.weight", "blk.0.attn_k.weight"}
        assert {t.type.name for t in f.tensors.values()} == {"F32"}


def test_plain_lora_not_rescaled(tmp_path):
    """Where llama.cpp's alpha / r already equals PEFT's scale, lora_b is written untouched."""
    adapter_dir = make_peft_adapter(fixture("qwen3", "hf"), tmp_path / "a", seed=2, r=5, lora_alpha=7, target_modules=ALL)
    out = convert(adapter_dir, fixture("qwen3"), tmp_path / "a.gguf")
    peft = load_peft(adapter_dir)
    with GGUFFile(out) as f:
        assert list(f.get("lora2gguf.scale_folded", [])) == []
        m = peft.modules["model.layers.1.mlp.down_proj"]
        assert np.array_equal(f.tensor("blk.1.ffn_down.weight.lora_b"), m.B)
        assert np.array_equal(f.tensor("blk.1.ffn_down.weight.lora_a"), m.A)


def test_hf_dir_as_base_gives_same_file(tmp_path):
    adapter_dir = make_peft_adapter(fixture("llama", "hf"), tmp_path / "a", seed=3, r=4, lora_alpha=8,
                                    target_modules=["q_proj", "k_proj", "embed_tokens"])
    a = convert(adapter_dir, fixture("llama"), tmp_path / "a.gguf")
    b = convert(adapter_dir, fixture("llama", "hf") / "config.json", tmp_path / "b.gguf")
    with GGUFFile(a) as fa, GGUFFile(b) as fb:
        assert set(fa.tensors) == set(fb.tensors)
        assert all(np.array_equal(fa.raw(n), fb.raw(n)) for n in fa.tensors)


# -- output types ---------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_outtypes(arch, tmp_path, runtime):
    """f16 / bf16 / q8_0 adapters: the extra KL over the f32 file (printed; f16 must stay ≤ 1e-4)."""
    adapter_dir = make_peft_adapter(fixture(arch, "hf"), tmp_path / "a", seed=6, b_std=0.05, r=32, lora_alpha=32,
                                    target_modules=ALL, rank_pattern={"v_proj": 8})
    rt = runtime(arch)
    tokens = token_ids(rt.n_vocab, 64, seed=6)
    f32 = llama_logits(rt, convert(adapter_dir, fixture(arch), tmp_path / "f32.gguf"), tokens)
    kl = {}
    for outtype in ("f16", "bf16", "q8_0"):
        out = convert(adapter_dir, fixture(arch), tmp_path / f"{outtype}.gguf", outtype=outtype)
        with GGUFFile(out) as f:
            types = {n: t.type.name for n, t in f.tensors.items()}
        if outtype == "q8_0":  # rank 32 rows fit Q8_0 blocks; rank 8 (v_proj's lora_b) falls back to F16
            assert types["blk.0.attn_q.weight.lora_b"] == "Q8_0" and types["blk.0.attn_v.weight.lora_b"] == "F16"
        else:
            assert set(types.values()) == {outtype.upper()}
        kl[outtype] = compare(f32, llama_logits(rt, out, tokens))
        print(arch, outtype, kl[outtype])
    assert kl["f16"]["mean_kl"] <= 1e-4 and kl["f16"]["top1"] == 1.0
    assert 0 < kl["f16"]["mean_kl"] < kl["bf16"]["mean_kl"] <= 1e-2  # bf16 keeps 8 bits of mantissa, f16 11
    assert kl["q8_0"]["mean_kl"] <= 1e-2


# -- fan_in_fan_out -------------------------------------------------------------------------------
def test_fan_in_fan_out_flag_follows_peft(tmp_path, runtime):
    """PEFT resets fan_in_fan_out to False on nn.Linear (with a warning) when it loads the adapter, so a
    config that says True applies the factors as stored. Convert must do the same; non-square k/v
    show that nothing gets transposed."""
    adapter_dir = make_peft_adapter(fixture("llama", "hf"), tmp_path / "a", seed=7, r=4, lora_alpha=8,
                                    target_modules=["q_proj", "k_proj", "v_proj"])
    cfg_path = adapter_dir / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["fan_in_fan_out"] = True
    cfg_path.write_text(json.dumps(cfg))
    out = convert(adapter_dir, fixture("llama"), tmp_path / "a.gguf")
    tokens = token_ids(383, 48, seed=7)
    theirs = peft_logits(fixture("llama", "hf"), adapter_dir, tokens)
    m = compare(theirs, llama_logits(runtime("llama"), out, tokens))
    assert m["mean_kl"] <= 1e-5 and m["top1"] == 1.0, m


# -- .bin adapters --------------------------------------------------------------------------------
def test_bin_adapter_same_as_safetensors(tmp_path):
    import torch
    from safetensors.torch import load_file

    adapter_dir = make_peft_adapter(fixture("qwen2", "hf"), tmp_path / "a", seed=8, r=4, lora_alpha=8, target_modules=["q_proj"])
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shutil.copy(adapter_dir / "adapter_config.json", bin_dir)
    torch.save(load_file(adapter_dir / "adapter_model.safetensors"), bin_dir / "adapter_model.bin")
    a = convert(adapter_dir, fixture("qwen2"), tmp_path / "a.gguf")
    b = convert(bin_dir, fixture("qwen2"), tmp_path / "b.gguf")
    with GGUFFile(a) as fa, GGUFFile(b) as fb:
        assert set(fa.tensors) == set(fb.tensors) and all(np.array_equal(fa.raw(n), fb.raw(n)) for n in fa.tensors)


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['EVIL_MARKER']}",))


def test_bin_pickle_that_runs_code_is_refused(tmp_path, monkeypatch):
    adapter_dir = make_peft_adapter(fixture("llama", "hf"), tmp_path / "a", seed=9, r=2, lora_alpha=4, target_modules=["q_proj"])
    (adapter_dir / "adapter_model.safetensors").unlink()
    marker = tmp_path / "pwned"
    monkeypatch.setenv("EVIL_MARKER", str(marker))
    with open(adapter_dir / "adapter_model.bin", "wb") as fh:
        pickle.dump({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": _Evil()}, fh)
    with pytest.raises(Lora2GGUFError, match="refused to load"):
        convert(adapter_dir, fixture("llama"), tmp_path / "a.gguf")
    assert not marker.exists(), "the pickle's code ran"
    assert not (tmp_path / "a.gguf").exists()


# -- refusals -------------------------------------------------------------------------------------
def _edit_tensors(adapter_dir, fn):
    from safetensors.numpy import save_file

    from lora2gguf.fileio.tensors import read_safetensors_f32

    path = adapter_dir / "adapter_model.safetensors"
    save_file(fn(read_safetensors_f32(path)), str(path))


def _rename_module(old, new):
    return lambda t: {k.replace(old, new): v for k, v in t.items()}


def _narrow_inputs(t):  # a lora_A with 32 input columns instead of the base's 64
    return {k: (v[:, :32].copy() if "lora_A" in k else v) for k, v in t.items()}


REFUSALS = {
    "dora": ("qwen2", dict(r=4, lora_alpha=8, target_modules=["v_proj"], use_dora=True), None, "DoRA.*lora2gguf merge"),
    "modules_to_save": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["model.norm"]), None,
                        "modules_to_save.*lora2gguf merge"),
    "lora_bias": ("qwen3", dict(r=4, lora_alpha=8, target_modules=["o_proj"], lora_bias=True), None, "LoRA bias.*lora2gguf merge"),
    "trained_bias": ("qwen2", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], bias="lora_only"), None,
                     "trained biases.*lora2gguf merge"),
    "lm_head_tied": ("qwen2", dict(r=4, lora_alpha=8, target_modules=["lm_head"]), None, "ties lm_head"),
    "embed_tied": ("qwen2", dict(r=4, lora_alpha=8, target_modules=["embed_tokens"]), None, "ties the output head"),
    "unknown_target": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj"]), _rename_module("self_attn.q_proj", "mlp.fc_in"),
                       "no GGUF tensor"),
    "beyond_layers": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj"]), _rename_module("layers.1.", "layers.7."),
                      "beyond the 2 layers"),
    "shape": ("llama", dict(r=4, lora_alpha=8, target_modules=["down_proj"]), _narrow_inputs, "changes a 64x32 weight"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_refusals(case, tmp_path, capsys):
    arch, kw, edit, message = REFUSALS[case]
    adapter_dir = make_peft_adapter(fixture(arch, "hf"), tmp_path / "a", seed=10, **kw)
    if edit:
        _edit_tensors(adapter_dir, edit)
    out = tmp_path / "a.gguf"
    with pytest.raises(Lora2GGUFError, match=message):
        convert(adapter_dir, fixture(arch), out)
    capsys.readouterr()
    assert main(["convert", str(adapter_dir), "--base", str(fixture(arch)), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert not out.exists() and not list(tmp_path.glob(".a.gguf*")), "nothing written"


def test_arch_mismatch_refused(tmp_path):
    """A qwen3 adapter has the same shapes as a llama one here; PEFT's recorded class tells them apart."""
    adapter_dir = make_peft_adapter(fixture("qwen3", "hf"), tmp_path / "a", seed=11, r=4, lora_alpha=8, target_modules=["q_proj"])
    with pytest.raises(Lora2GGUFError, match="Qwen3ForCausalLM.*llama model"):
        convert(adapter_dir, fixture("llama"), tmp_path / "a.gguf")


@pytest.mark.parametrize("key,value,message", [
    ("layer_replication", [[0, 2], [1, 2]], "layer replication"),
    ("alora_invocation_tokens", ["x"], "list of token ids"),
    ("invocation_string", "<|assistant|>", "no alora_invocation_tokens"),
    ("peft_type", "IA3", "not LoRA"),
])
def test_config_features_refused(tmp_path, key, value, message):
    adapter_dir = make_peft_adapter(fixture("llama", "hf"), tmp_path / "a", seed=12, r=2, lora_alpha=4, target_modules=["v_proj"])
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    cfg[key] = value
    (adapter_dir / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(Lora2GGUFError, match=message):
        convert(adapter_dir, fixture("llama"), tmp_path / "a.gguf")


def test_missing_and_corrupt_inputs(tmp_path, capsys):
    adapter_dir = make_peft_adapter(fixture("llama", "hf"), tmp_path / "a", seed=13, r=2, lora_alpha=4, target_modules=["v_proj"])
    out = tmp_path / "o.gguf"
    cases = []
    cases.append(([str(tmp_path / "nope"), "--base", str(fixture("llama"))], "no such file or directory"))
    cases.append(([str(adapter_dir), "--base", str(tmp_path / "nobase.gguf")], "no such file"))
    cases.append(([str(adapter_dir), "--base", str(fixture("llama")), "--outtype", "q4_0"], "Invalid value"))
    broken = tmp_path / "broken"
    shutil.copytree(adapter_dir, broken)
    data = (broken / "adapter_model.safetensors").read_bytes()
    (broken / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    cases.append(([str(broken), "--base", str(fixture("llama"))], "not a readable safetensors"))
    noconf = tmp_path / "noconf"
    shutil.copytree(adapter_dir, noconf)
    (noconf / "adapter_config.json").unlink()
    cases.append(([str(noconf), "--base", str(fixture("llama"))], "no adapter_config.json"))
    truncated = tmp_path / "trunc.gguf"
    truncated.write_bytes(fixture("llama").read_bytes()[:5000])
    cases.append(([str(adapter_dir), "--base", str(truncated)], "truncated"))
    for args, message in cases:
        assert main(["convert", *args, "-o", str(out)]) == 2, args
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (args, err)
        assert not out.exists()


def test_cli_force_and_output_rules(tmp_path, capsys):
    adapter_dir = make_peft_adapter(fixture("llama", "hf"), tmp_path / "a", seed=14, r=2, lora_alpha=4, target_modules=["v_proj"])
    out = tmp_path / "o.gguf"
    out.write_bytes(b"keep me")
    args = ["convert", str(adapter_dir), "--base", str(fixture("llama")), "-o", str(out)]
    assert main(args) == 2 and "--force" in capsys.readouterr().err
    assert out.read_bytes() == b"keep me"
    assert main(args + ["--force"]) == 0 and "wrote" in capsys.readouterr().out
    with GGUFFile(out) as f:
        assert f.get("general.type") == "adapter"
    assert main(["convert", str(adapter_dir), "--base", str(out), "-o", str(out), "--force"]) == 2
    assert "also an input" in capsys.readouterr().err
    assert main(["convert", str(adapter_dir), "--base", str(out), "-o", str(tmp_path / "x.gguf")]) == 2
    assert "LoRA adapter, not a base model" in capsys.readouterr().err


def test_convert_does_not_import_torch_or_transformers(tmp_path):
    """The convert path stays light: no torch, no transformers (checked in a fresh interpreter)."""
    import subprocess
    import sys

    adapter_dir = make_peft_adapter(fixture("llama", "hf"), tmp_path / "a", seed=15, r=2, lora_alpha=4, target_modules=["v_proj"])
    code = ("import sys; from lora2gguf.cli import main; "
            f"rc = main(['convert', {str(adapter_dir)!r}, '--base', {str(fixture('llama'))!r}, '-o', {str(tmp_path / 'o.gguf')!r}]); "
            "print(rc, 'torch' in sys.modules, 'transformers' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.split() == ["wrote", str(tmp_path / "o.gguf"), "0", "False", "False"], r.stdout + r.stderr


# -- SmolLM2 (real model) -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2_adapter(smollm2_hf, tmp_path_factory):
    """One real r=16 all-linear adapter; the rsLoRA variant is the same tensors with use_rslora set,
    which is all rsLoRA changes (PEFT then scales by alpha / sqrt(r) = 8 instead of alpha / r = 2)."""
    root = tmp_path_factory.mktemp("smollm2")
    plain = make_peft_adapter(smollm2_hf, root / "plain", seed=16, b_std=0.02, r=16, lora_alpha=32, target_modules="all-linear")
    rs = root / "rslora"
    shutil.copytree(plain, rs)
    cfg = json.loads((rs / "adapter_config.json").read_text())
    cfg["use_rslora"] = True
    (rs / "adapter_config.json").write_text(json.dumps(cfg))
    return {"plain": plain, "rslora": rs}


@pytest.fixture(scope="module")
def smollm2_runtime(smollm2_f32):
    """SmolLM2 loaded once in llama.cpp, with its base logits on the test tokens."""
    with LlamaRuntime(smollm2_f32) as rt:
        tokens = rt.tokenize(TEXT)[:40]
        yield rt, tokens, rt.logits(tokens)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["plain", "rslora"])
def test_smollm2(kind, smollm2_f32, smollm2_hf, smollm2_adapter, smollm2_runtime, tmp_path):
    adapter_dir = smollm2_adapter[kind]
    out = convert(adapter_dir, smollm2_f32, tmp_path / "a.gguf")
    rt, tokens, base = smollm2_runtime
    ours = llama_logits(rt, out, tokens)
    assert compare(base, ours)["mean_kl"] > 1e-2
    for name, theirs in (("reference", ref_logits(smollm2_f32, adapter_dir, tokens)),
                         ("peft", peft_logits(smollm2_hf, adapter_dir, tokens))):
        m = compare(theirs, ours)
        print("smollm2", kind, name, m)
        assert m["mean_kl"] <= 1e-5 and m["top1"] == 1.0, (name, m)
