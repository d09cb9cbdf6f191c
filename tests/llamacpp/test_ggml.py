"""quantize_ggml: llama.cpp's quantizer run in this process, tensor by tensor from float rows, writes byte for
byte what llama_model_quantize writes: on every arch fixture, for every file type merge offers, from F32, F16
and quantized bases, from a file (quantize_file) and from a model that is never a file (quantize_replaced,
the probe's dry run), and on a wider base where the K-quants fit every tensor and q4_k_m mixes types by layer."""

import ctypes
import sys

import numpy as np
import pytest
from conftest import ARCHS, ROOT, fixture, merge_input_file
from gguf import GGMLQuantizationType as T
from gguf import LlamaFileType

from lora2gguf.errors import Lora2GGUFError
from lora2gguf.fileio.gguf_read import GGUFFile
from lora2gguf.fileio.gguf_write import dequantize_file
from lora2gguf.llamacpp import ggml as qg
from lora2gguf.llamacpp.quantize import OUTPUT_TYPES

FTYPES = [n for n, t in OUTPUT_TYPES.items() if t.direct is None and not t.needs_imatrix]  # q8_0 ... iq3_m


def ftype(name: str) -> LlamaFileType:
    return OUTPUT_TYPES[name].ftype


def llama_model_quantize(src, dst, ft) -> int:
    """llama.cpp's own quantizer (what `llama-quantize` runs), in this process."""
    import llama_cpp

    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype, p.nthread, p.allow_requantize = int(ft), 2, True
    return llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(p))


def theirs(src, dst, ft):
    assert llama_model_quantize(src, dst, ft) == 0
    return dst


def test_output_types_cover_the_issue_list():
    assert set(FTYPES) >= {"q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s",
                           "q4_k_m", "q5_k_s", "q5_k_m", "q6_k", "iq4_nl", "iq4_xs"}


FILE_CASES = [(a, k, q) for a in ARCHS for k in ("f32", "q8_0") for q in FTYPES] + [
    (a, k, q) for a in ARCHS for k in ("f16", "q4_k_m") for q in ("q4_k_m", "q6_k", "iq4_xs", "q8_0")]


@pytest.mark.parametrize("arch,kind,quant", FILE_CASES, ids=["-".join(c) for c in FILE_CASES])
def test_quantize_file_is_llama_model_quantize(arch, kind, quant, tmp_path):
    src = fixture(arch, kind)
    ours = qg.quantize_file(src, tmp_path / "ours.gguf", ftype(quant), threads=2)
    assert ours.read_bytes() == theirs(src, tmp_path / "theirs.gguf", ftype(quant)).read_bytes()


COPY_CASES = [(a, k, q) for i, a in enumerate(ARCHS) for k in ("q4_k_m", "f16")
              for q in (FTYPES[(3 * i) % len(FTYPES)], FTYPES[(3 * i + 7) % len(FTYPES)], "q4_k_m")]


