"""torchtune adapters (adapter_model.pt + adapter_config.json, and its PEFT export beside them).

Which case applies: torchtune 0.6.1 cannot be imported next to torch 2.13 (see the last test), so most files
here are written from the format as torchtune's source defines it: the checkpointer `torch.save`s the adapter
state dict as is (training/checkpointing/_checkpointer.py), keys `layers.N.attn.q_proj.lora_a.weight` ...
(modules/peft/lora.py), q/k rows in Meta's interleaved order because hf_to_tune permutes q/k weights with
`_permute` (models/convert_weights.py, and models/gemma2/_convert_weights.py for gemma2; qwen2's converter
does not), and the PEFT export through tune_to_peft_adapter_weights. The ΔW comes from a real PEFT adapter and
the result is checked against transformers + PEFT on that adapter. The last test runs torchtune's own
convert_weights.py where torchtune's files are installed."""

import json

import numpy as np
import pytest
import torch

from conftest import fixture
from lora2gguf.adapters.peft import load_peft
from lora2gguf.adapters.load import adapter_format, load_adapter
from lora2gguf.weights.base_model import open_base
from lora2gguf.commands.convert import convert
from lora2gguf.errors import Lora2GGUFError
from lora2gguf.fileio.gguf_read import GGUFFile
from peft_helpers import assert_converts_like_peft, assert_merges_like_peft, make_peft_adapter

TUNE = {"self_attn.q_proj": "attn.q_proj", "self_attn.k_proj": "attn.k_proj", "self_attn.v_proj": "attn.v_proj",
        "self_attn.o_proj": "attn.output_proj", "mlp.gate_proj": "mlp.w1", "mlp.down_proj": "mlp.w2",
        "mlp.up_proj": "mlp.w3"}
TARGETS = {"o_proj": "output_proj", "gate_proj": "w1", "down_proj": "w2", "up_proj": "w3", "lm_head": "output"}


def meta_order(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """torchtune's hf_to_tune `_permute` (HF rotate-half rows → Meta's interleaved pairs), on lora_b's rows."""
    head_dim = t.shape[0] // n_heads
    return t.view(n_heads, 2, head_dim // 2, t.shape[1]).transpose(1, 2).reshape(head_dim * n_heads, t.shape[1])


def write_torchtune(peft_dir, out, arch, base=None):
    """A PEFT adapter's tensors under torchtune's names and layout, with torchtune's recipe config; `base`
    (default: the arch's fixture) gives the heads."""
    peft = load_peft(peft_dir)
    with open_base(base or fixture(arch)) as b:
        spec = b.spec
    sd = {}
    for name, m in peft.modules.items():
        if name == "lm_head":
            key, sub = "output", None
        else:
            layer, sub = name.split(".")[2], ".".join(name.split(".")[3:])
            key = f"layers.{layer}.{TUNE[sub]}"
        A, B = torch.from_numpy(m.A.copy()), torch.from_numpy(m.B.copy())
        if arch in ("llama", "gemma2") and sub in ("self_attn.q_proj", "self_attn.k_proj"):  # qwen2 keeps HF order
            B = meta_order(B, spec.n_head if sub.endswith("q_proj") else spec.n_head_kv)
        sd[f"{key}.lora_a.weight"], sd[f"{key}.lora_b.weight"] = A, B
        if m.magnitude is not None:
            sd[f"{key}.magnitude"] = torch.from_numpy(m.magnitude.copy())
    out.mkdir()
    torch.save(sd, out / "adapter_model.pt")
    targets = peft.config["target_modules"]
    cfg = {"r": peft.config["r"], "lora_alpha": peft.config["lora_alpha"], "peft_type": "LORA",
           "target_modules": [TARGETS.get(t, t) for t in (targets if isinstance(targets, list) else sorted(targets))]}
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    return out


ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])
def test_torchtune_converts_like_peft(arch, tmp_path):
    """llama: q/k lora_b rows arrive in Meta order and must be permuted exactly once on the way to GGUF;
    gemma2: in Meta order too (torchtune's gemma2 loader permutes), but llama.cpp keeps HF's order, so the
    GGUF holds them un-permuted; qwen2: HF order throughout."""
    peft_dir = make_peft_adapter(fixture(arch, "hf"), tmp_path / "peft", seed=51, r=4, lora_alpha=16,
                                 target_modules=ALL + (["lm_head"] if arch == "llama" else []))
    tune_dir = write_torchtune(peft_dir, tmp_path / "tune", arch)
    assert adapter_format(tune_dir) == "torchtune"
    print(arch, assert_converts_like_peft(arch, tune_dir, peft_dir, tmp_path / "a.gguf"))


