"""`lora2gguf merge`: merged GGUF files, loaded by llama.cpp, against the reference (PEFT's math) and
transformers + the real PEFT; quantized bases and outputs; byte identity of untouched tensors and with
llama.cpp's own quantizer; metadata; errors."""

import ctypes
import functools
import hashlib
import warnings

import numpy as np
import pytest
import torch

from conftest import ARCHS, fixture, reference_logits, token_ids
from lora2gguf.adapters.peft import load_peft
from lora2gguf.weights.base_model import open_base
from lora2gguf.cli import main
from lora2gguf.fileio.gguf_read import GGUFFile
from lora2gguf.commands.merge import merge
from lora2gguf.parity.metrics import compare
from lora2gguf.parity.reference import reference_model
from lora2gguf.llamacpp.runtime import LlamaRuntime
from peft_helpers import make_peft_adapter

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CASES = {  # name → [(LoraConfig kwargs, user scale)]
    "plain": [(dict(r=4, lora_alpha=8, target_modules=LINEARS), 1.0)],
    "rslora": [(dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True), 1.0)],
    "patterns": [(dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "up_proj"],
                       rank_pattern={"v_proj": 4, "layers.1.self_attn.q_proj": 2}, alpha_pattern={"up_proj": 3}), 1.0)],
    "dora": [(dict(r=4, lora_alpha=8, target_modules=LINEARS, use_dora=True), 1.0)],
    "modules-to-save": [(dict(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"],
                              modules_to_save=["model.norm", "post_attention_layernorm"]), 1.0)],
    "two-adapters": [(dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]), 0.7),
                     (dict(r=2, lora_alpha=4, target_modules=["q_proj", "k_proj", "up_proj"], use_rslora=True), 0.3)],
}
ARCH_CASES = {  # what only some archs can or should show
    ("qwen2", "lora-bias"): [(dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"], lora_bias=True), 1.0)],
    ("llama", "lora-bias-new-tensors"): [(dict(r=4, lora_alpha=8, target_modules=["k_proj", "o_proj", "down_proj"],
                                               lora_bias=True), 1.0)],
    ("llama", "embed-and-head"): [(dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "lm_head", "q_proj"]), 1.0)],
    ("qwen2", "head-on-tied-base"): [(dict(r=4, lora_alpha=8, target_modules=["lm_head", "q_proj"]), 1.0)],
    ("qwen2", "embed-on-tied-base"): [(dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "v_proj"]), 1.0)],
    ("qwen2", "save-embed-on-tied-base"): [(dict(r=4, lora_alpha=8, target_modules=["v_proj"],
                                                 modules_to_save=["embed_tokens"]), 1.0)],
    ("gemma3", "lora-bias-new-tensors"): [(dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_bias=True), 1.0)],
    ("gemma3", "embed-on-tied-base"): [(dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "o_proj"]), 1.0)],
    ("phi3", "lora-bias-new-tensors"): [(dict(r=4, lora_alpha=8, target_modules=["qkv_proj"], lora_bias=True), 1.0)],
}
# On phi3 the "patterns" case's v_proj and layers.1...q_proj keys both become qkv_proj patterns that overlap, and
# PEFT resolves overlapping patterns by their order, which its saved JSON does not keep: phi3's patterns are
# covered by test_convert's phi3-rslora-patterns instead.
ALL = [(a, c) for a in ARCHS for c in CASES if (a, c) != ("phi3", "patterns")] + list(ARCH_CASES)
SPREAD = 1.5  # fixture logits' mean std: peaked enough for KL / top-1 to mean something