@pytest.mark.parametrize("arch,kind,quant", COPY_CASES, ids=["-".join(c) for c in COPY_CASES])
def test_replaced_route_without_the_file(arch, kind, quant, tmp_path):
    """quantize_replaced (the verify floors' route: the model a merge hands the quantizer, never a file, its
    types from the dry run of a shape-cut probe) == llama_model_quantize of that model as a file (one tensor
    replaced, F32; the others as stored)."""
    src = fixture(arch, kind)
    with GGUFFile(src) as f:
        name = "blk.0.ffn_down.weight"
        new = f.tensor(name) + np.random.default_rng(0).standard_normal(f.tensors[name].shape).astype(np.float32) * 0.01
    merge_input_file(src, tmp_path / "input.gguf", {name: new})
    ref = theirs(tmp_path / "input.gguf", tmp_path / "theirs.gguf", ftype(quant))
    ours = qg.quantize_replaced(src, tmp_path / "ours.gguf", ftype(quant), {name: new}, threads=2)
    assert ours.read_bytes() == ref.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["input.gguf", "ours.gguf", "theirs.gguf"], "no temp left"
    with GGUFFile(src) as f, GGUFFile(ours) as o:  # the control: untouched tensors of their target type are copied
        kept = [n for n, t in f.tensors.items() if n != name and o.tensors[n].type == t.type]
        assert kept and all(np.array_equal(o.raw(n), f.raw(n)) for n in kept)
        if kind == "q4_k_m" and quant == "q4_k_m":
            assert any(f.tensors[n].type != T.F32 for n in kept), "quantized tensors kept their bytes"


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A llama base whose rows fit the 256-wide K-quant blocks everywhere (no fallbacks), 4 layers so that the
    q4_k_m / q5_k_m / q3_k_m mixes differ by layer, 4 query heads per KV head (attn_v rules on n_gqa), F16
    (scripts/make_big_base.py at small dimensions: 1.7 M parameters), and its Q8_0 quantization."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import make_big_base as mbb

    d = tmp_path_factory.mktemp("wide")
    dims = dict(mbb.SHAPES["big"], n_layer=4, n_embd=256, n_ff=256, n_head=4, n_head_kv=1, n_vocab=512, n_ctx=256)
    mbb.write_base(d / "f16.gguf", seed=0, d=dims)
    theirs(d / "f16.gguf", d / "q8_0.gguf", LlamaFileType.MOSTLY_Q8_0)
    return d


WIDE_CASES = [("f16", q) for q in FTYPES] + [("q8_0", q) for q in ("q4_k_m", "q3_k_l", "q5_k_s", "iq4_xs")]


@pytest.mark.parametrize("kind,quant", WIDE_CASES, ids=["-".join(c) for c in WIDE_CASES])
def test_wide_base(wide, kind, quant, tmp_path):
    src = wide / f"{kind}.gguf"
    ours = qg.quantize_file(src, tmp_path / "ours.gguf", ftype(quant))
    assert ours.read_bytes() == theirs(src, tmp_path / "theirs.gguf", ftype(quant)).read_bytes()


@pytest.mark.parametrize("quant", ["q4_k_m", "q3_k_m"])
def test_wide_base_replaced_route(wide, quant, tmp_path):
    with GGUFFile(wide / "q8_0.gguf") as f:
        name = "blk.2.attn_v.weight"
        new = f.tensor(name) * 1.01
    ours = qg.quantize_replaced(wide / "q8_0.gguf", tmp_path / "ours.gguf", ftype(quant), {name: new})
    merge_input_file(wide / "q8_0.gguf", tmp_path / "input.gguf", {name: new})
    assert ours.read_bytes() == theirs(tmp_path / "input.gguf", tmp_path / "theirs.gguf", ftype(quant)).read_bytes()


def test_wide_base_exercises_the_mixes(wide, tmp_path):
    """The control for test_wide_base: there, q4_k_m is really Q4_K with Q6_K on some layers' attn_v and
    ffn_down (not the fallbacks the 64-wide fixtures take), so the per-tensor choice is what is compared."""
    out = qg.quantize_file(wide / "f16.gguf", tmp_path / "q.gguf", LlamaFileType.MOSTLY_Q4_K_M)
    with GGUFFile(out) as f:
        v = [f.tensors[f"blk.{i}.attn_v.weight"].type for i in range(4)]
        down = [f.tensors[f"blk.{i}.ffn_down.weight"].type for i in range(4)]
        assert f.tensors["blk.2.attn_q.weight"].type == T.Q4_K and f.tensors["output.weight"].type == T.Q6_K
    assert set(v) == {T.Q4_K, T.Q6_K} and set(down) == {T.Q4_K, T.Q6_K}, (v, down)


