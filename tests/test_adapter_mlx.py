"""mlx-lm adapters (adapters.safetensors + adapter_config.json).

Which case applies: mlx has a Linux CPU wheel (mlx + mlx-cpu), but mlx-lm's training code needs
transformers ≥ 5.7 beside it, more than the test extras should carry. So these files are written from the
format as mlx-lm's own source defines it (mlx_lm/tuner/lora.py LoRALinear / LoRAEmbedding, dora.py
DoRALinear, mlx_lm/lora.py: `adapters.safetensors` from `tree_flatten(model.trainable_parameters())`,
`adapter_config.json` from the run's arguments), from a real PEFT adapter's ΔW, and checked against
transformers + PEFT on that adapter."""

import json

import numpy as np
import pytest

from conftest import fixture
from lora2gguf.adapter import load_peft, safetensors_header
from lora2gguf.adapter_any import load_adapter
from lora2gguf.convert import convert
from lora2gguf.errors import Lora2GGUFError
from lora2gguf.gguf_file import GGUFFile
from peft_helpers import assert_converts_like_peft, assert_merges_like_peft, make_peft_adapter

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MLX_SCALE = 20.0  # mlx-lm's default scale; PEFT's alpha / r here is 2, so the factors must absorb the ratio


def write_mlx(peft_dir, out, scale=MLX_SCALE, prefix="", bf16=False, fine_tune_type="lora"):
    """The ΔW of a PEFT adapter as mlx-lm stores it: lora_a (in, r) = Aᵀ, lora_b (r, out) = Bᵀ·s_peft/scale,
    so that scale·(x a) b is PEFT's s_peft·B A x. DoRA's magnitude goes to `.m`."""
    import torch
    from safetensors.torch import save_file

    peft = load_peft(peft_dir)
    tensors = {}
    for name, m in peft.modules.items():
        k = prefix + name
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