def test_unpermute_needs_the_base_spec(tmp_path):
    """Read with the base's spec, the q/k rows are HF's again: the same deltas as the PEFT source."""
    peft_dir = make_peft_adapter(fixture("llama", "hf"), tmp_path / "peft", seed=52, r=4, lora_alpha=8,
                                 target_modules=["q_proj", "k_proj"])
    tune_dir = write_torchtune(peft_dir, tmp_path / "tune", "llama")
    with open_base(fixture("llama")) as b:
        ours = load_adapter(tune_dir, b.spec)
    peft = load_peft(peft_dir)
    for name, m in peft.modules.items():
        assert np.array_equal(ours.modules[name].delta(), m.delta()), name
    as_stored = load_adapter(tune_dir)  # no spec (inspect): rows as stored, which differ for q/k
    assert not np.array_equal(as_stored.modules["model.layers.0.self_attn.q_proj"].B,
                              peft.modules["model.layers.0.self_attn.q_proj"].B)


def test_peft_export_beside_pt_is_preferred_and_agrees(tmp_path):
    """torchtune's HF checkpointer writes adapter_model.pt and its PEFT export (HF order) in one directory."""
    peft_dir = make_peft_adapter(fixture("llama", "hf"), tmp_path / "peft", seed=53, r=4, lora_alpha=8,
                                 target_modules=["q_proj", "k_proj", "gate_proj"])
    tune_dir = write_torchtune(peft_dir, tmp_path / "tune", "llama")
    a = convert(tune_dir, fixture("llama"), tmp_path / "pt.gguf")
    both = tmp_path / "both"
    both.mkdir()
    (both / "adapter_model.pt").write_bytes((tune_dir / "adapter_model.pt").read_bytes())
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        (both / f).write_bytes((peft_dir / f).read_bytes())
    assert adapter_format(both) == "peft"
    b = convert(both, fixture("llama"), tmp_path / "both.gguf")
    with GGUFFile(a) as fa, GGUFFile(b) as fb:
        assert set(fa.tensors) == set(fb.tensors)
        for n in fa.tensors:
            assert np.allclose(fa.tensor(n), fb.tensor(n), rtol=1e-6, atol=1e-7), n


def test_torchtune_dora_merged_exactly(tmp_path):
    peft_dir = make_peft_adapter(fixture("llama", "hf"), tmp_path / "peft", seed=54, r=4, lora_alpha=8,
                                 use_dora=True, target_modules=["q_proj", "k_proj", "down_proj"])
    tune_dir = write_torchtune(peft_dir, tmp_path / "tune", "llama")
    with pytest.raises(Lora2GGUFError, match="DoRA"):
        convert(tune_dir, fixture("llama"), tmp_path / "a.gguf")
    assert_merges_like_peft("llama", tune_dir, peft_dir, tmp_path / "m.gguf")