def test_bytes_do_not_depend_on_threads_or_chunks(wide, tmp_path, monkeypatch):
    src = wide / "q8_0.gguf"
    a = qg.quantize_file(src, tmp_path / "a.gguf", LlamaFileType.MOSTLY_Q5_K_M, threads=1).read_bytes()
    monkeypatch.setattr(qg, "TASK_ELEMENTS", 300)  # tasks of one row (256 wide)
    monkeypatch.setattr(qg, "SLAB_BYTES", 1000)
    b = qg.quantize_file(src, tmp_path / "b.gguf", LlamaFileType.MOSTLY_Q5_K_M, threads=4).read_bytes()
    assert a == b


def _importance(src, seed: int) -> qg.Importance:
    """A random importance matrix for every block weight of src (what llama-imatrix gives: one positive
    value per input column)."""
    rng = np.random.default_rng(seed)
    with GGUFFile(src) as f:
        return qg.Importance({n: rng.uniform(0.1, 3.0, t.shape[-1]).astype(np.float32) for n, t in f.tensors.items()
                              if n.startswith("blk.") and len(t.shape) == 2}, f"random-{seed}.imatrix")


def test_reused_quantizations_are_the_same_bytes(wide, tmp_path, monkeypatch):
    """reuse_quantizations: a merge's untouched tensors quantized again by its verify's floor (the base with the
    same matrix) are not quantized a second time, and the file is byte for byte what a fresh run writes.
    Controls: a replaced tensor, and every tensor under another matrix, are quantized anew."""
    src = wide / "q8_0.gguf"
    im, other = _importance(src, 0), _importance(src, 1)
    name = "blk.1.ffn_down.weight"
    with GGUFFile(src) as f:
        new = f.tensor(name) * 1.01
    q4 = LlamaFileType.MOSTLY_Q4_K_M
    fresh_whole = qg.quantize_replaced(src, tmp_path / "a.gguf", q4, {}, imatrix=im).read_bytes()
    fresh_replaced = qg.quantize_replaced(src, tmp_path / "b.gguf", q4, {name: new}, imatrix=im).read_bytes()
    fresh_other = qg.quantize_replaced(src, tmp_path / "c.gguf", q4, {}, imatrix=other).read_bytes()
    assert fresh_whole != fresh_replaced and fresh_whole != fresh_other

    calls = []
    task = qg._quantize_task
    monkeypatch.setattr(qg, "_quantize_task", lambda q, rows, tname, imp=None: calls.append(tname) or task(q, rows, tname, imp))
    with qg.reuse_quantizations():
        assert qg.quantize_replaced(src, tmp_path / "b2.gguf", q4, {name: new}, imatrix=im).read_bytes() == fresh_replaced
        first = set(calls)
        calls.clear()
        assert qg.quantize_replaced(src, tmp_path / "a2.gguf", q4, {}, imatrix=im).read_bytes() == fresh_whole
        assert set(calls) == {name}, "only the tensor that differs is quantized again"
        calls.clear()
        assert qg.quantize_replaced(src, tmp_path / "c2.gguf", q4, {}, imatrix=other).read_bytes() == fresh_other
        assert set(calls) == {n for n in first if n in other.values}, "another matrix: every tensor it weighs anew"
        assert first - set(other.values) == {"output.weight", "token_embd.weight"}  # no entry: the same work
    calls.clear()
    assert qg.quantize_replaced(src, tmp_path / "a3.gguf", q4, {}, imatrix=im).read_bytes() == fresh_whole
    assert set(calls) == first, "outside the block nothing is reused"


def test_reuse_keeps_at_most_its_budget(wide, tmp_path, monkeypatch):
    src = wide / "q8_0.gguf"
    calls = []
    task = qg._quantize_task
    monkeypatch.setattr(qg, "_quantize_task", lambda q, rows, tname, imp=None: calls.append(tname) or task(q, rows, tname, imp))
    with qg.reuse_quantizations(max_bytes=0):
        qg.quantize_file(src, tmp_path / "a.gguf", LlamaFileType.MOSTLY_Q4_K_M)
        n = len(calls)
        qg.quantize_file(src, tmp_path / "b.gguf", LlamaFileType.MOSTLY_Q4_K_M)
    assert n > 0 and len(calls) == 2 * n
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()