def peft_multi_logits(hf_dir, adapters, tokens):
    """transformers + the real PEFT with several adapters active at once, each LoRA layer's scaling
    multiplied by the adapter's user scale (what llama.cpp's --lora-scaled does)."""
    import peft
    import transformers
    from peft.tuners.lora import LoraLayer

    warnings.filterwarnings("ignore", category=UserWarning)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    pm = peft.PeftModel.from_pretrained(model, str(adapters[0][0]), adapter_name="a0")
    for i, (d, _) in enumerate(adapters[1:], 1):
        pm.load_adapter(str(d), adapter_name=f"a{i}")
    pm.base_model.set_adapter([f"a{i}" for i in range(len(adapters))])
    for mod in pm.modules():
        if isinstance(mod, LoraLayer):
            for i, (_, s) in enumerate(adapters):
                if f"a{i}" in mod.scaling:
                    mod.scaling[f"a{i}"] *= s
    with torch.no_grad():
        return pm.eval()(torch.tensor([tokens])).logits[0].float().numpy()


def make(arch, specs, tmp_path, seed=3):
    return [(make_peft_adapter(fixture(arch, "hf"), tmp_path / f"a{i}", seed=seed + 10 * i, **kw), s)
            for i, (kw, s) in enumerate(specs)]


def ref_logits(base_path, adapters, tokens):
    with open_base(base_path) as b:
        return reference_logits(reference_model(b, [(load_peft(d), s) for d, s in adapters]), tokens)


def llama_logits(path, tokens):
    with LlamaRuntime(path) as rt:
        return rt.logits(tokens)


@functools.lru_cache(maxsize=None)
def base_logits(path, tokens: tuple):
    return llama_logits(path, list(tokens))


@pytest.mark.parametrize("arch,case", ALL, ids=[f"{a}-{c}" for a, c in ALL])
def test_f32_merge_matches_reference_and_peft(arch, case, tmp_path):
    adapters = make(arch, CASES.get(case) or ARCH_CASES[(arch, case)], tmp_path)
    out = merge(fixture(arch), adapters, tmp_path / "m.gguf", quant="f32")
    tokens = token_ids(383, 64, seed=11)
    ours = llama_logits(out, tokens)
    ref = ref_logits(fixture(arch), adapters, tokens)
    theirs = peft_multi_logits(fixture(arch, "hf"), adapters, tokens)
    plain = base_logits(fixture(arch), tuple(tokens))
    assert ref.std(-1).mean() > SPREAD
    m_ref, m_peft = compare(ref, ours), compare(theirs, ours)
    print(arch, case, "vs reference", m_ref, "vs peft", m_peft)
    assert m_ref["mean_kl"] <= 1e-5 and m_ref["top1"] == 1.0, m_ref
    assert m_peft["mean_kl"] <= 1e-5 and m_peft["top1"] == 1.0, m_peft
    assert compare(plain, ours)["mean_kl"] > 1e-2, "the adapter must visibly move the output"


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gguf_lora_input(arch, tmp_path):
    """A GGUF LoRA (made by convert) merges like its PEFT directory: llama.cpp's alpha/r scale, q/k rows
    and token_embd's flipped pair read back right."""
    from lora2gguf.commands.convert import convert

    emb = ["embed_tokens"] if arch == "llama" else []  # convert refuses embed_tokens on tied qwen2
    (a, _), = make(arch, [(dict(r=4, lora_alpha=8, target_modules=LINEARS + emb), 1.0)], tmp_path)
    lora = convert(a, fixture(arch), tmp_path / "a.gguf")
    out = merge(fixture(arch), [(lora, 0.5)], tmp_path / "m.gguf", quant="f32")
    tokens = token_ids(383, 64, seed=13)
    m = compare(ref_logits(fixture(arch), [(a, 0.5)], tokens), llama_logits(out, tokens))
    assert m["mean_kl"] <= 1e-5 and m["top1"] == 1.0, m
    with GGUFFile(out) as f:
        assert list(f.get("lora2gguf.merge.sha256")) == [hashlib.sha256(lora.read_bytes()).hexdigest()]


# -- quantized bases and outputs ------------------------------------------------------------------

LAYER0 = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], layers_to_transform=[0])
TOUCHED = {"blk.0.attn_q.weight", "blk.0.attn_v.weight"}
TOUCHED_BY_ARCH = {"phi3": {"blk.0.attn_qkv.weight"}}  # q and v are rows of Phi-3's one fused projection


