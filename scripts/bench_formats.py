"""Adapters from mlx-lm and torchtune on SmolLM2-135M-Instruct: lora2gguf's conversion against
transformers + PEFT, beside what the two known ways of getting them wrong compute.

One adapter made by the real peft library (r=16, alpha=32, all linear projections), its ΔW written as
mlx-lm (scale 20, the mlx-lm default) and torchtune (.pt, q/k rows in Meta order) store it
(tests/test_adapter_mlx.write_mlx, tests/test_adapter_torchtune.write_torchtune). Each is converted by
lora2gguf and run by llama.cpp (llama-cpp-python) on the F32 base; mean KL and top-1 against transformers +
PEFT on the original adapter, over 256 tokens of the verify passage. The wrong ways:
- mlx-lm's scale dropped: the same file with adapter.lora.alpha 0 (llama.cpp then applies scale 1), which is
  what Ollama's converter writes for an mlx-lm config (convert/convert.go reads lora_parameters.alpha or
  lora_alpha, never scale); Ollama itself is not run;
- torchtune's q/k rows permuted again: the .pt's tensors renamed to PEFT's and converted as if in HF order.
Last, the same adapter labelled as trained on `…-bnb-4bit`: verify's gap between the reference on an
NF4-rounded copy of the base and on the base itself.

    .venv/bin/python scripts/bench_formats.py
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from lora2gguf.commands.convert import convert  # noqa: E402
from lora2gguf.parity.metrics import compare  # noqa: E402
from lora2gguf.llamacpp.runtime import LlamaRuntime  # noqa: E402
from lora2gguf.weights.real_models import smollm2_f32_gguf  # noqa: E402
from lora2gguf.commands.verify import DEFAULT_TEXT, verify  # noqa: E402
from peft_helpers import hf_dir_from_base, make_peft_adapter, peft_logits  # noqa: E402
from test_adapter_gguf import rewrite_gguf  # noqa: E402
from test_adapter_mlx import write_mlx  # noqa: E402
from test_adapter_torchtune import write_torchtune  # noqa: E402

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def as_peft_names(tune_dir: Path, out: Path) -> Path:
    """torchtune's tensors under PEFT's names, rows untouched (the double-permutation bug)."""
    import torch
    from safetensors.torch import save_file

    from lora2gguf.adapters.torchtune import hf_module

    sd = torch.load(tune_dir / "adapter_model.pt", weights_only=True)
    out.mkdir()
    renamed = {}
    for k, v in sd.items():
        mod, kind = hf_module(k)
        renamed[f"base_model.model.{mod}.{kind}.weight"] = v.contiguous()
    save_file(renamed, str(out / "adapter_model.safetensors"))
    cfg = json.loads((tune_dir / "adapter_config.json").read_text())
    cfg["target_modules"] = ALL
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    return out


def main() -> None:
    base = smollm2_f32_gguf()
    hf = hf_dir_from_base(base, base.parent / "SmolLM2-135M-Instruct-hf")
    tmp = Path(tempfile.mkdtemp(prefix="bench-formats-"))
    try:
        peft_dir = make_peft_adapter(hf, tmp / "peft", seed=0, b_std=0.03, r=16, lora_alpha=32, target_modules=ALL)
        mlx = convert(write_mlx(peft_dir, tmp / "mlx"), base, tmp / "mlx.gguf")
        tune_dir = write_torchtune(peft_dir, tmp / "tune", "llama", base=base)
        files = {
            "mlx-lm → lora2gguf": mlx,
            "mlx-lm, scale dropped (alpha 0)": rewrite_gguf(mlx, tmp / "mlx-alpha0.gguf", alpha=0),
            "torchtune .pt → lora2gguf": convert(tune_dir, base, tmp / "tune.gguf"),
            "torchtune, q/k permuted twice": convert(as_peft_names(tune_dir, tmp / "tune-peft"), base, tmp / "tw.gguf"),
        }
        with LlamaRuntime(base, n_ctx=512) as rt:
            tokens = rt.tokenize(DEFAULT_TEXT)[:256]
            base_logits = rt.logits(tokens)
            got = {}
            for name, f in files.items():
                rt.set_adapters([(f, 1.0)])
                got[name] = rt.logits(tokens)
                rt.set_adapters([])
        theirs = peft_logits(hf, peft_dir, tokens)
        print(f"SmolLM2-135M-Instruct F32, {len(tokens)} tokens; PEFT adapter r=16 alpha=32 all-linear; "
              f"KL base→PEFT adapter {compare(theirs, base_logits)['mean_kl']:.3g}\n")
        print("| file | mean KL vs transformers+PEFT | top-1 |\n|---|---|---|")
        for name, logits in got.items():
            m = compare(theirs, logits)
            print(f"| {name} | {m['mean_kl']:.2g} | {m['top1']:.3f} |")
        # the same adapter as Unsloth would label it: verify's 4-bit gap (NF4-rounded base vs this one)
        cfg_path = peft_dir / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["base_model_name_or_path"] = "unsloth/SmolLM2-135M-Instruct-bnb-4bit"
        cfg_path.write_text(json.dumps(cfg))
        gap = verify(base, [(peft_dir, 1.0)], n_tokens=256)["four_bit_gap"]
        print(f"\nverify, base_model_name_or_path …-bnb-4bit: KL(adapter on NF4-rounded base → on this base) "
              f"{gap['kl_nf4_to_reference']:.3g}, base alone {gap['kl_nf4_base_to_base']:.3g}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