def test_types_come_from_llama_cpp(monkeypatch, tmp_path):
    """The types are llama.cpp's dry run's: what it says is what is written (so a stale copy of its rules
    could not hide here)."""
    real = qg.llama_target_types

    def all_q8(model, ft, verbose=False, imatrix=None):
        return [(n, None if t is None else T.Q8_0) for n, t in real(model, ft, verbose, imatrix)]

    monkeypatch.setattr(qg, "llama_target_types", all_q8)
    out = qg.quantize_file(fixture("llama"), tmp_path / "o.gguf", LlamaFileType.MOSTLY_Q4_K_M)
    with GGUFFile(out) as f:
        assert {t.type for t in f.tensors.values()} == {T.F32, T.Q8_0}


def test_nan_is_refused_like_llama_cpp(tmp_path):
    with GGUFFile(fixture("qwen2")) as f:
        bad = f.tensor("blk.1.attn_q.weight")
    bad[3, 5] = np.nan
    dequantize_file(fixture("qwen2"), tmp_path / "f32.gguf", {"blk.1.attn_q.weight": bad})
    assert llama_model_quantize(tmp_path / "f32.gguf", tmp_path / "theirs.gguf", LlamaFileType.MOSTLY_Q8_0) != 0
    with pytest.raises(Lora2GGUFError, match="blk.1.attn_q.weight.*not finite"):
        qg.quantize_replaced(fixture("qwen2"), tmp_path / "ours.gguf", LlamaFileType.MOSTLY_Q8_0,
                             {"blk.1.attn_q.weight": bad})
    assert not (tmp_path / "ours.gguf").exists() and not list(tmp_path.glob(".ours*")), "nothing left"


def test_imatrix_types_are_refused(tmp_path):
    with pytest.raises(Lora2GGUFError, match="importance matrix"):
        qg.quantize_file(fixture("llama", "f16"), tmp_path / "o.gguf", LlamaFileType.MOSTLY_IQ2_XXS)
    assert list(tmp_path.iterdir()) == []


def test_llama_cpp_log_callback_is_given_back(tmp_path):
    import llama_cpp

    get = llama_cpp.llama_cpp._lib["llama_log_get"]
    get.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_void_p)]

    def current():
        cb, ud = ctypes.c_void_p(), ctypes.c_void_p()
        get(ctypes.byref(cb), ctypes.byref(ud))
        return cb.value, ud.value

    before = current()
    qg.quantize_file(fixture("gemma2"), tmp_path / "o.gguf", LlamaFileType.MOSTLY_Q4_0)
    assert current() == before


def test_dequantize_rows_is_ggmls(tmp_path):
    """Untouched tensors that merge requantizes are converted by ggml (as llama.cpp does), not gguf-py: check
    the helper against ggml's own per-type functions on a Q4_K tensor."""
    from pathlib import Path

    import llama_cpp
    from llama_cpp._ctypes_extensions import load_shared_library

    lib = load_shared_library("ggml-base", Path(llama_cpp.__file__).parent / "lib")
    with GGUFFile(fixture("llama", "q4_k_m")) as f:
        t = f.tensors["blk.0.ffn_down.weight"]
        assert t.type == T.Q4_K
        raw = np.array(f.raw(t.name))
    got = qg.dequantize_rows(raw, t.type, t.shape[-1])
    want = np.empty(t.n_elements, np.float32)
    lib.dequantize_row_q4_K(raw.ctypes.data_as(ctypes.c_void_p), want.ctypes.data_as(ctypes.c_void_p),
                            ctypes.c_int64(t.n_elements))
    assert got.shape == t.shape and np.array_equal(got.reshape(-1), want)
