"""mlx-lm adapters (adapters.safetensors + adapter_config.json).

Which case applies: both. mlx has a Linux CPU wheel (mlx + mlx-cpu) and mlx-lm installs beside our
transformers, so the real mlx-lm makes, saves and runs adapters in the tests at the end of this file; they
are in the optional `formats` extra, not the test extras (CI install time), and skip without it. The tests
before them always run: they write the files from the format as mlx-lm's source defines it (mlx_lm/tuner/
lora.py LoRALinear / LoRAEmbedding, dora.py DoRALinear, mlx_lm/lora.py: `adapters.safetensors` from
`tree_flatten(model.trainable_parameters())`, `adapter_config.json` from the run's arguments), from a real
PEFT adapter's ΔW, and check against transformers + PEFT on that adapter."""

import json

import numpy as np
import pytest

from conftest import fixture
from lora2gguf.adapters.peft import load_peft
from lora2gguf.fileio.tensors import safetensors_header
from lora2gguf.adapters.load import load_adapter
from lora2gguf.commands.convert import convert
from lora2gguf.errors import Lora2GGUFError
from lora2gguf.fileio.gguf_read import GGUFFile
from peft_helpers import assert_converts_like_peft, assert_merges_like_peft, make_peft_adapter

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MLX_SCALE = 20.0  # mlx-lm's default scale; PEFT's alpha / r here is 2, so the factors must absorb the ratio


def write_mlx(peft_dir, out, scale=MLX_SCALE, prefix="", bf16=False, fine_tune_type="lora", switch_parent="mlp",
              b_expert_order=None):
    """The ΔW of a PEFT adapter as mlx-lm stores it: lora_a (in, r) = Aᵀ, lora_b (r, out) = Bᵀ·s_peft/scale,
    so that scale·(x a) b is PEFT's s_peft·B A x. DoRA's magnitude goes to `.m`."""
    import torch
    from safetensors.torch import save_file

    peft = load_peft(peft_dir)
    tensors = {}
    for name, m in peft.modules.items():
        k = prefix + name
        if m.experts:  # LoRASwitchLinear on mlx-lm's SwitchGLU: per expert, (E, r, in) and (E, out, r)
            k = k.replace(".mlp.experts.", f".{switch_parent}.switch_mlp.")
            tensors[k + ".lora_a"] = m.A.copy()  # gate and up share A in PEFT: mlx-lm stores each
            tensors[k + ".lora_b"] = (m.B if b_expert_order is None else m.B[b_expert_order]) * (m.scale / scale)
            continue
        tensors[k + ".lora_a"] = m.A.T
        tensors[k + ".lora_b"] = m.B.T * (m.scale / scale)
        if m.magnitude is not None:
            tensors[k + ".m"] = m.magnitude
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v, np.float32)).to(torch.bfloat16 if bf16 else torch.float32)
               for k, v in tensors.items()}
    out.mkdir()
    save_file(tensors, str(out / "adapters.safetensors"), metadata={"format": "mlx"})
    r = peft.config["r"]
    keys = sorted({".".join(n.split(".")[3:]) for n in peft.modules})
    cfg = {"model": "mlx-community/tiny-llama", "fine_tune_type": fine_tune_type, "num_layers": 2,
           "lora_parameters": {"rank": r, "scale": scale, "dropout": 0.0, "keys": keys},
           "adapter_path": str(out), "iters": 100, "learning_rate": 1e-5}
    (out / "adapter_config.json").write_text(json.dumps(cfg, indent=4))
    return out