@pytest.fixture(scope="module")
def layer0_adapters(tmp_path_factory):
    d = tmp_path_factory.mktemp("layer0")
    return {arch: make_peft_adapter(fixture(arch, "hf"), d / arch, seed=5, b_std=0.2, **LAYER0) for arch in ARCHS}


QUANT_CASES = [(a, k, q) for a in ARCHS for k, q in [("q8_0", "q8_0"), ("q4_k_m", "q4_k_m")]] + [
    ("llama", "f16", "f16"), ("qwen2", "q4_k_m", "f16"), ("qwen3", "f32", "q8_0"), ("llama", "q8_0", "q4_k_m")]


@pytest.mark.parametrize("arch,kind,quant", QUANT_CASES, ids=["-".join(c) for c in QUANT_CASES])
def test_quantized_merge_loads_generates_and_keeps_untouched_bytes(arch, kind, quant, layer0_adapters, tmp_path):
    adapter, touched = layer0_adapters[arch], TOUCHED_BY_ARCH.get(arch, TOUCHED)
    out = merge(fixture(arch, kind), [(adapter, 1.0)], tmp_path / "m.gguf", quant=quant)
    tokens = token_ids(383, 64, seed=12)
    ref = ref_logits(fixture(arch), [(adapter, 1.0)], tokens)  # the adapted model, exact
    with LlamaRuntime(out) as rt:
        merged = rt.logits(tokens)
        assert len(rt.greedy(tokens[:8], 8)) > 0
    before = compare(ref, base_logits(fixture(arch, kind), tuple(tokens)))["mean_kl"]
    after = compare(ref, merged)["mean_kl"]
    print(arch, kind, "→", quant, "KL to the adapted reference: base", before, "merged", after)
    assert after < 0.25 * before, "the merged file must carry the adapter"
    with GGUFFile(fixture(arch, kind)) as b, GGUFFile(out) as m:
        assert set(m.tensors) == set(b.tensors)
        for name, t in b.tensors.items():
            same_type = m.tensors[name].type == t.type
            if name in touched:
                assert not np.array_equal(m.raw(name), b.raw(name))
            elif same_type:
                assert np.array_equal(m.raw(name), b.raw(name)), f"untouched {name} ({t.type.name}) changed"
        if kind == quant:
            assert all(m.tensors[n].type == t.type for n, t in b.tensors.items() if n not in touched)


def llama_cpp_quantize(src, dst, ftype):
    import llama_cpp

    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype, p.nthread = ftype, 2
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(p)) == 0


@pytest.fixture(scope="module")
def dora_llama(tmp_path_factory):
    return make("llama", CASES["dora"], tmp_path_factory.mktemp("dora"))


from lora2gguf.llamacpp.quantize import OUTPUT_TYPES  # noqa: E402

QUANTS = [n for n, t in OUTPUT_TYPES.items() if t.direct is None and not t.needs_imatrix]  # without an imatrix
# each arch × (F32, F16 base) gets 3 of them, in turn: every type twice over the 12 slots
FLOAT_CASES = [("llama", k, q) for k in ("f32", "f16") for q in ("q4_k_m", "q8_0", "q5_k_s")] + [
    (a, k, QUANTS[(3 * (2 * i + j) + n) % len(QUANTS)]) for i, a in enumerate(ARCHS[1:]) for j, k in
    enumerate(("f32", "f16")) for n in range(3)]


@pytest.fixture(scope="module")
def all_linear(tmp_path_factory):
    d = tmp_path_factory.mktemp("all-linear")
    return {a: [(make_peft_adapter(fixture(a, "hf"), d / a, seed=4, **CASES["plain"][0][0]), 1.0)] for a in ARCHS}


