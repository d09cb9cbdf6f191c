"""convert on the mixture-of-experts archs (conftest.MOE_ARCHS): adapters made by the real peft on transformers' own
class (Qwen3MoeForCausalLM, MixtralForCausalLM), converted, loaded by
llama.cpp (--lora through llama-cpp-python) and compared with transformers + PEFT, routing-aware (median and mean
per-token KL, share of tokens whose top-k expert set differs). Every adapter is first shown to move the logits.
Expert LoRA (PEFT target_parameters on the fused 3-D experts): each layout test also runs the wrong readings
(lora_B read expert-major; gate and up swapped) and shows them far off, so that the test fails on either."""

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import fixture, token_ids
from moe_helpers import llama_run, reference_run, routed, transformers_run
from peft_helpers import make_peft_adapter, peft_deltas

import lora2gguf.adapters.peft as peft_reader
from lora2gguf import models
from lora2gguf.adapters.load import load_adapter
from lora2gguf.commands.convert import convert
from lora2gguf.errors import Lora2GGUFError
from lora2gguf.parity.metrics import compare
from lora2gguf.parity.reference import reference_model

EXPERT_PARAMS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
TOKENS = token_ids(383, 64, seed=4)


def exact(m: dict) -> bool:
    return m["median_kl"] <= 1e-6 and m["mean_kl"] <= 1e-5 and m["expert_set_mismatch"] == 0.0


def converted_run(arch, adapter_dir, out):
    gguf = convert(adapter_dir, fixture(arch), out)
    return llama_run(fixture(arch), TOKENS, [(gguf, 1.0)])


@pytest.fixture(scope="module")
def base_run(moe_arch):
    return llama_run(fixture(moe_arch), TOKENS)


@pytest.fixture(scope="module")
def expert_adapter(tmp_path_factory, moe_arch):
    """LoRA on both expert parameters of every layer (gate_up fused, down), rank 4, alpha 16."""
    return make_peft_adapter(fixture(moe_arch, "hf"), tmp_path_factory.mktemp("experts") / "a", r=4, lora_alpha=16,
                             b_std=0.2, target_modules=[], target_parameters=EXPERT_PARAMS)