@pytest.mark.parametrize("arch", ["qwen3moe", "mixtral"])
def test_lora_switch_linear_converts_like_peft(arch, tmp_path):
    """mlx-lm's LoRASwitchLinear (lora_a (E, r, in), lora_b (E, out, r) on its SwitchGLU `switch_mlp`, Mixtral's
    under block_sparse_moe, with mlx-lm's absolute scale), written from a real PEFT target_parameters adapter's
    per-expert factors: converted, llama.cpp runs it as transformers + PEFT runs that adapter, routing-aware;
    the same file with lora_b's experts in another order is far off."""
    from moe_helpers import llama_run, routed, transformers_run

    from lora2gguf.parity.metrics import compare

    peft_dir = make_peft_adapter(fixture(arch, "hf"), tmp_path / "peft", r=4, lora_alpha=16, b_std=0.2,
                                 target_modules=["q_proj"],
                                 target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    parent = "block_sparse_moe" if arch == "mixtral" else "mlp"
    tokens = list(range(1, 41))
    base = llama_run(fixture(arch), tokens)
    theirs = transformers_run(arch, tokens, adapter_dir=peft_dir)
    runs = {}
    for name, order in (("ok", None), ("experts reordered", np.roll(np.arange(8), 1))):
        mlx_dir = write_mlx(peft_dir, tmp_path / name, switch_parent=parent, b_expert_order=order)
        runs[name] = llama_run(fixture(arch), tokens, [(convert(mlx_dir, fixture(arch), tmp_path / f"{name}.gguf"), 1.0)])
    moved, m = compare(base[0], runs["ok"][0]), routed(theirs[0], runs["ok"][0], theirs[1], runs["ok"][1])
    wrong = compare(theirs[0], runs["experts reordered"][0])
    print(arch, "moved", moved["mean_kl"], "mlx vs transformers+PEFT", m, "reordered", wrong["mean_kl"])
    assert moved["mean_kl"] > 1e-2
    assert m["median_kl"] <= 1e-6 and m["mean_kl"] <= 1e-5 and m["expert_set_mismatch"] == 0.0, m
    assert wrong["mean_kl"] > 0.1 * moved["mean_kl"]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_mlx_converts_like_peft(arch, tmp_path):
    peft_dir = make_peft_adapter(fixture(arch, "hf"), tmp_path / "peft", seed=41, r=4, lora_alpha=8, target_modules=ALL)
    mlx_dir = write_mlx(peft_dir, tmp_path / "mlx")
    print(arch, assert_converts_like_peft(arch, mlx_dir, peft_dir, tmp_path / "a.gguf"))
    with GGUFFile(tmp_path / "a.gguf") as f:  # the scale is in the file's alpha: llama.cpp applies alpha / r = 20
        assert f.get("adapter.lora.alpha") == pytest.approx(MLX_SCALE * 4)
        assert list(f.get("lora2gguf.scale_folded", [])) == []


def test_mlx_bf16_and_text_tower_prefix(tmp_path):
    """mlx-lm saves in the training dtype (often bf16) and, for Gemma 3-style multimodal models, under
    language_model.; the PEFT side is rounded to the same bf16 values (scale = PEFT's, so no rescaling)."""
    import torch
    from safetensors.torch import load_file, save_file

    peft_dir = make_peft_adapter(fixture("llama", "hf"), tmp_path / "peft", seed=42, r=4, lora_alpha=4,
                                 target_modules=["q_proj", "v_proj", "down_proj"])
    st = peft_dir / "adapter_model.safetensors"
    save_file({k: v.bfloat16().float() for k, v in load_file(st).items()}, str(st), metadata={"format": "pt"})
    mlx_dir = write_mlx(peft_dir, tmp_path / "mlx", scale=1.0, prefix="language_model.", bf16=True)
    header = safetensors_header(mlx_dir / "adapters.safetensors")
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}
    a = load_adapter(mlx_dir)
    assert sorted(a.modules) == sorted(load_peft(peft_dir).modules)
    assert_converts_like_peft("llama", mlx_dir, peft_dir, tmp_path / "a.gguf")


def test_mlx_dora_refused_by_convert_merged_exactly(tmp_path):
    peft_dir = make_peft_adapter(fixture("llama", "hf"), tmp_path / "peft", seed=43, r=4, lora_alpha=8,
                                 use_dora=True, target_modules=["q_proj", "k_proj", "up_proj"])
    mlx_dir = write_mlx(peft_dir, tmp_path / "mlx", fine_tune_type="dora")
    with pytest.raises(Lora2GGUFError, match="DoRA"):
        convert(mlx_dir, fixture("llama"), tmp_path / "a.gguf")
    assert_merges_like_peft("llama", mlx_dir, peft_dir, tmp_path / "m.gguf")


def test_mlx_bad_inputs(tmp_path):
    peft_dir = make_peft_adapter(fixture("llama", "hf"), tmp_path / "peft", seed=44, r=2, lora_alpha=4,
                                 target_modules=["v_proj"])
    mlx_dir = write_mlx(peft_dir, tmp_path / "mlx")
    cfg = json.loads((mlx_dir / "adapter_config.json").read_text())
    for change, message in ((lambda c: c["lora_parameters"].pop("scale"), "lora_parameters.scale"),
                            (lambda c: c.update(fine_tune_type="full"), "full fine-tune"),
                            (lambda c: c["lora_parameters"].update(rank=3), "rank 2 but")):
        bad = json.loads(json.dumps(cfg))
        change(bad)
        (mlx_dir / "adapter_config.json").write_text(json.dumps(bad))
        with pytest.raises(Lora2GGUFError, match=message):
            load_adapter(mlx_dir)
    (mlx_dir / "adapter_config.json").unlink()
    with pytest.raises(Lora2GGUFError, match="no adapter_config.json"):
        load_adapter(mlx_dir)