@pytest.mark.parametrize("arch,kind,quant", FLOAT_CASES, ids=["-".join(c) for c in FLOAT_CASES])
def test_quantized_output_is_llama_quantize_of_our_float_merge(arch, kind, quant, dora_llama, all_linear, tmp_path):
    """From an F32 (F16) base, --quant X is byte for byte what llama.cpp's quantizer writes from our f32
    (f16) merge (DoRA on llama, all-linear plain LoRA elsewhere)."""
    adapters = dora_llama if arch == "llama" else all_linear[arch]
    merged = merge(fixture(arch, kind), adapters, tmp_path / "m.gguf", quant=kind)
    llama_cpp_quantize(merged, tmp_path / "theirs.gguf", OUTPUT_TYPES[quant].ftype)
    ours = merge(fixture(arch, kind), adapters, tmp_path / "ours.gguf", quant=quant)
    assert ours.read_bytes() == (tmp_path / "theirs.gguf").read_bytes()


def in_process_llama_quantize(src, dst, ftype, threads=None, verbose=False, on_tensor=None):
    """quantize.llama_quantize's contract, llama.cpp's quantizer called here rather than in a child process
    (the same C function; faster for tests)."""
    import llama_cpp

    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype, p.nthread, p.allow_requantize = int(ftype), 2, True
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(p)) == 0


INTERMEDIATE_CASES = [  # (arch, base kind, adapters' case, quant): quantized bases (untouched tensors copied or
    # requantized from their type), new tensors, an untied head (token_embd's type follows), DoRA, replacements
    ("llama", "q8_0", "plain", "q4_k_m"), ("llama", "q4_k_m", "dora", "q4_k_m"), ("llama", "f16", "dora", "q5_k_m"),
    ("llama", "q8_0", "lora-bias-new-tensors", "q3_k_m"), ("llama", "q4_k_m", "embed-and-head", "q6_k"),
    ("qwen2", "q4_k_m", "head-on-tied-base", "q4_k_m"), ("qwen2", "q8_0", "embed-on-tied-base", "q8_0"),
    ("qwen2", "f16", "lora-bias", "iq4_nl"), ("qwen3", "q8_0", "modules-to-save", "q4_k_s"),
    ("qwen3", "q4_k_m", "two-adapters", "q2_k"), ("gemma3", "q8_0", "embed-on-tied-base", "q4_k_m"),
    ("gemma3", "q4_k_m", "rslora", "iq4_xs"), ("gemma2", "q8_0", "plain", "q5_0"), ("gemma2", "q4_k_m", "dora", "q4_1"),
    ("phi3", "q8_0", "lora-bias-new-tensors", "q4_k_m"), ("phi3", "q4_k_m", "plain", "q3_k_l"),
]


@pytest.mark.parametrize("arch,kind,case,quant", INTERMEDIATE_CASES, ids=["-".join(c) for c in INTERMEDIATE_CASES])
def test_in_process_quantization_is_the_intermediate_path(arch, kind, case, quant, monkeypatch, tmp_path):
    """From any base, --quant X in process is byte for byte what the intermediate file path writes (our
    f32/f16-typed merge with untouched tensors as stored, quantized by llama.cpp)."""
    import lora2gguf.commands.merge as m

    adapters = make(arch, CASES.get(case) or ARCH_CASES[(arch, case)], tmp_path)
    monkeypatch.setattr(m, "llama_quantize", in_process_llama_quantize)
    theirs = merge(fixture(arch, kind), adapters, tmp_path / "theirs.gguf", quant=quant, intermediate=True)
    monkeypatch.setattr(m, "llama_quantize", None)  # the in-process path must not call it
    ours = merge(fixture(arch, kind), adapters, tmp_path / "ours.gguf", quant=quant)
    assert ours.read_bytes() == theirs.read_bytes()