def test_attention_lora_converts_exactly(tmp_path, moe_arch, base_run):
    d = make_peft_adapter(fixture(moe_arch, "hf"), tmp_path / "a", r=4, lora_alpha=8,
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    ours, r_ours = converted_run(moe_arch, d, tmp_path / "a.gguf")
    moved = compare(base_run[0], ours)
    theirs, r_theirs = transformers_run(moe_arch, TOKENS, adapter_dir=d)
    m = routed(theirs, ours, r_theirs, r_ours)
    print("attention LoRA: moved", moved["mean_kl"], "llama.cpp vs transformers+PEFT", m)
    assert moved["mean_kl"] > 1e-2, "the adapter must visibly change the output"
    assert exact(m), m


def test_expert_lora_reader_matches_peft_delta(moe_arch, expert_adapter):
    """The reader's per-expert pairs against PEFT's own ParamWrapper.get_delta_weight (E, out, in): the fused
    gate_up's delta is gate's rows then up's; wrong readings of the same tensors are not."""
    truth = peft_deltas(fixture(moe_arch, "hf"), expert_adapter)  # the outer wrapper is down_proj's, the inner gate_up's
    a = load_adapter(expert_adapter)
    cfg = json.loads((expert_adapter / "adapter_config.json").read_text())
    assert cfg["peft_version"].startswith("0.21.")
    for i in range(2):
        mods = {p: a.modules[f"model.layers.{i}.mlp.experts.{p}"] for p in ("gate_proj", "up_proj", "down_proj")}
        assert mods["gate_proj"].A.shape == (8, 4, 64) and mods["down_proj"].B.shape == (8, 64, 4)
        gate_up = np.concatenate([mods["gate_proj"].delta(), mods["up_proj"].delta()], axis=1)
        want = truth[f"model.layers.{i}.mlp.experts.base_layer"]
        np.testing.assert_allclose(gate_up, want, atol=1e-6 * np.abs(want).max())
        np.testing.assert_allclose(mods["down_proj"].delta(), truth[f"model.layers.{i}.mlp.experts"], atol=1e-7)
        swapped = np.concatenate([mods["up_proj"].delta(), mods["gate_proj"].delta()], axis=1)
        assert np.abs(swapped - want).max() > 0.3 * np.abs(want).max()


def wrong_b_expert_major(A, B, n_expert):
    """The wrong reading of lora_B: columns e·r + j (expert-major) instead of PEFT's j·E + e."""
    return A.reshape(n_expert, -1, A.shape[-1]), np.ascontiguousarray(B.reshape(B.shape[0], n_expert, -1)
                                                                      .transpose(1, 0, 2))


def test_expert_lora_converts_exactly_and_wrong_layouts_are_far(tmp_path, monkeypatch, moe_arch, base_run,
                                                                 expert_adapter):
    """Convert → llama.cpp's ffn_*_exps LoRA (mul_mat_id) == transformers + PEFT; the same adapter read with lora_B
    expert-major, or with gate and up swapped, is far off (so this test would catch either mistake)."""
    ours, r_ours = converted_run(moe_arch, expert_adapter, tmp_path / "ok.gguf")
    theirs, r_theirs = transformers_run(moe_arch, TOKENS, adapter_dir=expert_adapter)
    moved, m = compare(base_run[0], ours), routed(theirs, ours, r_theirs, r_ours)
    print("expert LoRA: moved", moved["mean_kl"], "llama.cpp vs transformers+PEFT", m)
    assert moved["mean_kl"] > 1e-2, "the adapter must visibly change the output"
    assert exact(m), m

    with monkeypatch.context() as mp:
        mp.setattr(peft_reader, "param_wrapper_factors", wrong_b_expert_major)
        wrong_b, _ = converted_run(moe_arch, expert_adapter, tmp_path / "wrong-b.gguf")
    with monkeypatch.context() as mp:
        for a in models.all_archs():  # the reader takes the table from every arch (they share these names)
            table = dict(a.expert_params)
            if "mlp.experts.gate_up_proj" in table:
                table["mlp.experts.gate_up_proj"] = ("mlp.experts.up_proj", "mlp.experts.gate_proj")
                mp.setattr(a, "expert_params", table)
        swapped, _ = converted_run(moe_arch, expert_adapter, tmp_path / "swapped.gguf")
    for name, wrong in (("B expert-major", wrong_b), ("gate/up swapped", swapped)):
        w = compare(theirs, wrong)
        print(name, w)
        assert w["mean_kl"] > 1e4 * max(m["mean_kl"], 1e-9) and w["mean_kl"] > 0.1 * moved["mean_kl"], (name, w)


@pytest.mark.parametrize("params", [["mlp.experts.gate_up_proj"], ["mlp.experts.down_proj"], ["mlp.gate.weight"]])
def test_partial_expert_target_converts_as_what_it_is(tmp_path, moe_arch, base_run, params):
    """One expert parameter targeted: written as what it is (gate+up, or down only), not refused; the router
    (a 2-D parameter, GGUF ffn_gate_inp) is an ordinary LoRA pair, and it moves the routing itself."""
    d = make_peft_adapter(fixture(moe_arch, "hf"), tmp_path / "a", r=2, lora_alpha=4, b_std=0.2, target_modules=[],
                          target_parameters=params, use_rslora=True)
    ours, r_ours = converted_run(moe_arch, d, tmp_path / "a.gguf")
    theirs, r_theirs = transformers_run(moe_arch, TOKENS, adapter_dir=d)
    moved, m = compare(base_run[0], ours), routed(theirs, ours, r_theirs, r_ours)
    print(params, "moved", moved["mean_kl"], m)
    assert moved["mean_kl"] > 1e-2 and exact(m), (moved, m)


def test_reference_with_expert_lora_matches_transformers(moe_arch, expert_adapter):
    """parity.reference folds the expert LoRA into the stacked experts, one expert at a time."""
    from lora2gguf.weights.base_model import open_base

    with open_base(fixture(moe_arch)) as b:
        ours, r_ours = reference_run(reference_model(b, [(load_adapter(expert_adapter), 1.0)]), TOKENS)
    theirs, r_theirs = transformers_run(moe_arch, TOKENS, adapter_dir=expert_adapter)
    m = routed(theirs, ours, r_theirs, r_ours)
    assert exact(m), m


def test_expert_count_checked_against_the_base(tmp_path, moe_arch, expert_adapter):
    """An expert LoRA for 8 experts on a base with another expert count is refused in one line (llama.cpp checks
    only ne[0] and ne[1] of an expert LoRA and would compute garbage)."""
    import shutil

    d = tmp_path / "a"
    shutil.copytree(expert_adapter, d)
    from safetensors.numpy import load_file, save_file

    w = load_file(str(d / "adapter_model.safetensors"))
    w = {k: (v[: v.shape[0] // 2] if k.endswith("lora_A.weight") else v[:, : v.shape[1] // 2]) for k, v in w.items()}
    save_file(w, str(d / "adapter_model.safetensors"))  # rank 4 on 4 experts
    with pytest.raises(Lora2GGUFError, match=r"\(4 experts\) weight but base .* \(8 experts\)") as e:
        convert(d, fixture(moe_arch), tmp_path / "x.gguf")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("version", ["0.17.1", "0.19.0", None])
def test_expert_lora_of_a_peft_version_we_cannot_place_is_refused(tmp_path, moe_arch, expert_adapter, version):
    import shutil

    d = tmp_path / "a"
    shutil.copytree(expert_adapter, d)
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["peft_version"] = version
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(Lora2GGUFError, match="peft PR 3165") as e:
        convert(d, fixture(moe_arch), tmp_path / "x.gguf")
    assert "\n" not in str(e.value)


def test_dora_on_expert_parameters_is_refused_in_one_line(tmp_path, capsys, moe_arch, expert_adapter):
    """peft's ParamWrapper has no DoRA; an adapter claiming it on the experts (use_dora, or a magnitude vector)
    is refused by convert and merge in one line, not merged as plain LoRA."""
    import shutil

    from lora2gguf.cli import main
    from safetensors.numpy import load_file, save_file

    for how in ("use_dora", "magnitude"):
        d = tmp_path / how
        shutil.copytree(expert_adapter, d)
        if how == "use_dora":
            cfg = json.loads((d / "adapter_config.json").read_text())
            (d / "adapter_config.json").write_text(json.dumps(cfg | {"use_dora": True}))
        else:
            t = load_file(d / "adapter_model.safetensors")
            key = next(k for k in t if k.endswith("experts.lora_B.weight"))
            t[key.replace("lora_B.weight", "lora_magnitude_vector")] = np.ones(t[key].shape[0], np.float32)
            save_file(t, d / "adapter_model.safetensors")
        for verb in (["convert", str(d), "--base", str(fixture(moe_arch)), "-o", str(tmp_path / f"{how}.gguf")],
                     ["merge", "--base", str(fixture(moe_arch)), "--lora", str(d), "-o", str(tmp_path / f"{how}-m.gguf")]):
            capsys.readouterr()
            assert main(verb) == 2, (how, verb[0])
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and "DoRA on expert parameters" in err, (how, err)
            assert not (tmp_path / f"{how}.gguf").exists() and not (tmp_path / f"{how}-m.gguf").exists()


def test_every_other_verb_refuses_moe_in_one_line(tmp_path, capsys, moe_arch, expert_adapter):
    """convert, inspect, merge, verify, analyze and train handle the MoE archs so far (train: test_train_moe.py); every
    other verb says so in one line (no traceback), for the base, and resize without a base for an adapter with expert
    LoRA."""
    from lora2gguf.cli import main

    base, hf, lora = str(fixture(moe_arch)), str(fixture(moe_arch, "hf")), str(tmp_path / "a.gguf")
    convert(expert_adapter, fixture(moe_arch), lora)
    out = str(tmp_path / "out")
    runs = {"extract": ["extract", "--base", base, "--tuned", hf, "--rank", "2", "-o", out + ".gguf"],
            "export": ["export", lora, "--base", base, "-o", out],
            "combine": ["combine", lora, "--base", base, "-o", out + ".gguf"],
            "resize": ["resize", lora, "--base", base, "--rank", "2", "-o", out + ".gguf"],
            "modelfile": ["modelfile", "--base", base, "--lora", lora, "--adapter", "-o", out + ".Modelfile"]}
    for verb, args in runs.items():
        capsys.readouterr()
        assert main(args) == 2, verb
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, (verb, err)
        assert f"`lora2gguf {verb}` does not handle {moe_arch}" in err, (verb, err)
    for verb, args in {"resize": ["resize", str(expert_adapter), "--rank", "2", "-o", out + "-peft"]}.items():
        assert main(args) == 2, verb
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"not handled by `lora2gguf {verb}`" in err, (verb, err)


def test_expert_gguf_lora_reads_back_and_an_hf_base_gives_the_same_file(tmp_path, moe_arch, expert_adapter):
    """The GGUF LoRA read back (adapters.gguf_lora: 3-D *_exps pairs) holds PEFT's per-expert deltas; converting
    against the HF directory (per-expert checkpoint tensors) writes the same tensors and the same base fingerprint
    as against the GGUF."""
    from lora2gguf.adapters.load import load_for_base
    from lora2gguf.fileio.gguf_read import GGUFFile
    from lora2gguf.weights.base_model import open_base

    g = convert(expert_adapter, fixture(moe_arch), tmp_path / "g.gguf")
    h = convert(expert_adapter, fixture(moe_arch, "hf"), tmp_path / "h.gguf")
    with GGUFFile(g) as fg, GGUFFile(h) as fh:
        assert set(fg.tensors) == set(fh.tensors) and "blk.1.ffn_up_exps.weight.lora_b" in fg.tensors
        assert fg.tensors["blk.1.ffn_up_exps.weight.lora_b"].shape == (8, 256, 4)  # ggml ne [r, out, E]
        for n in fg.tensors:
            np.testing.assert_array_equal(fg.tensor(n), fh.tensor(n))
        assert fg.get("lora2gguf.base.fingerprint") == fh.get("lora2gguf.base.fingerprint")
    peft_side = load_adapter(expert_adapter)
    with open_base(fixture(moe_arch)) as b:
        back = load_for_base(g, b)
    for name, m in peft_side.modules.items():
        want = m.delta()
        np.testing.assert_allclose(back.modules[name].delta(), want, atol=1e-6 * np.abs(want).max())


SHARED = ["shared_expert.gate_proj", "shared_expert.up_proj", "shared_expert.down_proj", "shared_expert_gate"]


def test_shared_expert_lora_converts_exactly(tmp_path):
    """qwen2moe's shared expert (ffn_*_shexp) and its gate (ffn_gate_inp_shexp, a (1, n_embd) linear) take ordinary
    2-D LoRA: converted, llama.cpp == transformers + PEFT."""
    from lora2gguf.fileio.gguf_read import GGUFFile

    d = make_peft_adapter(fixture("qwen2moe", "hf"), tmp_path / "a", r=4, lora_alpha=8, b_std=0.2,
                          target_modules=SHARED)
    gguf = convert(d, fixture("qwen2moe"), tmp_path / "a.gguf")
    with GGUFFile(gguf) as f:
        assert f.tensors["blk.1.ffn_gate_inp_shexp.weight.lora_b"].shape == (1, 4)
        assert {n.split(".")[2] for n in f.tensors} == {"ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp",
                                                        "ffn_gate_inp_shexp"}
    base, _ = llama_run(fixture("qwen2moe"), TOKENS)
    ours, r_ours = llama_run(fixture("qwen2moe"), TOKENS, [(gguf, 1.0)])
    theirs, r_theirs = transformers_run("qwen2moe", TOKENS, adapter_dir=d)
    moved, m = compare(base, ours), routed(theirs, ours, r_theirs, r_ours)
    print("shared-expert LoRA: moved", moved["mean_kl"], "llama.cpp vs transformers+PEFT", m)
    assert moved["mean_kl"] > 1e-2 and exact(m), (moved, m)


ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
PEER_CASES = {"attention": dict(r=4, lora_alpha=8, target_modules=ATTN),
              "attention-rslora": dict(r=4, lora_alpha=8, use_rslora=True, target_modules=ATTN),
              "experts": dict(r=4, lora_alpha=16, b_std=0.2, target_modules=[], target_parameters=EXPERT_PARAMS),
              "shared-expert": dict(r=4, lora_alpha=8, b_std=0.2, target_modules=SHARED)}


def llama_cpp_convert(hf_dir, adapter_dir, out) -> tuple[Path | None, str]:
    """llama.cpp's own convert_lora_to_gguf.py: (the file, "") or (None, its last error line)."""
    import os
    import subprocess
    import sys

    from llama_cpp_source import llama_cpp_source

    src = llama_cpp_source()
    if src is None:
        if os.environ.get("LORA2GGUF_TESTS_OFFLINE", "") not in ("", "0"):
            pytest.skip("llama.cpp's source could not be had; LORA2GGUF_TESTS_OFFLINE is set")
        pytest.fail("llama.cpp's source could not be had; set LLAMA_CPP_DIR, or LORA2GGUF_TESTS_OFFLINE=1 to skip")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    r = subprocess.run([sys.executable, str(src / "convert_lora_to_gguf.py"), "--base", str(hf_dir), "--outtype",
                        "f32", "--outfile", str(out), str(adapter_dir)], capture_output=True, text=True, env=env,
                       timeout=600)
    ok = r.returncode == 0 and Path(out).is_file()
    return (Path(out), "") if ok else (None, (r.stderr.strip().splitlines() or ["?"])[-1])


@pytest.mark.parametrize("case", list(PEER_CASES))
def test_ours_and_llama_cpp_converter_against_transformers_peft(tmp_path, moe_arch, base_run, case):
    """The README's MoE table: each adapter kind converted by lora2gguf and by llama.cpp's convert_lora_to_gguf.py,
    run by llama.cpp, against transformers + PEFT (routing-aware). Ours is exact on every kind; llama.cpp's converter
    is exact on plain attention and the shared expert, wrong with rsLoRA (it writes lora_alpha as is) and fails on
    PEFT's expert LoRA (target_parameters)."""
    if case == "shared-expert" and moe_arch != "qwen2moe":
        pytest.skip("only qwen2moe has a shared expert")
    d = make_peft_adapter(fixture(moe_arch, "hf"), tmp_path / "a", **PEER_CASES[case])
    theirs, r_theirs = transformers_run(moe_arch, TOKENS, adapter_dir=d)
    ours, r_ours = converted_run(moe_arch, d, tmp_path / "ours.gguf")
    moved, m = compare(base_run[0], ours), routed(theirs, ours, r_theirs, r_ours)
    peer, why = llama_cpp_convert(fixture(moe_arch, "hf"), d, tmp_path / "peer.gguf")
    p = None
    if peer is not None:
        lc, r_lc = llama_run(fixture(moe_arch), TOKENS, [(peer, 1.0)])
        p = routed(theirs, lc, r_theirs, r_lc)
    said = (f"median {p['median_kl']:.2g}, mean {p['mean_kl']:.3g}, expert sets differ on "
            f"{p['expert_set_mismatch']:.0%}") if p else f"fails: {why}"
    print(f"{moe_arch} | {case} | moved {moved['mean_kl']:.3g} | ours median {m['median_kl']:.2g}, mean "
          f"{m['mean_kl']:.2g} | llama.cpp's converter {said}")
    assert moved["mean_kl"] > 1e-2 and exact(m), (moved, m)
    if case == "experts":
        assert p is None and "experts" in why, why
    elif case == "attention-rslora":
        assert p is not None and p["median_kl"] > 1e-2, p
    else:
        assert p is not None and exact(p), p


# transformers-4-style adapters (one LoRA per expert module): each arch's module names for expert E's projection and
# for the router, as checkpoints and adapters made on transformers 4 name them
T4_NAMES = {"mixtral": ({"gate_proj": "block_sparse_moe.experts.{E}.w1", "up_proj": "block_sparse_moe.experts.{E}.w3",
                         "down_proj": "block_sparse_moe.experts.{E}.w2"}, "block_sparse_moe.gate"),
            "qwen3moe": ({p: "mlp.experts.{E}." + p for p in ("gate_proj", "up_proj", "down_proj")}, "mlp.gate"),
            "qwen2moe": ({p: "mlp.experts.{E}." + p for p in ("gate_proj", "up_proj", "down_proj")}, "mlp.gate")}


def t4_adapter(arch: str, out: Path, experts, zero_experts=(), r: int = 4, alpha: float = 8.0, seed: int = 5) -> Path:
    """A PEFT adapter as peft on transformers 4 saved it for this MoE: per-expert pairs (random A, B) on the listed
    experts' three projections (zero_experts: pairs with B = 0, no change) and the router of every layer (not for
    qwen2moe: peft 0.21 refuses its router as a target). transformers 5 + peft 0.21 load it by converting it to their
    fused form (peft.utils.transformers_weight_conversion): the reference."""
    from safetensors.numpy import save_file

    import zlib

    names, router = T4_NAMES[arch]
    D, F, E = 64, 256, 8
    shapes = {"gate_proj": (F, D), "up_proj": (F, D), "down_proj": (D, F)}
    routed_lora = arch != "qwen2moe"
    t = {}
    for i in range(2):
        mods = {router: (E, D)} if routed_lora else {}
        mods |= {names[p].format(E=e): shapes[p] for e in sorted(set(experts) | set(zero_experts)) for p in shapes}
        for mod, (o, n) in mods.items():
            key = f"base_model.model.model.layers.{i}.{mod}"
            rng = np.random.default_rng([seed, zlib.crc32(key.encode())])  # a module's pair whatever else is there
            t[f"{key}.lora_A.weight"] = (rng.standard_normal((r, n)) / np.sqrt(n)).astype(np.float32)
            zero = any(mod == names[p].format(E=e) for e in zero_experts for p in shapes)
            t[f"{key}.lora_B.weight"] = (rng.standard_normal((o, r)) * 0.2 * (not zero)).astype(np.float32)
    out.mkdir(parents=True)
    save_file(t, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    targets = sorted({n.rsplit(".", 1)[-1] for n in names.values()} | ({"gate"} if routed_lora else set()))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "target_modules": targets,
        "base_model_name_or_path": str(fixture(arch, "hf")), "lora_dropout": 0.0, "bias": "none"}))
    return out


def as_param_wrappers(arch: str, t4_dir: Path, out: Path) -> Path:
    """The per-expert adapter at t4_dir rewritten as the adapter real peft makes on transformers 5's fused experts
    (target_parameters), for the archs whose per-expert adapters peft does not convert itself: expert e's gate and
    up pairs side by side in one rank-2r pair on gate_up_proj (A stacked, B block-diagonal: the identity peft's own
    conversion uses), down's padded to rank 2r with zeros, alpha doubled so that alpha / r stays the same."""
    from safetensors.numpy import load_file, save_file

    r, E, F = 4, 8, 256
    names, _ = T4_NAMES[arch]
    t4 = load_file(str(t4_dir / "adapter_model.safetensors"))
    make_peft_adapter(fixture(arch, "hf"), out, r=2 * r, lora_alpha=2 * 8.0, target_modules=[],
                      target_parameters=EXPERT_PARAMS)
    w = load_file(str(out / "adapter_model.safetensors"))
    for i in range(2):
        def pair(p, e):
            key = f"base_model.model.model.layers.{i}.{names[p].format(E=e)}"
            if f"{key}.lora_A.weight" not in t4:
                return None
            return t4[f"{key}.lora_A.weight"], t4[f"{key}.lora_B.weight"]

        pre = f"base_model.model.model.layers.{i}.mlp.experts"
        gu_a, gu_b = (np.zeros_like(w[f"{pre}.base_layer.lora_{x}.weight"]) for x in "AB")
        d_a, d_b = (np.zeros_like(w[f"{pre}.lora_{x}.weight"]) for x in "AB")
        for e in range(E):
            for k, p in enumerate(("gate_proj", "up_proj")):
                if (ab := pair(p, e)) is not None:
                    gu_a[e * 2 * r + k * r: e * 2 * r + (k + 1) * r] = ab[0]  # A rows e·r' + j (expert-major)
                    for j in range(r):  # B column j'·E + e (expert-minor), gate rows first
                        gu_b[k * F:(k + 1) * F, (k * r + j) * E + e] = ab[1][:, j]
            if (ab := pair("down_proj", e)) is not None:
                d_a[e * 2 * r: e * 2 * r + r] = ab[0]
                for j in range(r):
                    d_b[:, j * E + e] = ab[1][:, j]
        w |= {f"{pre}.base_layer.lora_A.weight": gu_a, f"{pre}.base_layer.lora_B.weight": gu_b,
              f"{pre}.lora_A.weight": d_a, f"{pre}.lora_B.weight": d_b}
    save_file(w, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("experts", [range(8), (0, 2, 5)], ids=["all-experts", "some-experts"])
def test_transformers_4_style_per_expert_adapter_converts_exactly(tmp_path, monkeypatch, moe_arch, base_run, experts):
    """Per-expert LoRA modules (Mixtral's block_sparse_moe.experts.E.w1/w3/w2 and block_sparse_moe.gate; Qwen's
    mlp.experts.E.gate_proj...) are stacked into the *_exps LoRA, an expert without a pair getting a zero one:
    llama.cpp on ours == transformers 5 + peft, which converts the same adapter to its fused form (peft cannot
    convert one that leaves experts out: its reference is the same adapter with zero pairs on those experts). peft
    leaves a per-expert qwen2moe adapter unconverted (its target names match the shared expert too): there the
    reference is the same pairs written as peft's own fused-expert adapter (as_param_wrappers)."""
    d = t4_adapter(moe_arch, tmp_path / "a", experts)
    if moe_arch == "qwen2moe":
        ref = as_param_wrappers(moe_arch, d, tmp_path / "ref")
    elif len(experts) == 8:
        ref = d
    else:
        ref = t4_adapter(moe_arch, tmp_path / "ref", experts, [e for e in range(8) if e not in experts])
    ours, r_ours = converted_run(moe_arch, d, tmp_path / "a.gguf")
    theirs, r_theirs = transformers_run(moe_arch, TOKENS, adapter_dir=ref)
    moved, m = compare(base_run[0], ours), routed(theirs, ours, r_theirs, r_ours)
    print(moe_arch, list(experts), "per-expert adapter: moved", moved["mean_kl"], m)
    assert moved["mean_kl"] > 1e-2 and exact(m), (moved, m)
    swap = {v: k for k, v in models.get(moe_arch).expert_modules.items()}  # the same adapter with gate and up
    for a in models.all_archs():  # swapped is far off (the test would catch it); archs share these names
        if swap["mlp.experts.gate_proj"] in a.expert_modules:
            monkeypatch.setattr(a, "expert_modules", dict(a.expert_modules) | {
                swap["mlp.experts.gate_proj"]: "mlp.experts.up_proj",
                swap["mlp.experts.up_proj"]: "mlp.experts.gate_proj"})
    wrong, _ = converted_run(moe_arch, d, tmp_path / "swapped.gguf")
    w = compare(theirs, wrong)
    assert w["mean_kl"] > 0.1 * moved["mean_kl"], w
