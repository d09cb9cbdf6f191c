"""`lora2gguf analyze`: every number against numpy's SVD of ΔW as the real PEFT library computes it."""

import json
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import fixture
from lora2gguf.commands.analyze import analyze
from lora2gguf.weights.base_model import open_base
from lora2gguf.cli import main
from lora2gguf.commands.convert import convert
from peft_helpers import make_peft_adapter, peft_deltas
from test_convert import CASES


def truth(delta: np.ndarray) -> dict:
    s = np.linalg.svd(delta, compute_uv=False)
    e = np.cumsum(s ** 2) / (s ** 2).sum()
    p = s[s > 1e-12 * s[0]] / s.sum()
    return {"s": s, "fro": np.linalg.norm(delta), "spec": s[0], "k90": int(np.argmax(e >= 0.9)) + 1,
            "k99": int(np.argmax(e >= 0.99 - 1e-12)) + 1, "stable": (s ** 2).sum() / s[0] ** 2,
            "entropy": np.exp(-(p * np.log(p)).sum())}


def low_rank_adapter(tmp_path, arch="llama", true_rank=3, name="a", **kw):
    """A real PEFT adapter of rank r whose B has only `true_rank` non-zero columns: ΔW has rank true_rank."""
    d = make_peft_adapter(fixture(arch, "hf"), tmp_path / name, seed=7, **kw)
    st = d / "adapter_model.safetensors"
    t = load_file(st)
    for k, v in t.items():
        if "lora_B" in k or "lora_embedding_B" in k:
            v[:, true_rank:] = 0
    save_file(t, str(st), metadata={"format": "pt"})
    return d


def check_against(report, deltas, rel_base=None):
    assert {m["module"] for m in report["modules"]} == set(deltas)
    for m in report["modules"]:
        t = truth(deltas[m["module"]])
        q = len(m["singular_values"])
        np.testing.assert_allclose(m["singular_values"], t["s"][:q], rtol=1e-5, atol=1e-6 * t["spec"])
        assert np.all(t["s"][q:] <= 1e-5 * t["spec"])  # nothing beyond the adapter's rank
        assert m["fro"] == pytest.approx(t["fro"], rel=1e-5) and m["spectral"] == pytest.approx(t["spec"], rel=1e-5)
        assert (m["rank_90"], m["rank_99"]) == (t["k90"], t["k99"])
        assert m["stable_rank"] == pytest.approx(t["stable"], rel=1e-5)
        assert m["entropy_rank"] == pytest.approx(t["entropy"], rel=1e-4)
        np.testing.assert_allclose(m["energy"][-1], 1.0)
        if rel_base is not None:
            w = rel_base.tensor(m["module"] + ".weight").astype(np.float64)
            assert m["rel_fro"] == pytest.approx(t["fro"] / np.linalg.norm(w), rel=1e-5)
            assert m["rel_spectral"] == pytest.approx(t["spec"] / np.linalg.norm(w, 2), rel=1e-3)


@pytest.mark.parametrize("case", ["llama-patterns", "llama-embed-head", "qwen2-rslora-patterns"])
def test_analyze_matches_numpy_svd_of_peft_delta(case, tmp_path):
    arch, kw = CASES[case]
    d = make_peft_adapter(fixture(arch, "hf"), tmp_path / "a", seed=3, **kw)
    deltas = peft_deltas(fixture(arch, "hf"), d)
    report = analyze(d)
    check_against(report, deltas)
    # the uniform rank: the smallest K whose top-K per module hold 90% / 99% of the summed energy
    spectra = [np.linalg.svd(x, compute_uv=False) ** 2 for x in deltas.values()]
    total = sum(v.sum() for v in spectra)
    for e in (0.9, 0.99):
        k = next(k for k in range(1, 99) if sum(v[:k].sum() for v in spectra) >= e * total)
        assert report[f"uniform_rank_{round(e * 100)}"] == k
    with open_base(fixture(arch)) as b:
        check_against(analyze(d, fixture(arch)), deltas, rel_base=b)


def test_gguf_lora_without_base_is_row_order_free(tmp_path):
    """A llama GGUF LoRA's q/k rows are permuted; without --base they stay so, and nothing changes."""
    arch, kw = CASES["llama-patterns"]
    d = make_peft_adapter(fixture(arch, "hf"), tmp_path / "a", seed=4, **kw)
    gguf = convert(d, fixture(arch), tmp_path / "a.gguf")
    deltas = peft_deltas(fixture(arch, "hf"), d)
    check_against(analyze(gguf), deltas)
    check_against(analyze(gguf, fixture(arch)), deltas)


def test_verdict_finds_the_true_rank(tmp_path, capsys):
    d = low_rank_adapter(tmp_path, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"])
    r = analyze(d)
    assert all(m["numerical_rank"] == 3 for m in r["modules"])
    assert r["uniform_rank_99"] <= 3 and r["uniform_energy_99"] >= 0.99
    assert f"lives in {r['uniform_rank_99']} of its r=8 dimensions" in r["verdict"]
    assert main(["analyze", str(d), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["verdict"] == r["verdict"] and len(out["modules"][0]["singular_values"]) == 8
    assert main(["analyze", str(d)]) == 0
    text = capsys.readouterr().out
    assert text.strip().splitlines()[-1] == r["verdict"] and "q_proj" in text


def test_plot(tmp_path, monkeypatch, capsys):
    d = low_rank_adapter(tmp_path, r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"])
    png = tmp_path / "heat.png"
    assert main(["analyze", str(d), "--base", str(fixture("llama")), "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    capsys.readouterr()
    assert main(["analyze", str(d), "--plot", str(tmp_path / "no.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --plot needs matplotlib") and not (tmp_path / "no.png").exists()


def test_errors(tmp_path, capsys):
    d = make_peft_adapter(fixture("llama", "hf"), tmp_path / "a", seed=1, r=4, lora_alpha=8, target_modules=["q_proj"])
    capsys.readouterr()  # transformers' progress bars
    for args in (["analyze", str(tmp_path / "missing")], ["analyze", str(d), "--base", str(fixture("qwen2"))],
                 ["analyze", str(fixture("llama"))]):
        assert main(args) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), err