def test_quantized_merge_needs_no_extra_disk(plain_llama, monkeypatch, tmp_path):
    """No intermediate file: while the quantized output is written, the output directory holds its temp
    file (at most the output's size) and, before the first tensor, a probe of a few KB; no llama.cpp child."""
    import lora2gguf.commands.merge as m
    import lora2gguf.llamacpp.ggml as qg

    seen = []
    real = qg._quantize_task

    def spy(*a):
        seen.append({p.name: p.stat().st_size for p in tmp_path.iterdir()})
        return real(*a)

    monkeypatch.setattr(qg, "_quantize_task", spy)
    monkeypatch.setattr(m, "llama_quantize", None)
    out = merge(fixture("llama", "f16"), [(plain_llama, 1.0)], tmp_path / "m.gguf", quant="q4_k_m", threads=1)
    size = out.stat().st_size
    assert seen and all(len(s) == 1 and sum(s.values()) <= size for s in seen), seen
    assert all(n.startswith(".m.gguf.") and n.endswith(".part") for s in seen for n in s)


@pytest.mark.parametrize("quant,ftype", [("f16", "LLAMA_FTYPE_MOSTLY_F16"), ("bf16", "LLAMA_FTYPE_MOSTLY_BF16")])
def test_float_outputs_match_llama_cpp_per_tensor(quant, ftype, tmp_path):
    """f16/bf16, written by merge itself, pick the same type per tensor and the same bytes as llama.cpp."""
    import llama_cpp

    adapters = make("qwen2", CASES["plain"], tmp_path)
    f32 = merge(fixture("qwen2"), adapters, tmp_path / "m-f32.gguf", quant="f32")
    llama_cpp_quantize(f32, tmp_path / "theirs.gguf", getattr(llama_cpp, ftype))
    ours = merge(fixture("qwen2"), adapters, tmp_path / "ours.gguf", quant=quant)
    with GGUFFile(ours) as a, GGUFFile(tmp_path / "theirs.gguf") as b:
        assert set(a.tensors) == set(b.tensors)
        assert {t.type.name for t in a.tensors.values()} == {"F32", quant.upper()}
        for name in a.tensors:
            assert a.tensors[name].type == b.tensors[name].type, name
            assert np.array_equal(a.raw(name), b.raw(name)), name
        assert a.get("general.file_type") == b.get("general.file_type")


# -- metadata -------------------------------------------------------------------------------------

def test_metadata_kept_file_type_set_adapters_recorded(tmp_path):
    adapters = make("llama", CASES["two-adapters"], tmp_path)
    out = merge(fixture("llama", "f16"), adapters, tmp_path / "m.gguf", quant="q4_k_m")
    again = merge(out, [(adapters[0][0], -0.25)], tmp_path / "m2.gguf", quant="q8_0")
    with GGUFFile(fixture("llama", "f16")) as b, GGUFFile(out) as m, GGUFFile(again) as m2:
        for key, field in b.fields.items():
            if key != "general.file_type":
                got = m.get(key)
                want = field.value
                assert (list(got) == list(want)) if hasattr(want, "__len__") and not isinstance(want, str) else got == want, key
        assert m.get("general.file_type") == 15 and m2.get("general.file_type") == 7  # MOSTLY_Q4_K_M, MOSTLY_Q8_0
        digests = [hashlib.sha256((d / "adapter_config.json").read_bytes() +
                                  (d / "adapter_model.safetensors").read_bytes()).hexdigest() for d, _ in adapters]
        assert list(m.get("lora2gguf.merge.adapters")) == ["a0", "a1"]
        assert m.get("lora2gguf.merge.scales").tolist() == pytest.approx([0.7, 0.3])
        assert list(m.get("lora2gguf.merge.sha256")) == digests
        assert list(m2.get("lora2gguf.merge.adapters")) == ["a0", "a1", "a0"]  # a merge of a merge keeps the history
        assert m2.get("lora2gguf.merge.scales").tolist() == pytest.approx([0.7, 0.3, -0.25])
    with LlamaRuntime(again, vocab_only=True) as rt:
        assert rt.tokenize("the cat")[0] == 1


def test_progress_bar_on_request(tmp_path, capfd):
    adapters = make("qwen3", CASES["rslora"], tmp_path)
    merge(fixture("qwen3"), adapters, tmp_path / "m.gguf", quant="q4_k_m", progress=True)
    err = capfd.readouterr().err
    assert "tensor" in err and "Q4_K_M" in err and "llama_model_loader" not in err  # llama.cpp's log stays quiet


