"""The in-process quantizer with an importance matrix (llamacpp.ggml + fileio.imatrix) writes byte for byte what
llama.cpp's own `llama-quantize --imatrix FILE` program writes: built from llama.cpp's tools/quantize and its
imatrix loader (tests/llama_cpp_source.py), so the file reading, the count normalisation, the per-expert
slices, the type choices that change with an imatrix (has_imatrix) and the quantize.imatrix.* keys are all
llama.cpp's. On a 256-wide llama base (every tensor takes the K/IQ types, no fallbacks) and on an MoE
variant of it (Mixtral-style 3-D ffn_*_exps, 4 experts, one of them never routed to in the matrix)."""

import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT
from gguf import GGMLQuantizationType as T
from gguf import GGUFWriter
from test_imatrix import write_legacy

from lora2gguf.errors import Lora2GGUFError
from lora2gguf.fileio.gguf_read import GGUFFile
from lora2gguf.fileio.gguf_write import copy_fields
from lora2gguf.fileio.imatrix import Imatrix, write_imatrix
from lora2gguf.llamacpp import ggml as qg
from lora2gguf.llamacpp.quantize import OUTPUT_TYPES

N_EXPERT = 4


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """dense.gguf: scripts/make_big_base.py at 256 wide, 4 layers, F16; moe.gguf: the same with each layer's
    FFN as 4 experts (perturbed copies, stacked) and a router, as a Mixtral GGUF stores them."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import make_big_base as mbb

    d = tmp_path_factory.mktemp("imatrix-bases")
    dims = dict(mbb.SHAPES["big"], n_layer=4, n_embd=256, n_ff=256, n_head=4, n_head_kv=1, n_vocab=512, n_ctx=256)
    mbb.write_base(d / "dense.gguf", seed=0, d=dims)
    rng = np.random.default_rng(1)
    with GGUFFile(d / "dense.gguf") as f:
        w = GGUFWriter(d / "moe.gguf", "llama")
        copy_fields(f, w)
        w.add_uint32("llama.expert_count", N_EXPERT)
        w.add_uint32("llama.expert_used_count", 2)
        for name, t in f.tensors.items():
            a = f.tensor(name)
            if any(f".{p}.weight" in name for p in ("ffn_gate", "ffn_up", "ffn_down")):
                experts = np.stack([a + 0.02 * rng.standard_normal(a.shape).astype(np.float32) for _ in range(N_EXPERT)])
                w.add_tensor(name.replace(".weight", "_exps.weight"), experts.astype(np.float16))
                if ".ffn_gate." in name:
                    w.add_tensor(name.replace("ffn_gate", "ffn_gate_inp"),
                                 rng.standard_normal((N_EXPERT, a.shape[1])).astype(np.float32))
            else:
                w.add_tensor(name, a.astype(np.float16) if t.type == T.F16 else a)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return d


def random_imatrix(model, seed: int = 0, leave_out: tuple[str, ...] = ()) -> Imatrix:
    """Sums of x² for every blk.* weight of 2+ dimensions (per expert for 3-D ones), heavy-tailed as real
    activations are, with integer token counts; expert 1 of every expert tensor was never routed to."""
    rng = np.random.default_rng(seed)
    im = Imatrix(datasets=["calibration.txt"], chunk_count=5, chunk_size=128)
    with GGUFFile(model) as f:
        for name, t in f.tensors.items():
            if not name.startswith("blk.") or len(t.shape) < 2 or any(s in name for s in leave_out):
                continue
            n_mat = t.shape[0] if len(t.shape) == 3 else 1
            counts = rng.integers(50, 640, n_mat).astype(np.float32)
            if n_mat > 1:
                counts[1] = 0
            im.sums[name] = (rng.lognormal(0, 2, (n_mat, t.shape[-1])) * counts[:, None]).astype(np.float32)
            im.counts[name] = counts
    return im


def llama_quantize(binary, imatrix, src, dst, quant):
    r = subprocess.run([str(binary), "--imatrix", str(imatrix), str(src), str(dst), quant.upper(), "2"],
                       capture_output=True, text=True)
    return r.returncode, r.stdout + r.stderr


def ours(src, dst, quant, imatrix_path, **kw):
    return qg.quantize_file(src, dst, OUTPUT_TYPES[quant].ftype, threads=2, imatrix=qg.Importance.of(str(imatrix_path)),
                            **kw).read_bytes()


CASES = [("dense", q) for q in ("q4_k_m", "q3_k_m", "iq4_xs", "q2_k_s", "iq3_xxs", "iq2_xs", "iq2_xxs", "iq1_s")]
CASES += [("moe", q) for q in ("q4_k_m", "iq2_xs", "q2_k_s")]


@pytest.mark.parametrize("model,quant", CASES, ids=["-".join(c) for c in CASES])
def test_same_bytes_as_llama_quantize(llama_quantize_bin, bases, model, quant, tmp_path):
    src = bases / f"{model}.gguf"
    write_imatrix(tmp_path / "im.gguf", random_imatrix(src), "llama")
    rc, log = llama_quantize(llama_quantize_bin, tmp_path / "im.gguf", src, tmp_path / "theirs.gguf", quant)
    assert rc == 0, log[-2000:]
    assert ours(src, tmp_path / "ours.gguf", quant, tmp_path / "im.gguf") == (tmp_path / "theirs.gguf").read_bytes()


def test_legacy_dat_same_bytes(llama_quantize_bin, bases, tmp_path):
    src = bases / "dense.gguf"
    im = random_imatrix(src, seed=3)
    entries = {n: (int(im.counts[n][0]) // 100, im.sums[n][0] / im.counts[n][0] * (im.counts[n][0] // 100))
               for n in im.sums}
    dat = write_legacy(tmp_path / "im.dat", entries, chunks=9, dataset="wiki.train.raw")
    rc, log = llama_quantize(llama_quantize_bin, dat, src, tmp_path / "theirs.gguf", "iq2_xs")
    assert rc == 0, log[-2000:]
    assert ours(src, tmp_path / "ours.gguf", "iq2_xs", dat) == (tmp_path / "theirs.gguf").read_bytes()


def test_the_comparison_sees_the_matrix_and_each_experts_slice(bases, tmp_path):
    """Controls for the byte checks above: the matrix changes the bytes, and so does giving each expert
    another expert's slice (an expert-major/minor mix-up could not pass them)."""
    src = bases / "moe.gguf"
    im = random_imatrix(src)
    write_imatrix(tmp_path / "im.gguf", im, "llama")
    right = ours(src, tmp_path / "a.gguf", "q4_k_m", tmp_path / "im.gguf")
    plain = qg.quantize_file(src, tmp_path / "b.gguf", OUTPUT_TYPES["q4_k_m"].ftype, threads=2).read_bytes()
    for name in im.sums:
        if "_exps" in name:
            im.sums[name], im.counts[name] = im.sums[name][::-1].copy(), im.counts[name][::-1].copy()
    write_imatrix(tmp_path / "swapped.gguf", im, "llama")
    swapped = ours(src, tmp_path / "c.gguf", "q4_k_m", tmp_path / "swapped.gguf")
    assert len({right, plain, swapped}) == 3


