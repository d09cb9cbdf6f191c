#!/usr/bin/env python3
"""Generate a llama-shaped GGUF base (random weights, valid metadata, a SentencePiece-style vocabulary
that llama.cpp loads), a matching PEFT LoRA adapter and a small training JSONL, for the benchmarks.

Shapes (--shape): `big` (default, bench_merge.py's): width 2048, 32 heads / 4 KV heads, FFN 5632, 14 layers,
vocab 32000, untied output, 748 M parameters, ~1.5 GB F16. `1b`, `3b`, `8b`: Llama-3.2-1B, Llama-3.2-3B
(tied embeddings) and Llama-3.1-8B (untied) shapes, vocab 128256, rope theta 500000 (bench_scale.py's).
`qwen3moe-30b-a3b`: Qwen3-30B-A3B's layer (width 2048, 32 heads / 4 KV heads of 128, q/k norms, 128
experts of FFN 768, 8 per token, vocab 151936, untied) cut to 2 of its 48 layers: 1.9 B parameters,
~3.7 GB F16; its adapter adds PEFT `target_parameters` expert LoRA (gate_up and down, r=16) to the
attention LoRA, in peft 0.21's layout.
Weights are normal with std 0.02 (an init's scale), norms 1, so llama.cpp's forward stays finite.
Written tensor by tensor (never more than one in memory), deterministically from --seed. --quant
q4_k_m then quantizes the F16 file with llama.cpp (lora2gguf.llamacpp.quantize.llama_quantize) and deletes it.
The adapter (r=16 on all seven projections of every layer) is written directly in PEFT's on-disk format
(adapter_config.json + adapter_model.safetensors), since loading the base in transformers to let peft
write it would need 4 bytes per parameter.

    python scripts/make_big_base.py [--shape big|1b|3b|8b] [--quant q4_k_m] [--out ~/.cache/lora2gguf-bench]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gguf  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from lora2gguf import models  # noqa: E402
from lora2gguf.fileio.gguf_write import PlannedTensor, nbytes_of, write_streaming
from lora2gguf.fileio.atomic import atomic_output
from lora2gguf.llamacpp.quantize import llama_quantize, output_type  # noqa: E402

SHAPES = {  # name → dims; "big" (the default) is bench_merge.py's base
    "big": dict(n_layer=14, n_embd=2048, n_ff=5632, n_head=32, n_head_kv=4, n_vocab=32000, n_ctx=4096,
                rope_theta=10000.0, tied=False),
    "1b": dict(n_layer=16, n_embd=2048, n_ff=8192, n_head=32, n_head_kv=8, n_vocab=128256, n_ctx=8192,
               rope_theta=500000.0, tied=True),  # Llama-3.2-1B
    "3b": dict(n_layer=28, n_embd=3072, n_ff=8192, n_head=24, n_head_kv=8, n_vocab=128256, n_ctx=8192,
               rope_theta=500000.0, tied=True),  # Llama-3.2-3B
    "8b": dict(n_layer=32, n_embd=4096, n_ff=14336, n_head=32, n_head_kv=8, n_vocab=128256, n_ctx=8192,
               rope_theta=500000.0, tied=False),  # Llama-3.1-8B
    "qwen3moe-30b-a3b": dict(arch="qwen3moe", n_layer=2, n_embd=2048, n_ff=6144, n_head=32, n_head_kv=4,
                             head_dim=128, n_vocab=151936, n_ctx=4096, rope_theta=1000000.0, tied=False,
                             n_expert=128, n_expert_used=8, n_ff_exp=768),  # Qwen3-30B-A3B, 2 of 48 layers
}
DATA_NAME = "big-llama-data.jsonl"  # the same text for every shape (one tokenizer)
LORA = dict(r=16, lora_alpha=32, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
WORDS = ("the a of and to in is it that was for on with as at by from old new small big red blue green cat dog "
         "bird fish tree river hill road house door window book letter lamp boat ship sea sun moon star rain "
         "wind snow morning evening night day week year keeper sailor baker child woman man walked ran sat "
         "slept wrote read found kept made saw heard opened closed carried counted quiet slow warm cold").split()


def default_dir() -> Path:
    return Path.home() / ".cache" / "lora2gguf-bench"


def names(shape: str) -> tuple[str, str]:
    """(base file stem, adapter directory): big-llama-f16.gguf for the default shape, as before."""
    stem = "big-llama" if shape == "big" else f"big-{shape}" if "moe" in shape else f"big-llama-{shape}"
    return stem, f"{stem}-lora"


def vocab(n: int) -> tuple[list[str], list[float], list[int]]:
    """SentencePiece-style: control tokens, the 256 byte tokens, then ▁w0, ▁w1, ... English words are none
    of those, so llama.cpp's tokenizer spells them with byte tokens (about one token per byte)."""
    T = gguf.TokenType
    toks, scores, types = ["<unk>", "<s>", "</s>"], [0.0, 0.0, 0.0], [T.UNKNOWN, T.CONTROL, T.CONTROL]
    toks += [f"<0x{b:02X}>" for b in range(256)]
    scores += [0.0] * 256
    types += [T.BYTE] * 256
    rest = n - len(toks)
    toks += [f"▁w{i}" for i in range(rest)]
    scores += [-float(i) for i in range(rest)]
    types += [T.NORMAL] * rest
    return toks, scores, [int(t) for t in types]