# -- errors ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def plain_llama(tmp_path_factory):
    return make_peft_adapter(fixture("llama", "hf"), tmp_path_factory.mktemp("plain") / "a", seed=1, **LAYER0)


def run_cli(args, capsys):
    rc = main(args)
    return rc, capsys.readouterr().err


def test_cli_merges(plain_llama, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    rc = main(["merge", "--base", str(fixture("llama")), "--lora", f"{plain_llama}:0.5", "--quant", "Q4_K_M",
               "-o", str(out), "--threads", "1"])
    assert rc == 0 and out.is_file() and f"wrote {out}" in capsys.readouterr().out
    with GGUFFile(out) as m:
        assert m.get("lora2gguf.merge.scales").tolist() == [0.5]


ERRORS = {  # case → (options replacing the valid ones, given the test's paths), part of the message
    "unknown quant": (lambda p: {"--quant": "q4_k_x"}, "unknown type; valid: f32, f16, bf16, q8_0"),
    "imatrix quant": (lambda p: {"--quant": "iq2_xs"}, "importance matrix"),
    "bad scale": (lambda p: {"--lora": f"{p['a']}:half"}, "scale 'half' is not a number"),
    "out exists": (lambda p: {"-o": str(p["exists"])}, "already exists; pass --force"),
    "out is base": (lambda p: {"-o": str(p["base"]), "--force": None}, "also an input"),
    "missing dir": (lambda p: {"-o": str(p["tmp"] / "nodir" / "m.gguf")}, "does not exist"),
    "base is a dir": (lambda p: {"--base": str(p["tmp"])}, "GGUF base file"),
    "adapter missing": (lambda p: {"--lora": str(p["tmp"] / "nope")}, "no such file or directory"),
    "zero threads": (lambda p: {"--threads": "0"}, "positive number of threads"),
}


@pytest.mark.parametrize("case", ERRORS)
def test_cli_errors_are_one_line_before_any_work(case, plain_llama, tmp_path, capsys):
    (tmp_path / "exists.gguf").write_bytes(b"keep")
    paths = dict(a=plain_llama, exists=tmp_path / "exists.gguf", base=fixture("llama"), tmp=tmp_path)
    change, msg = ERRORS[case]
    opts = {"--base": str(fixture("llama")), "--lora": str(plain_llama), "-o": str(tmp_path / "m.gguf"), **change(paths)}
    rc, err = run_cli(["merge"] + [x for k, v in opts.items() for x in ([k] if v is None else [k, v])], capsys)
    assert rc == 2 and msg in err and len(err.strip().splitlines()) == 1, err
    assert (tmp_path / "exists.gguf").read_bytes() == b"keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists.gguf"], "nothing written"


def test_shape_and_bias_slot_refusals(tmp_path, capsys):
    from safetensors.numpy import save_file

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "lora_alpha": 8}')
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.ones((4, 32), np.float32),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": np.ones((64, 4), np.float32)},
              str(bad / "adapter_model.safetensors"))
    rc, err = run_cli(["merge", "--base", str(fixture("llama")), "--lora", str(bad), "-o", str(tmp_path / "m.gguf")], capsys)
    assert rc == 2 and "64x32 weight but base" in err
    biased = make_peft_adapter(fixture("qwen3", "hf"), tmp_path / "b", seed=1, r=4, lora_alpha=8,
                               target_modules=["o_proj"], lora_bias=True)
    rc, err = run_cli(["merge", "--base", str(fixture("qwen3")), "--lora", str(biased), "-o", str(tmp_path / "m.gguf")], capsys)
    assert rc == 2 and "self_attn.o_proj" in err and "no bias tensor there" in err
    assert not (tmp_path / "m.gguf").exists()