def test_missing_entry_for_a_type_that_needs_one(llama_quantize_bin, bases, tmp_path):
    src = bases / "dense.gguf"
    write_imatrix(tmp_path / "im.gguf", random_imatrix(src, leave_out=("blk.2.attn_q",)), "llama")
    rc, log = llama_quantize(llama_quantize_bin, tmp_path / "im.gguf", src, tmp_path / "theirs.gguf", "iq2_xs")
    assert rc != 0 and "Missing importance matrix for tensor blk.2.attn_q.weight" in log
    with pytest.raises(Lora2GGUFError, match="blk.2.attn_q.weight: IQ2_XS needs an importance matrix"):
        ours(src, tmp_path / "ours.gguf", "iq2_xs", tmp_path / "im.gguf")
    assert not (tmp_path / "ours.gguf").exists()


def test_a_matrix_for_another_shape_is_refused(bases, tmp_path):
    im = random_imatrix(bases / "dense.gguf")
    im.sums["blk.0.attn_k.weight"] = im.sums["blk.0.attn_k.weight"][:, :128].copy()
    write_imatrix(tmp_path / "im.gguf", im, "llama")
    with pytest.raises(Lora2GGUFError, match="blk.0.attn_k.weight: the importance matrix has 128 values"):
        ours(bases / "dense.gguf", tmp_path / "ours.gguf", "q4_k_m", tmp_path / "im.gguf")


def test_without_a_matrix_these_types_are_refused(bases, tmp_path):
    for quant in ("iq2_xs", "q2_k_s"):
        with pytest.raises(Lora2GGUFError, match="needs an importance matrix"):
            qg.quantize_file(bases / "dense.gguf", tmp_path / "o.gguf", OUTPUT_TYPES[quant].ftype)
    assert list(tmp_path.iterdir()) == []