def spec_of(d: dict):
    moe = {"head_dim": d["head_dim"], "num_experts": d["n_expert"], "num_experts_per_tok": d["n_expert_used"],
           "moe_intermediate_size": d["n_ff_exp"], "norm_topk_prob": True} if "n_expert" in d else {}
    return models.get(d.get("arch", "llama")).spec_from_hf(
        {"hidden_size": d["n_embd"], "num_attention_heads": d["n_head"], "num_key_value_heads": d["n_head_kv"],
         "num_hidden_layers": d["n_layer"], "intermediate_size": d["n_ff"], "vocab_size": d["n_vocab"],
         "rope_theta": d["rope_theta"], "tie_word_embeddings": d["tied"], "rms_norm_eps": 1e-6, **moe}, "big base")


def write_base(path: Path, seed: int, d: dict) -> None:
    hd = d.get("head_dim", d["n_embd"] // d["n_head"])
    arch_name = d.get("arch", "llama")
    w = gguf.GGUFWriter(None, arch_name)
    w.add_name("big-llama-random")
    w.add_block_count(d["n_layer"])
    w.add_context_length(d["n_ctx"])
    w.add_embedding_length(d["n_embd"])
    w.add_feed_forward_length(d["n_ff"])
    w.add_head_count(d["n_head"])
    w.add_head_count_kv(d["n_head_kv"])
    w.add_rope_dimension_count(hd)
    w.add_rope_freq_base(d["rope_theta"])
    w.add_layer_norm_rms_eps(1e-5 if "n_expert" not in d else 1e-6)
    if "n_expert" in d:
        w.add_key_length(hd)
        w.add_value_length(hd)
        w.add_expert_count(d["n_expert"])
        w.add_expert_used_count(d["n_expert_used"])
        w.add_expert_feed_forward_length(d["n_ff_exp"])
    w.add_vocab_size(d["n_vocab"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    toks, scores, types = vocab(d["n_vocab"])
    w.add_tokenizer_model("llama")
    w.add_token_list(toks)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)

    arch, spec = models.get(arch_name), spec_of(d)
    F16, F32 = gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32
    plan = []
    for hf, shape in arch.expected_shapes(spec).items():  # a tied spec has no lm_head: no output.weight
        # norms and the MoE router F32, as llama.cpp's converter writes them
        t = F32 if len(shape) == 1 or hf.endswith("mlp.gate.weight") else F16
        plan.append(PlannedTensor(arch.gguf_name(d["n_layer"], hf), shape, t, nbytes_of(shape, t)))
    rng = np.random.default_rng(seed)

    def data():
        for p in plan:
            if p.type == F32 and len(p.shape) == 1:
                yield np.ones(p.shape, np.float32)  # norms = 1: the forward stays finite through every layer
            elif p.type == F32:  # the router: std 0.02 too
                yield rng.standard_normal(p.shape, np.float32) * 0.02
            else:  # std 0.02 like an init; rows drawn in blocks to keep the float32 temporary small
                out = np.empty(p.shape, np.float16)
                rows = out.reshape(-1, p.shape[-1])  # an expert stack (E, out, in): its rows, expert by expert
                for i in range(0, rows.shape[0], 1024):
                    rows[i:i + 1024] = rng.standard_normal((min(1024, rows.shape[0] - i), p.shape[-1]), np.float32) * 0.02
                yield out

    write_streaming(path, w, plan, data())


def write_adapter(out_dir: Path, seed: int, d: dict) -> None:
    """A plain PEFT LoRA in the exact layout peft's save_pretrained writes; on a MoE shape also PEFT 0.21's
    target_parameters LoRA on the fused experts (what peft writes for transformers 5's Qwen3MoeExperts:
    gate_up_proj's pair nested under experts.base_layer, down_proj's under experts; lora_A [r·E, in],
    lora_B [out, r·E])."""
    rng = np.random.default_rng(seed + 1)
    spec, r = spec_of(d), LORA["r"]
    shapes = models.get(d.get("arch", "llama")).linear_shapes(spec)
    tensors = {}

    def pair(key: str, n_out: int, n_in: int, k: int = 1) -> None:
        tensors[f"{key}.lora_A.weight"] = (rng.standard_normal((r * k, n_in), np.float32) / np.sqrt(n_in)).astype(np.float32)
        tensors[f"{key}.lora_B.weight"] = (rng.standard_normal((n_out, r * k), np.float32) * 0.01).astype(np.float32)

    for i in range(d["n_layer"]):
        for mod, (n_out, n_in) in shapes.items():
            mod = mod.removesuffix(".weight")
            if mod.split(".")[-1] not in LORA["targets"]:
                continue
            pair(f"base_model.model.model.layers.{i}.{mod}", n_out, n_in)
        if "n_expert" in d:
            E, D, F = d["n_expert"], d["n_embd"], d["n_ff_exp"]
            pair(f"base_model.model.model.layers.{i}.mlp.experts.base_layer", 2 * F, D, E)  # gate_up_proj
            pair(f"base_model.model.model.layers.{i}.mlp.experts", D, F, E)  # down_proj
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "big-llama-random",
           "r": r, "lora_alpha": LORA["lora_alpha"], "lora_dropout": 0.0, "bias": "none",
           "target_modules": list(LORA["targets"]), "use_rslora": False, "use_dora": False,
           "fan_in_fan_out": False, "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None}
    if "n_expert" in d:  # peft 0.21's layout for 3-D parameters (adapters/peft.py reads it by this version)
        cfg |= {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "peft_version": "0.21.2",
                "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]}
    (out_dir / "adapter_config.json").write_text(json.dumps(cfg, indent=2))


def write_data(path: Path, rows: int = 64, seed: int = 0) -> Path:
    """Training text: plain English words, ~400 characters a row (over 128 tokens once spelled in bytes)."""
    import random

    rng = random.Random(seed)
    with atomic_output(path) as tmp, open(tmp, "w") as f:
        for _ in range(rows):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(80)) + "."}) + "\n")
    return path


