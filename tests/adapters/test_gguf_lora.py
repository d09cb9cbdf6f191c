"""Reading GGUF LoRA files back (ours and llama.cpp's convert_lora_to_gguf.py), their run-time meaning
checked against llama.cpp itself, `inspect` of adapters and the base fingerprint."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ARCHS, TEXT, fixture, reference_logits, token_ids
from llama_cpp_source import llama_cpp_source
from lora2gguf.adapters.peft import load_peft
from lora2gguf.adapters.gguf_lora import load_gguf_lora
from lora2gguf.weights.base_model import open_base
from lora2gguf.cli import main
from lora2gguf.commands.convert import convert
from lora2gguf.errors import Lora2GGUFError
from lora2gguf.fileio.gguf_read import GGUFFile
from lora2gguf.parity.metrics import compare
from lora2gguf.parity.reference import reference_model
from lora2gguf.llamacpp.runtime import LlamaRuntime
from peft_helpers import make_peft_adapter, peft_logits
from test_convert import ALL, CASES


def rewrite_gguf(src, dst, alpha=None, tensor_fn=None):
    """A copy of a GGUF file with adapter.lora.alpha replaced (alpha=0: key dropped, which llama.cpp
    reads as 0) and/or every tensor passed through tensor_fn (F32 files only)."""
    from gguf import GGUFWriter

    from lora2gguf.fileio.gguf_write import PlannedTensor, copy_fields, write_streaming

    with GGUFFile(src) as f:
        w = GGUFWriter(None, f.get("general.architecture"))
        copy_fields(f, w, skip=lambda k: alpha is not None and k == "adapter.lora.alpha")
        if alpha:
            w.add_float32("adapter.lora.alpha", alpha)
        plan = [PlannedTensor(t.name, t.shape, t.type, t.nbytes) for t in f.tensors.values()]
        data = (tensor_fn(f.tensor(t.name)) if tensor_fn else f.raw(t.name) for t in plan)
        write_streaming(Path(dst), w, plan, data)
    return Path(dst)


def shuffled_base(arch_or_path, dst):
    """A model with the base's exact names, shapes and value distribution but other weights (F32 bases:
    a fixture arch name or a path)."""
    rng = np.random.default_rng(0)
    src = arch_or_path if isinstance(arch_or_path, Path) else fixture(arch_or_path)
    return rewrite_gguf(src, dst, tensor_fn=lambda t: rng.permutation(t.reshape(-1)).reshape(t.shape))


def assert_same_deltas(got, want, rtol=1e-5):
    assert set(got.modules) == set(want.modules)
    for name, m in want.modules.items():
        d, g = m.delta().astype(np.float64), got.modules[name].delta().astype(np.float64)
        assert np.abs(g - d).max() <= rtol * np.abs(d).max(), name


@pytest.mark.parametrize("case", ["llama-patterns", "llama-embed-head", "llama-layers", "qwen2-rslora-patterns",
                                  "qwen3-rslora-all", "qwen3-embed-head"])
def test_reads_back_peft_deltas(case, tmp_path):
    arch, kw = CASES[case]
    adapter_dir = make_peft_adapter(fixture(arch, "hf"), tmp_path / "a", seed=20, **kw)
    out = convert(adapter_dir, fixture(arch), tmp_path / "a.gguf")
    with open_base(fixture(arch)) as b:
        back = load_gguf_lora(out, b.spec)
    assert_same_deltas(back, load_peft(adapter_dir))
    if arch != "llama":  # no q/k permutation: the spec is not needed
        assert_same_deltas(load_gguf_lora(out), load_peft(adapter_dir))


def test_reads_quantized_adapter(tmp_path):
    adapter_dir = make_peft_adapter(fixture("qwen3", "hf"), tmp_path / "a", seed=21, r=32, lora_alpha=16, target_modules=ALL)
    out = convert(adapter_dir, fixture("qwen3"), tmp_path / "a.gguf", outtype="q8_0")
    assert_same_deltas(load_gguf_lora(out), load_peft(adapter_dir), rtol=2e-2)


@pytest.mark.parametrize("alpha", [None, 0.0, 3.0], ids=["as-converted", "alpha0", "alpha3"])
def test_semantics_match_llama_cpp(alpha, tmp_path):
    """The reference built from load_gguf_lora's modules reproduces llama.cpp running the same file,
    including mixed ranks and alpha 0 (scale 1)."""
    arch, kw = CASES["llama-patterns"]
    adapter_dir = make_peft_adapter(fixture(arch, "hf"), tmp_path / "a", seed=22, b_std=0.03, **kw)
    path = convert(adapter_dir, fixture(arch), tmp_path / "a.gguf")
    if alpha is not None:
        path = rewrite_gguf(path, tmp_path / "b.gguf", alpha=alpha)
    tokens = token_ids(383, 64, seed=22)
    with open_base(fixture(arch)) as b:
        back = load_gguf_lora(path, b.spec)
        ref = reference_logits(reference_model(b, [(back, 1.0)]), tokens)
    if alpha == 0.0:
        assert {m.scale for m in back.modules.values()} == {1.0}
    with LlamaRuntime(fixture(arch)) as rt:
        rt.set_adapters([(path, 1.0)])
        m = compare(ref, rt.logits(tokens))
    assert m["mean_kl"] <= 1e-5 and m["top1"] == 1.0, m


# -- llama.cpp's own converter ---------------------------------------------------------------------
def llama_cpp_convert(adapter_dir, hf_dir, out):
    """Run llama.cpp's convert_lora_to_gguf.py offline. These tests back the README's headline claim, so
    a missing llama.cpp source fails them, unless LORA2GGUF_TESTS_OFFLINE=1 says that no download is
    possible here (then they skip, saying so)."""
    src = llama_cpp_source()
    if src is None:
        why = "llama.cpp's source could not be had (pip download of the llama-cpp-python sdist failed)"
        if os.environ.get("LORA2GGUF_TESTS_OFFLINE", "") not in ("", "0"):
            pytest.skip(f"{why}; LORA2GGUF_TESTS_OFFLINE is set")
        pytest.fail(f"{why}; set LLAMA_CPP_DIR to a llama.cpp tree, or LORA2GGUF_TESTS_OFFLINE=1 to skip")
    script = src / "convert_lora_to_gguf.py"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    r = subprocess.run([sys.executable, str(script), "--base", str(hf_dir), "--outtype", "f32", "--outfile", str(out),
                        str(adapter_dir)], capture_output=True, text=True, env=env, timeout=600)
    if r.returncode != 0 or not Path(out).is_file():
        pytest.fail(f"llama.cpp's converter failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
    return Path(out)


@pytest.mark.parametrize("arch,targets", [("llama", ALL + ["embed_tokens", "lm_head"]), ("qwen2", ["q_proj", "k_proj", "down_proj"])])
def test_llama_cpp_converter_file(arch, targets, tmp_path, capsys):
    adapter_dir = make_peft_adapter(fixture(arch, "hf"), tmp_path / "a", seed=23, r=4, lora_alpha=8, target_modules=targets)
    theirs = llama_cpp_convert(adapter_dir, fixture(arch, "hf"), tmp_path / "theirs.gguf")
    with open_base(fixture(arch)) as b:
        assert_same_deltas(load_gguf_lora(theirs, b.spec), load_peft(adapter_dir), rtol=1e-6)
    # for plain LoRA ours writes the very same tensors, byte for byte
    ours = convert(adapter_dir, fixture(arch), tmp_path / "ours.gguf")
    with GGUFFile(theirs) as ft, GGUFFile(ours) as fo:
        assert set(ft.tensors) == set(fo.tensors)
        assert all(np.array_equal(ft.raw(n), fo.raw(n)) for n in ft.tensors)
        assert ft.get("adapter.lora.alpha") == fo.get("adapter.lora.alpha")
    capsys.readouterr()
    assert main(["inspect", str(theirs), "--base", str(fixture(arch)), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["provenance"] is None and info["base_check"]["match"] is None


# -- inspect and the base fingerprint -------------------------------------------------------------
@pytest.fixture(scope="module")
def llama_adapter(tmp_path_factory):
    d = tmp_path_factory.mktemp("inspect")
    adapter_dir = make_peft_adapter(fixture("llama", "hf"), d / "a", seed=24, r=8, lora_alpha=16, use_rslora=True,
                                    target_modules=["q_proj", "v_proj", "lm_head"], rank_pattern={"v_proj": 4})
    return convert(adapter_dir, fixture("llama"), d / "a.gguf"), d


def inspect_json(capsys, *args):
    capsys.readouterr()
    assert main(["inspect", *map(str, args), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_inspect_adapter(llama_adapter, capsys):
    path, _ = llama_adapter
    info = inspect_json(capsys, path)
    assert info["kind"] == "gguf-adapter" and info["lora_alpha"] == 16.0 and info["ranks"] == [4, 8]
    assert info["targets"] == ["attn_q", "attn_v", "output"] and info["layers"] == [0, 1]
    assert info["llama_cpp_scales"] == [2.0, 4.0]  # llama.cpp's alpha / r; PEFT's rsLoRA scale is folded into lora_b
    prov = info["provenance"]
    assert prov["base.name"] == "tiny-llama" and prov["peft_config"]["use_rslora"] is True
    assert prov["target_modules"] == ["lm_head", "q_proj", "v_proj"] and prov["version"]
    assert "base_check" not in info


@pytest.mark.parametrize("kind", ["f32", "f16", "q8_0", "q4_k_m", "hf"])
def test_inspect_base_matches_other_precisions(kind, llama_adapter, capsys):
    path, _ = llama_adapter
    check = inspect_json(capsys, path, "--base", fixture("llama", kind))["base_check"]
    assert check["match"] is True and check["min_correlation"] >= 0.99, check


def test_inspect_base_mismatch(llama_adapter, capsys):
    path, d = llama_adapter
    other = shuffled_base("llama", d / "shuffled.gguf")
    with open_base(other) as b, open_base(fixture("llama")) as a:
        assert b.spec == a.spec  # same shapes and metadata: only the weights differ
    check = inspect_json(capsys, path, "--base", other)["base_check"]
    assert check["match"] is False and "different weights" in check["verdict"] and check["min_correlation"] < 0.5
    check = inspect_json(capsys, path, "--base", fixture("qwen3"))["base_check"]
    assert check["match"] is False and "arch mismatch" in check["verdict"]


@pytest.mark.slow
def test_smollm2_fingerprint(smollm2_f32, smollm2_hf):
    """The real model: the Q4_1 original, its F32 copy and the HF dir are one base; the tiny fixture is not."""
    from lora2gguf.weights import fingerprint
    from lora2gguf.weights.real_models import smollm2_gguf

    fps = []
    for path in (smollm2_f32, smollm2_gguf(), smollm2_hf):
        with open_base(path) as b:
            fps.append(fingerprint.fingerprint(b))
    assert all(fingerprint.compare(fps[0], f)["match"] for f in fps[1:])
    with open_base(fixture("llama")) as b:
        assert not fingerprint.compare(fps[0], fingerprint.fingerprint(b))["match"]


# -- errors ---------------------------------------------------------------------------------------
def test_load_errors(llama_adapter, tmp_path):
    path, _ = llama_adapter
    with pytest.raises(Lora2GGUFError, match="not 'adapter'"):
        load_gguf_lora(fixture("llama"))
    with pytest.raises(Lora2GGUFError, match="pass the base model"):
        load_gguf_lora(path)  # llama q/k rows cannot be un-permuted without head counts
    with open_base(fixture("qwen3")) as b, pytest.raises(Lora2GGUFError, match="arch mismatch"):
        load_gguf_lora(path, b.spec)
    bad = rewrite_gguf(path, tmp_path / "bad.gguf")
    data = bytearray(bad.read_bytes())
    (tmp_path / "trunc.gguf").write_bytes(data[: len(data) - 100])
    with pytest.raises(Lora2GGUFError, match="truncated"):
        load_gguf_lora(tmp_path / "trunc.gguf")


# -- every architecture: llama.cpp's converter vs ours on rsLoRA with rank/alpha patterns -----------------
RSLORA_PATTERNS = dict(r=8, lora_alpha=16, use_rslora=True, target_modules="all-linear",
                       rank_pattern={"down_proj": 4}, alpha_pattern={"o_proj": 3})


def converter_kls(hf_dir, base, tmp_path, tokens, kw, n_ctx=512, b_std=0.05):
    """(ours, llama.cpp's converter) mean KL against transformers + PEFT for the same real PEFT adapter, both
    GGUF LoRAs run by llama.cpp on `base`; and how far the adapter moves the base."""
    adapter_dir = make_peft_adapter(hf_dir, tmp_path / "a", seed=31, b_std=b_std, **kw)
    ours = convert(adapter_dir, base, tmp_path / "ours.gguf")
    theirs = llama_cpp_convert(adapter_dir, hf_dir, tmp_path / "theirs.gguf")
    peft = peft_logits(hf_dir, adapter_dir, tokens)
    with LlamaRuntime(base, n_ctx=n_ctx) as rt:
        plain = rt.logits(tokens)
        got = {}
        for name, path in (("ours", ours), ("llama.cpp", theirs)):
            rt.set_adapters([(path, 1.0)])
            got[name] = compare(peft, rt.logits(tokens))
    return got["ours"], got["llama.cpp"], compare(plain, peft)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_arch_rslora_patterns_exact_where_llama_cpp_converter_is_not(arch, tmp_path):
    """The README's per-architecture table: PEFT's per-module scales (rsLoRA, rank/alpha patterns) folded into
    the GGUF make ours match transformers+PEFT on every arch; llama.cpp's converter writes lora_alpha as is."""
    tokens = token_ids(300, 64, seed=12)
    ours, theirs, effect = converter_kls(fixture(arch, "hf"), fixture(arch), tmp_path, tokens, RSLORA_PATTERNS)
    print(f"{arch}: ours KL {ours['mean_kl']:.2g}, llama.cpp's converter KL {theirs['mean_kl']:.3g} "
          f"(top-1 {theirs['top1']:.0%}); adapter effect KL {effect['mean_kl']:.3g}")
    assert effect["mean_kl"] > 1e-2, "the adapter must move the output"
    assert ours["mean_kl"] <= 1e-5 and ours["top1"] == 1.0, ours
    assert theirs["mean_kl"] > 1e-3, theirs


@pytest.mark.slow
@pytest.mark.parametrize("kw", [dict(r=8, lora_alpha=16, target_modules="all-linear"), RSLORA_PATTERNS],
                         ids=["plain", "rslora-patterns"])
def test_gemma3_270m_converters(kw, gemma3_f32, tmp_path):
    """The real Gemma 3 270M (dequantized to F32, its transformers directory made from the same weights)."""
    from peft_helpers import hf_dir_from_base

    hf_dir = hf_dir_from_base(gemma3_f32, gemma3_f32.parent / "gemma-3-270m-hf")
    with LlamaRuntime(gemma3_f32, vocab_only=True) as rt:
        tokens = rt.tokenize(TEXT * 2)[:128]
    # B small enough that the adapter moves the real model by KL ~1, not past all recognition
    ours, theirs, effect = converter_kls(hf_dir, gemma3_f32, tmp_path, tokens, kw, b_std=0.01)
    print(f"gemma3 270m {kw}: ours {ours}, llama.cpp's converter {theirs}, effect {effect}")
    assert effect["mean_kl"] > 1e-2 and ours["mean_kl"] <= 1e-5, (ours, effect)
    if kw.get("use_rslora"):
        assert theirs["mean_kl"] > 1e-2, theirs
    else:  # plain LoRA: llama.cpp's converter is right too
        assert theirs["mean_kl"] <= 1e-4, theirs
