"""`merge --imatrix FILE` and `--imatrix-data DATA`: quantization with an importance matrix, byte for byte what
llama.cpp's own `llama-quantize --imatrix` writes from our f32 merge with the same matrix; the matrix that
--imatrix-data measures is the one transformers + the real PEFT give on the merged model (sum of x² per input
column of every projection); the adapter's training data as the default; verify's floors with the same
matrix; the refusals."""

import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, fixture
from lora2gguf.cli import main
from lora2gguf.commands.merge import merge
from lora2gguf.commands.verify import verify
from lora2gguf.fileio.gguf_read import GGUFFile
from lora2gguf.fileio.imatrix import Imatrix, read_imatrix, write_imatrix
from lora2gguf.llamacpp.tokenizer import Tokenizer
from lora2gguf.training.data import calibration_sequences
from lora2gguf.weights.base_model import GGUFBase
from peft_helpers import make_peft_adapter

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TEXT = ROOT / "fixtures" / "train" / "text.jsonl"


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    d = tmp_path_factory.mktemp("imatrix-adapters")
    return {a: make_peft_adapter(fixture(a, "hf"), d / a, seed=7, b_std=0.2, r=4, lora_alpha=8,
                                 target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"] if a == "phi3"
                                 else LINEARS) for a in ("llama", "qwen3", "gemma3", "phi3")}