def test_gemma2_embedding_lora_refused(tmp_path, capsys):
    """llama.cpp's gemma2 always multiplies the output by token_embd (it loads no output.weight), so the untied
    head PEFT computes for an embedding LoRA on a tied base has no GGUF form: one line, nothing written."""
    a = make_peft_adapter(fixture("gemma2", "hf"), tmp_path / "a", seed=2, r=4, lora_alpha=8,
                          target_modules=["embed_tokens", "o_proj"])
    capsys.readouterr()
    rc, err = run_cli(["merge", "--base", str(fixture("gemma2")), "--lora", str(a), "-o", str(tmp_path / "m.gguf")], capsys)
    assert rc == 2 and "always multiplies the output by token_embd" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "m.gguf").exists()


def test_failure_mid_write_leaves_nothing(plain_llama, tmp_path, monkeypatch):
    import lora2gguf.commands.merge as m

    calls = []

    def boom(*a):
        calls.append(1)
        if len(calls) == 5:
            raise OSError("disk full")
        return real(*a)

    real = m._tensor_data
    monkeypatch.setattr(m, "_tensor_data", boom)
    calls.clear()
    with pytest.raises(OSError):
        merge(fixture("llama"), [(plain_llama, 1.0)], tmp_path / "m.gguf", quant="f16")
    assert list(tmp_path.iterdir()) == [], "no partial output"

    def failing_source(*a):  # the 5th tensor fails when the quantizer reads it, mid-file
        t = real_source(*a)
        calls.append(1)
        if len(calls) == 5:
            def rows():
                raise OSError("disk full")
            t.rows = t.raw = rows
        return t

    real_source = m._source
    monkeypatch.setattr(m, "_source", failing_source)
    calls.clear()
    with pytest.raises(OSError):
        merge(fixture("llama"), [(plain_llama, 1.0)], tmp_path / "m.gguf", quant="q4_k_m")
    assert list(tmp_path.iterdir()) == [], "no partial output, no probe"


# -- signals --------------------------------------------------------------------------------------
# The quantizer runs in this process (quantize_ggml): its C calls are one chunk of rows each, on worker
# threads, while the main thread waits in Python, where Ctrl-C / SIGTERM raise. To show that the merge stops
# promptly in the middle of the quantization, the CLI runs with one row per chunk, each slowed down: the
# whole run would take a minute or more, the signal must end it within seconds, with nothing left behind.

SLOW_CLI = """
import sys, time
import lora2gguf.llamacpp.ggml as q
real, delay = q._quantize_task, float(sys.argv[1])
def slow(*a):
    time.sleep(delay)
    return real(*a)
if delay:
    q._quantize_task, q.TASK_ELEMENTS = slow, 1
from lora2gguf.cli import main
sys.exit(main(sys.argv[2:]))
"""
OLD = b"the previous output, which must survive\n"


def start_slow_merge(adapter, out, delay, extra=()):
    import os
    import subprocess
    import sys

    from conftest import ROOT

    args = ["merge", "--base", str(fixture("llama")), "--lora", str(adapter), "-o", str(out), "--quant", "q4_k_m",
            "--threads", "1", *extra]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", SLOW_CLI, str(delay), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)


def temps(out):
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


@pytest.fixture(scope="module")
def full_q4_k_m(plain_llama, tmp_path_factory):
    """The complete output of the slowed-down command: its size, and where its tensor data begin."""
    out = merge(fixture("llama"), [(plain_llama, 1.0)], tmp_path_factory.mktemp("full") / "m.gguf", quant="q4_k_m")
    with GGUFFile(out) as f:
        return out.stat().st_size, f.data_offset