def test_torchtune_bad_inputs(tmp_path):
    peft_dir = make_peft_adapter(fixture("llama", "hf"), tmp_path / "peft", seed=55, r=2, lora_alpha=4,
                                 target_modules=["v_proj"])
    tune_dir = write_torchtune(peft_dir, tmp_path / "tune", "llama")
    sd = torch.load(tune_dir / "adapter_model.pt", weights_only=True)
    torch.save({**sd, "layers.0.attn.pos_embeddings.lora_a.weight": sd["layers.0.attn.v_proj.lora_a.weight"]},
               tune_dir / "adapter_model.pt")
    with pytest.raises(Lora2GGUFError, match="pos_embeddings.*not a torchtune LoRA tensor"):
        load_adapter(tune_dir)
    torch.save({k: v for k, v in sd.items() if "lora_b" not in k or "layers.1" not in k}, tune_dir / "adapter_model.pt")
    with pytest.raises(Lora2GGUFError, match="layers.1.self_attn.v_proj.lora_A has no matching lora_B"):
        load_adapter(tune_dir)
    (tune_dir / "adapter_config.json").unlink()
    with pytest.raises(Lora2GGUFError, match="without adapter_config.json"):
        load_adapter(tune_dir)


# -- torchtune's own conversion code ------------------------------------------------------------------
# torchtune 0.6.1 does not import next to torch 2.13 (its package init needs a torchao that still has
# nf4tensor, and those torchao releases do not load on this torch), so the package cannot be used as such.
# Its models/convert_weights.py needs only torch: where torchtune's files are installed
# (`pip install --no-deps torchtune`), that module is loaded on its own and its hf_to_tune (what torchtune's
# checkpointer applies to q/k when it loads an HF model) makes the .pt's rows, and its
# tune_to_peft_adapter_weights (the PEFT export) is checked against our reader. Skipped otherwise; run here
# with torchtune 0.6.1.
def torchtune_convert_weights():
    import importlib.metadata
    import importlib.util

    try:
        path = importlib.metadata.distribution("torchtune").locate_file("torchtune/models/convert_weights.py")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("torchtune's files are not installed (pip install --no-deps torchtune)")
    spec = importlib.util.spec_from_file_location("torchtune_convert_weights", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_torchtune_own_conversion_code(tmp_path):
    cw = torchtune_convert_weights()
    peft_dir = make_peft_adapter(fixture("llama", "hf"), tmp_path / "peft", seed=56, r=4, lora_alpha=8, target_modules=ALL)
    peft = load_peft(peft_dir)
    with open_base(fixture("llama")) as b:
        spec = b.spec
    heads = dict(num_heads=spec.n_head, num_kv_heads=spec.n_head_kv, head_dim=spec.head_dim)
    sd = {}
    for name, m in peft.modules.items():  # lora_b's rows as torchtune's HF loader orders a weight's rows
        ((key, B),) = cw.hf_to_tune({name + ".weight": torch.from_numpy(m.B.copy())}, dim=m.r, **heads).items()
        sd[key.replace(".weight", ".lora_a.weight")] = torch.from_numpy(m.A.copy())
        sd[key.replace(".weight", ".lora_b.weight")] = B
    tune_dir = tmp_path / "tune"
    tune_dir.mkdir()
    torch.save(sd, tune_dir / "adapter_model.pt")
    (tune_dir / "adapter_config.json").write_text(json.dumps(
        {"r": 4, "lora_alpha": 8, "peft_type": "LORA", "target_modules": ["q_proj", "k_proj", "v_proj", "output_proj",
                                                                          "w1", "w2", "w3"]}))
    with open_base(fixture("llama")) as b:
        ours = load_adapter(tune_dir, b.spec)
    exported = cw.tune_to_peft_adapter_weights(sd, dim=spec.n_embd, **heads)  # torchtune's PEFT export
    for name, m in ours.modules.items():
        assert np.array_equal(m.B, exported[f"base_model.model.{name}.lora_B.weight"].numpy()), name
        assert np.array_equal(m.B, peft.modules[name].B), name
    assert_converts_like_peft("llama", tune_dir, peft_dir, tmp_path / "a.gguf")