# -- the real mlx-lm -------------------------------------------------------------------------------
# Run here with mlx 0.32.4 / mlx-cpu 0.32.4 / mlx-lm 0.32.2 (`pip install -e ".[formats]"`; skipped without
# them). mlx-lm itself loads the base
# (mlx_lm.utils.load_model on the fixture's HF directory), turns its linears into LoRA/DoRA layers
# (tuner.utils.linear_to_lora_layers, what `mlx_lm.lora` does) and saves them as its trainer does.
def real_mlx_adapter(out, dora=False, seed=0):
    """An adapter made and saved by mlx-lm on the llama fixture, with its own forward on the same weights."""
    mx = pytest.importorskip("mlx.core")
    pytest.importorskip("mlx_lm")
    from mlx.utils import tree_flatten, tree_map
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model, save_config

    model, _ = load_model(fixture("llama", "hf"))
    model.freeze()
    params = {"rank": 4, "scale": MLX_SCALE, "dropout": 0.0,
              "keys": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj"]}
    linear_to_lora_layers(model, 2, params, use_dora=dora)
    mx.random.seed(seed)  # mlx-lm starts lora_b at zero and m at ‖W‖: move both, as training would
    model.update(tree_map(lambda p: p + 0.004 * mx.random.normal(p.shape) if p.ndim == 2 else p * 1.1,
                          model.trainable_parameters()))
    out.mkdir()
    mx.save_safetensors(str(out / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters())))
    save_config({"model": str(fixture("llama", "hf")), "fine_tune_type": "dora" if dora else "lora",
                 "num_layers": 2, "lora_parameters": params, "adapter_path": str(out)},
                out / "adapter_config.json")

    def logits(tokens):
        return np.array(model(mx.array([tokens]))[0].astype(mx.float32))

    return out, logits


def test_real_mlx_lm_adapter_converts_and_exports(tmp_path):
    from lora2gguf.commands.export import export
    from lora2gguf.parity.metrics import compare
    from lora2gguf.llamacpp.runtime import LlamaRuntime
    from peft_helpers import peft_logits
    from conftest import token_ids

    mlx_dir, mlx_logits = real_mlx_adapter(tmp_path / "mlx")
    gguf = convert(mlx_dir, fixture("llama"), tmp_path / "a.gguf")
    tokens = token_ids(383, 64, seed=45)
    with LlamaRuntime(fixture("llama")) as rt:
        base = rt.logits(tokens)
        rt.set_adapters([(gguf, 1.0)])
        ours = rt.logits(tokens)
    assert compare(base, ours)["mean_kl"] > 1e-2, "the adapter must visibly change the output"
    theirs = mlx_logits(tokens)
    m = compare(theirs, ours)
    print("mlx-lm forward vs llama.cpp", m)
    assert m["mean_kl"] <= 1e-5 and m["top1"] == 1.0, m
    peft_dir = export(mlx_dir, fixture("llama"), tmp_path / "peft")  # the same adapter for transformers+PEFT
    m = compare(peft_logits(fixture("llama", "hf"), peft_dir, tokens), ours)
    print("transformers+PEFT (exported) vs llama.cpp", m)
    assert m["mean_kl"] <= 1e-5 and m["top1"] == 1.0, m


def test_real_mlx_lm_dora_merges_exactly(tmp_path):
    from lora2gguf.commands.merge import merge
    from lora2gguf.parity.metrics import compare
    from lora2gguf.llamacpp.runtime import LlamaRuntime
    from conftest import token_ids

    mlx_dir, mlx_logits = real_mlx_adapter(tmp_path / "mlx", dora=True, seed=1)
    merged = merge(fixture("llama"), [(mlx_dir, 1.0)], tmp_path / "m.gguf", quant="f32")
    tokens = token_ids(383, 64, seed=46)
    with LlamaRuntime(merged) as rt:
        ours = rt.logits(tokens)
    m = compare(mlx_logits(tokens), ours)
    print("mlx-lm DoRA forward vs llama.cpp merged", m)
    assert m["mean_kl"] <= 1e-5 and m["top1"] == 1.0, m
