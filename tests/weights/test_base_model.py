"""Base readers: GGUF and HF directories give the same spec and the same tensors in HF layout."""

import json
import shutil

import numpy as np
import pytest

from conftest import ARCHS, fixture
from lora2gguf import models
from lora2gguf.models.llama import permute_rows, unpermute_rows
from lora2gguf.weights.base_model import GGUFBase, HFBase, open_base
from lora2gguf.errors import Lora2GGUFError


@pytest.mark.parametrize("arch", ARCHS)
def test_gguf_and_hf_agree(arch):
    with GGUFBase(fixture(arch)) as g, HFBase(fixture(arch, "hf")) as h:
        gs, hs = g.spec.to_dict(), h.spec.to_dict()
        gs.pop("name"), hs.pop("name")
        assert gs == hs
        assert g.spec.arch == arch and g.spec.n_head != g.spec.n_head_kv
        assert g.spec.qk_norm == (arch in ("qwen3", "gemma3")) and g.spec.attn_bias == (arch == "qwen2")
        for name in g.hf_names():
            assert np.array_equal(g.tensor(name), h.tensor(name)), name


def test_permutation_round_trip():
    w = np.arange(8 * 16 * 3, dtype=np.float32).reshape(8 * 16, 3)
    p = permute_rows(w, 8)
    assert not np.array_equal(p, w)
    assert np.array_equal(unpermute_rows(p, 8), w)


def test_gguf_names_come_from_gguf_py():
    assert models.get("llama").gguf_name(2, "model.layers.1.self_attn.q_proj.weight") == "blk.1.attn_q.weight"
    assert models.get("qwen2").gguf_name(2, "model.layers.0.self_attn.k_proj.bias") == "blk.0.attn_k.bias"
    assert models.get("qwen3").gguf_name(2, "model.layers.0.self_attn.q_norm.weight") == "blk.0.attn_q_norm.weight"
    assert models.get("llama").gguf_name(2, "lm_head.weight") == "output.weight"


def test_quantized_fixtures_dequantize_close_to_f32():
    with GGUFBase(fixture("llama")) as f32, GGUFBase(fixture("llama", "q8_0")) as q8:
        w, q = f32.tensor("model.layers.0.mlp.up_proj.weight"), q8.tensor("model.layers.0.mlp.up_proj.weight")
        assert 0 < np.abs(w - q).max() < 0.01 * np.abs(w).max()


def test_unknown_arch(tmp_path):
    d = tmp_path / "hf"
    shutil.copytree(fixture("llama", "hf"), d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["GPT2LMHeadModel"], "gpt2"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(Lora2GGUFError, match="unsupported architecture 'GPT2LMHeadModel'.*llama, qwen2, qwen3"):
        open_base(d)


def test_missing_tensor(tmp_path):
    import gguf

    from lora2gguf.fileio.gguf_read import GGUFFile
    from lora2gguf.fileio.gguf_write import copy_fields

    out = tmp_path / "missing.gguf"
    with GGUFFile(fixture("llama")) as f:
        w = gguf.GGUFWriter(str(out), "llama")
        copy_fields(f, w)
        for name in f.tensors:
            if name != "blk.1.ffn_up.weight":
                w.add_tensor(name, f.tensor(name))
        w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(Lora2GGUFError, match="blk.1.ffn_up.weight is missing"):
        open_base(out)


def test_adapter_is_not_a_base(tmp_path):
    import gguf

    out = tmp_path / "adapter.gguf"
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_type("adapter")
    w.add_tensor("blk.0.attn_q.weight.lora_a", np.zeros((2, 64), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(Lora2GGUFError, match="LoRA adapter, not a base model"):
        open_base(out)


def test_phi3_longrope_refused_by_name(tmp_path):
    """The 128k Phi-3 variants' longrope factors are not implemented: refused in one line that names them."""
    import json
    import shutil

    from lora2gguf.errors import Lora2GGUFError

    hf = shutil.copytree(fixture("phi3", "hf"), tmp_path / "hf")
    cfg = json.loads((hf / "config.json").read_text())
    cfg["rope_scaling"] = {"type": "longrope", "long_factor": [1.0] * 4, "short_factor": [1.0] * 4}
    (hf / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(Lora2GGUFError, match="'longrope'.*128k-context Phi-3"):
        HFBase(hf)