def wait_mid_quantization(proc, out, data_offset, timeout=120):
    """Until the output's temp file holds tensor data (4 KB past its header): the quantizer is at work."""
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        for name in temps(out):
            try:
                if not name.endswith(".types.part") and (out.parent / name).stat().st_size > data_offset + 4096:
                    return
            except FileNotFoundError:
                pass
        time.sleep(0.01)
    proc.kill()
    raise AssertionError("the quantizer wrote no tensor data")


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_signal_stops_the_quantization_promptly(plain_llama, full_q4_k_m, tmp_path, sig):
    """Mid-quantization (one row per 20 ms: a minute or more in all), SIGTERM / Ctrl-C end the merge within
    seconds: exit 143 / 130, the previous file intact, no temp file (output or probe) left."""
    import signal
    import time

    size, data_offset = full_q4_k_m
    out = tmp_path / "m.gguf"
    out.write_bytes(OLD)
    proc = start_slow_merge(plain_llama, out, 0.02, ["--force"])
    wait_mid_quantization(proc, out, data_offset)
    t0 = time.time()
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=120)
    elapsed = time.time() - t0
    assert proc.returncode == (128 + signal.SIGTERM if sig == "SIGTERM" else 130), (proc.returncode, err)
    assert elapsed < 10, f"took {elapsed:.1f} s to stop"
    assert "Traceback" not in err and "Exception ignored" not in err, err
    assert out.read_bytes() == OLD and temps(out) == []


def test_sigkill_mid_quantization_leaves_a_temp_that_the_next_run_removes(plain_llama, full_q4_k_m, tmp_path):
    """SIGKILL runs no clean-up: no output, only the partial temp file; no other writer keeps filling it (no
    child process), and the next run removes it."""
    import time

    size, data_offset = full_q4_k_m
    out = tmp_path / "m.gguf"
    proc = start_slow_merge(plain_llama, out, 0.02)
    wait_mid_quantization(proc, out, data_offset)
    proc.kill()
    proc.communicate(timeout=60)
    left = {n: (tmp_path / n).stat().st_size for n in temps(out)}
    assert left and not out.exists() and all(v < size for v in left.values()), left
    time.sleep(1)  # anything still writing would grow the file now
    assert left == {n: (tmp_path / n).stat().st_size for n in temps(out)}
    done = start_slow_merge(plain_llama, out, 0)
    _, err = done.communicate(timeout=300)
    assert done.returncode == 0, err
    assert out.stat().st_size == size and temps(out) == []


# -- SmolLM2-135M ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_adapter(smollm2_hf, tmp_path_factory):
    return make_peft_adapter(smollm2_hf, tmp_path_factory.mktemp("smol") / "a", seed=2, b_std=0.01, r=8,
                             lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])


@pytest.mark.slow
def test_smollm2_f32_merge_matches_reference(smollm2_f32, smollm2_adapter, tmp_path):
    from conftest import TEXT

    out = merge(smollm2_f32, [(smollm2_adapter, 1.0)], tmp_path / "m.gguf", quant="f32")
    with LlamaRuntime(out) as rt:
        tokens = rt.tokenize(TEXT * 2)[:128]
        ours = rt.logits(tokens)
    ref = ref_logits(smollm2_f32, [(smollm2_adapter, 1.0)], tokens)
    m = compare(ref, ours)
    print("smollm2 f32 merge vs reference", m)
    assert m["mean_kl"] <= 1e-5 and m["top1"] == 1.0
    assert compare(llama_logits(smollm2_f32, tokens), ours)["mean_kl"] > 1e-3


@pytest.mark.slow
def test_smollm2_q4_k_m_from_q4_1_original(smollm2_adapter, tmp_path):
    from lora2gguf.weights.real_models import smollm2_gguf

    out = merge(smollm2_gguf(), [(smollm2_adapter, 1.0)], tmp_path / "m.gguf", quant="q4_k_m")
    with LlamaRuntime(out) as rt:
        prompt = rt.tokenize("The capital of France is")
        text = rt.detokenize(rt.greedy(prompt, 4))  # a few tokens: each eval is slow on a loaded machine
    print("smollm2 q4_k_m merged:", repr(text))
    assert "Paris" in text, "the merged model still answers like SmolLM2 (the adapter is mild)"
    with GGUFFile(out) as m:
        assert m.get("general.file_type") == 15 and m.tensors["blk.0.ffn_down.weight"].type.name == "Q6_K"