@pytest.mark.parametrize("arch,quant", [("llama", "iq2_xs"), ("qwen3", "q4_k_m"), ("gemma3", "q2_k_s")])
def test_same_bytes_as_llama_quantize_imatrix(llama_quantize_bin, adapters, arch, quant, tmp_path):
    """--imatrix-data writes the matrix, then quantizes with it: byte for byte what llama-quantize --imatrix
    makes of our f32 merge with that file; and --imatrix with that file gives the same bytes again."""
    pairs = [(adapters[arch], 1.0)]
    im = tmp_path / "im.gguf"
    ours = merge(fixture(arch), pairs, tmp_path / "ours.gguf", quant=quant, imatrix_data=TEXT, imatrix_out=im)
    f32 = merge(fixture(arch), pairs, tmp_path / "f32.gguf", quant="f32")
    r = subprocess.run([str(llama_quantize_bin), "--imatrix", str(im), str(f32), str(tmp_path / "theirs.gguf"),
                        quant.upper(), "2"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert ours.read_bytes() == (tmp_path / "theirs.gguf").read_bytes()
    again = merge(fixture(arch), pairs, tmp_path / "again.gguf", quant=quant, imatrix=str(im))
    assert again.read_bytes() == ours.read_bytes()
    with GGUFFile(ours) as f:
        assert f.get("quantize.imatrix.file") == str(im) and f.get("quantize.imatrix.dataset") == str(TEXT)
        assert f.get("quantize.imatrix.entries_count") == len(read_imatrix(im).sums)
    plain = merge(fixture(arch), pairs, tmp_path / "plain.gguf", quant="q4_k_m")
    with_im = ours if quant == "q4_k_m" else merge(fixture(arch), pairs, tmp_path / "q4.gguf", quant="q4_k_m",
                                                    imatrix=str(im))
    assert plain.read_bytes() != with_im.read_bytes(), "the matrix must change what is written"


def transformers_imatrix(hf_dir, adapter_dir, sequences, with_adapter=True) -> dict[str, tuple[np.ndarray, int]]:
    """HF module path → (sum of x² per input column, tokens) over every projection of every layer of the
    transformers model with the real PEFT adapter on it (or without it)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)
    if with_adapter:
        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    out: dict = {}

    def hook(name):
        def pre(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            s, n = out.get(name, (0, 0))
            out[name] = (s + (x * x).sum(0).numpy(), n + x.shape[0])
        return pre

    for name, module in model.named_modules():
        m = re.search(r"layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj)$", name)
        if m:
            module.register_forward_pre_hook(hook(f"model.layers.{m[1]}.{m[2]}.{m[3]}"))
    with torch.no_grad():
        for seq in sequences:
            model(torch.tensor([seq]))
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3", "phi3"])
def test_measured_matrix_is_transformers_and_peft(adapters, arch, tmp_path):
    merge(fixture(arch), [(adapters[arch], 1.0)], tmp_path / "m.gguf", quant="q8_0", imatrix_data=TEXT)
    im = read_imatrix(tmp_path / "m.imatrix.gguf")  # the default path: beside the output
    with GGUFBase(fixture(arch)) as b:
        seqs = calibration_sequences(TEXT, Tokenizer(b.path))
        want = transformers_imatrix(fixture(arch, "hf"), adapters[arch], seqs)
        plain = transformers_imatrix(fixture(arch, "hf"), adapters[arch], seqs, with_adapter=False)
        names = {b.gguf_name(hf + ".weight"): hf for hf in want}
    assert set(im.sums) == set(names) and im.datasets == [str(TEXT)] and im.chunk_count == len(seqs)
    moved = 0
    for g, hf in names.items():
        s, n = want[hf]
        assert im.counts[g].tolist() == [n] == [sum(map(len, seqs))]
        np.testing.assert_allclose(im.sums[g][0], s, rtol=2e-4, atol=1e-6 * s.max(), err_msg=g)
        moved += not np.allclose(plain[hf][0], s, rtol=1e-3)
    assert moved > len(names) // 2, "the adapter must change the activations the matrix is taken on"


def test_adapter_training_data_is_the_default(tmp_path, capsys):
    data = tmp_path / "text.jsonl"
    data.write_text(TEXT.read_text())
    run = tmp_path / "run"
    assert main(["train", "--base", str(fixture("llama")), "--data", str(data), "-o", str(run), "--rank", "4",
                 "--steps", "2", "--seq-len", "64"]) == 0
    capsys.readouterr()
    out = tmp_path / "m.gguf"
    assert main(["merge", "--base", str(fixture("llama")), "--lora", str(run), "--quant", "iq2_xs", "-o", str(out),
                 "--imatrix-data"]) == 0
    assert read_imatrix(tmp_path / "m.imatrix.gguf").datasets == [str(data.resolve())]
    data.write_text(TEXT.read_text() + '{"text": "one more line"}\n')
    assert main(["merge", "--base", str(fixture("llama")), "--lora", str(run), "--quant", "iq2_xs", "-o",
                 str(tmp_path / "m2.gguf"), "--imatrix-data"]) == 2
    err = capsys.readouterr().err
    assert "changed since training" in err and err.count("\n") == 1
    assert not (tmp_path / "m2.gguf").exists() and not (tmp_path / "m2.imatrix.gguf").exists()


def test_verify_judges_an_imatrix_merge_with_the_same_matrix(adapters, tmp_path, capsys):
    pair = [(str(adapters["llama"]), 1.0)]
    m = merge(fixture("llama"), pair, tmp_path / "m.gguf", quant="q3_k_m", imatrix_data=TEXT)
    report = verify(fixture("llama"), pair, merged=m, n_tokens=48)
    assert report["pass"], report["pairs"]
    assert report["merged_imatrix"] == str(tmp_path / "m.imatrix.gguf")
    (tmp_path / "m.imatrix.gguf").rename(tmp_path / "moved.gguf")
    code = main(["verify", "--base", str(fixture("llama")), "--lora", str(adapters["llama"]), "--merged", str(m),
                 "--tokens", "48"])
    err = capsys.readouterr().err
    assert code == 2 and "which is not there; pass --imatrix FILE" in err
    report = verify(fixture("llama"), pair, merged=m, n_tokens=48, imatrix=tmp_path / "moved.gguf")
    assert report["pass"] and report["merged_imatrix"] == str(tmp_path / "moved.gguf")


def _other_model_matrix(path):
    im = Imatrix(datasets=["x"], chunk_count=1, chunk_size=8)
    im.sums["blk.0.ffn_gate_exps.weight"] = np.ones((1, 64), np.float32)
    im.counts["blk.0.ffn_gate_exps.weight"] = np.ones(1, np.float32)
    write_imatrix(path, im, "qwen3moe")
    return path


@pytest.mark.parametrize("case,args,match", [
    ("needs-one", ["--quant", "iq2_xs"], r"--quant iq2_xs: llama.cpp needs an importance matrix"),
    ("float-type", ["--quant", "f16", "--imatrix-data", str(TEXT)], r"--quant f16 is written without quantization"),
    ("both", ["--quant", "q4_k_m", "--imatrix-data", str(TEXT), "--imatrix", "x.gguf"], r"give one"),
    ("out-alone", ["--quant", "q4_k_m", "--imatrix-out", "x.gguf"], r"give --imatrix-data too"),
    ("other-model", ["--quant", "q4_k_m", "--imatrix", "OTHER"], r"it was computed for another model"),
    ("no-record", ["--quant", "q4_k_m", "--imatrix-data"], r"no record of its training data"),
    ("missing-data", ["--quant", "q4_k_m", "--imatrix-data", "nope.jsonl"], r"nope.jsonl: no such file"),
    ("out-exists", ["--quant", "q4_k_m", "--imatrix-data", str(TEXT), "--imatrix-out", "EXISTS"], r"exists"),
])
def test_refusals_are_one_line_and_write_nothing(adapters, tmp_path, capsys, case, args, match):
    (tmp_path / "exists.gguf").write_text("keep")
    args = [str(_other_model_matrix(tmp_path / "other.gguf")) if a == "OTHER" else
            str(tmp_path / "exists.gguf") if a == "EXISTS" else a for a in args]
    before = sorted(p.name for p in tmp_path.iterdir())
    code = main(["merge", "--base", str(fixture("llama")), "--lora", str(adapters["llama"]), "-o",
                 str(tmp_path / "m.gguf"), *args])
    err = capsys.readouterr().err
    assert code == 2 and re.search(match, err) and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert (tmp_path / "exists.gguf").read_text() == "keep"


def test_plain_merge_still_starts_without_torch(adapters, tmp_path):
    """--imatrix-data needs the PyTorch reference; a merge without it (--imatrix FILE included) does not
    import torch (checked in a fresh interpreter)."""
    m = merge(fixture("llama"), [(adapters["llama"], 1.0)], tmp_path / "m.gguf", quant="q4_k_m", imatrix_data=TEXT)
    code = ("import sys; from lora2gguf.cli import main; "
            f"rc = main(['merge', '--base', {str(fixture('llama'))!r}, '--lora', {str(adapters['llama'])!r}, "
            f"'--quant', 'iq2_xs', '--imatrix', {str(tmp_path / 'm.imatrix.gguf')!r}, "
            f"'-o', {str(tmp_path / 'o.gguf')!r}]); print(rc, 'torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.split()[-2:] == ["0", "False"], r.stdout + r.stderr
    assert m.is_file()


def test_expert_stacks_get_per_expert_sums_over_the_tokens_routed_to_them(tmp_path, moe_arch):
    """On a mixture of experts each ffn_*_exps stack gets one row of sums and one count per expert, over the real
    tokens routed to it (padding left out), as llama-imatrix keeps them: the counts equal the experts llama.cpp
    routes the same tokens to on the merged F32 file; summed over experts, gate's sums are n_used × the router's
    (both read the same normed input); and merge --imatrix-data writes those rows."""
    from conftest import token_ids

    from lora2gguf.adapters.load import load_adapter
    from lora2gguf.llamacpp.runtime import LlamaRuntime
    from lora2gguf.parity.importance import measure_importance
    from lora2gguf.weights.base_model import open_base

    d = make_peft_adapter(fixture(moe_arch, "hf"), tmp_path / "a", r=4, lora_alpha=16, b_std=0.2,
                          target_modules=["q_proj"],
                          target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    seqs = [token_ids(300, 40, seed=1), token_ids(300, 25, seed=2)]  # batched together: the second is padded
    with open_base(fixture(moe_arch)) as b:
        im = measure_importance(b, [(load_adapter(d, b.spec), 1.0)], seqs, "test")
        spec = b.spec
    merged = merge(fixture(moe_arch), [(str(d), 1.0)], tmp_path / "m.gguf", quant="f32", progress=False)
    want = {L: np.zeros(spec.n_expert) for L in range(spec.n_layer)}
    with LlamaRuntime(merged, n_ctx=64, moe_routing=True) as rt:
        for s in seqs:
            rt.logits(s)
            for L, ids in rt.routing.items():
                want[L] += np.bincount(ids.reshape(-1), minlength=spec.n_expert)
    for L in range(spec.n_layer):
        gate, router = f"blk.{L}.ffn_gate_exps.weight", f"blk.{L}.ffn_gate_inp.weight"
        for stack in ("gate", "up", "down"):
            name = f"blk.{L}.ffn_{stack}_exps.weight"
            assert im.sums[name].shape[0] == spec.n_expert and np.array_equal(im.counts[name], want[L]), name
        assert im.counts[router][0] == sum(map(len, seqs))
        np.testing.assert_allclose(im.sums[gate].sum(0), spec.n_expert_used * im.sums[router][0], rtol=1e-5)
    assert want[0].sum() == spec.n_expert_used * sum(map(len, seqs))
    data = tmp_path / "d.txt"
    data.write_text("the cat sat on the mat and the dog sat with the cat " * 8)
    merge(fixture(moe_arch), [(str(d), 1.0)], tmp_path / "q.gguf", quant="q4_k_m", progress=False,
          imatrix_data=data, imatrix_out=tmp_path / "q.imatrix.gguf")
    written = read_imatrix(tmp_path / "q.imatrix.gguf")
    assert written.sums["blk.0.ffn_down_exps.weight"].shape[0] == spec.n_expert