def make(out: Path, seed: int = 0, force: bool = False, shape: str = "big", quant: str | None = None,
         keep_f16: bool = False, log=lambda msg: None) -> tuple[Path, Path]:
    """(base, adapter), made when missing. With `quant`, the F16 file is quantized by llama.cpp (the
    project's llama_quantize) and then deleted unless keep_f16: both exist on disk while it runs."""
    d = SHAPES[shape]
    out.mkdir(parents=True, exist_ok=True)
    stem, adapter = names(shape)
    f16, adapter = out / f"{stem}-f16.gguf", out / adapter
    base = out / f"{stem}-{quant}.gguf" if quant else f16
    if force or not base.is_file():
        if force or not f16.is_file():
            t = time.perf_counter()
            with atomic_output(f16) as tmp:
                write_base(tmp, seed, d)
            log(f"wrote {f16} ({f16.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t:.0f} s")
        if quant:
            t = time.perf_counter()
            with atomic_output(base) as tmp:
                llama_quantize(f16, tmp, output_type(quant).ftype)
            log(f"quantized to {base} ({base.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t:.0f} s; "
                f"disk peak {(f16.stat().st_size + base.stat().st_size) / 1e9:.2f} GB (both files)")
            if not keep_f16:
                f16.unlink()
    if force or not (adapter / "adapter_config.json").is_file():
        write_adapter(adapter, seed, d)
    return base, adapter


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=default_dir())
    ap.add_argument("--shape", choices=SHAPES, default="big")
    ap.add_argument("--quant", help="Quantize the F16 file with llama.cpp to this type (e.g. q4_k_m), then "
                                    "delete the F16 file.")
    ap.add_argument("--keep-f16", action="store_true", help="With --quant: keep the F16 file.")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="Rewrite even if the files exist.")
    a = ap.parse_args()
    base, adapter = make(a.out, a.seed, a.force, a.shape, a.quant, a.keep_f16, log=print)
    data = a.out / DATA_NAME
    if a.force or not data.is_file():
        write_data(data)
    print(f"{base} ({base.stat().st_size / 1e9:.2f} GB)\n{adapter}\n{data}")


if __name__ == "__main__":
    main()
