#!/usr/bin/env python3
"""Generate a ~1.5 GB F16 llama-shaped GGUF base (random weights, valid metadata, a SentencePiece-style
vocabulary that llama.cpp loads) and a matching PEFT LoRA adapter, for the merge benchmark.

Shape: width 2048, 32 heads / 4 KV heads, FFN 5632, 14 layers, vocab 32000, untied output: 748 M
parameters. Written tensor by tensor (never more than one in memory), deterministically from --seed.
The adapter (r=16 on all seven projections of every layer) is written directly in PEFT's on-disk format
(adapter_config.json + adapter_model.safetensors), since loading this base in transformers to let peft
write it would need ~6 GB.

    python scripts/make_big_base.py [--out ~/.cache/lora2gguf-bench] [--force]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gguf  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from lora2gguf import models  # noqa: E402
from lora2gguf.gguf_write import PlannedTensor, atomic_output, nbytes_of, write_streaming  # noqa: E402

DIMS = dict(n_layer=14, n_embd=2048, n_ff=5632, n_head=32, n_head_kv=4, n_vocab=32000, n_ctx=4096)
BASE_NAME, ADAPTER_NAME = "big-llama-f16.gguf", "big-llama-lora"
LORA = dict(r=16, lora_alpha=32, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))


def default_dir() -> Path:
    return Path.home() / ".cache" / "lora2gguf-bench"


def vocab(n: int) -> tuple[list[str], list[float], list[int]]:
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


def hf_shapes() -> dict[str, tuple[int, int]]:
    d = DIMS
    hd, e, f = d["n_embd"] // d["n_head"], d["n_embd"], d["n_ff"]
    return {"self_attn.q_proj": (d["n_head"] * hd, e), "self_attn.k_proj": (d["n_head_kv"] * hd, e),
            "self_attn.v_proj": (d["n_head_kv"] * hd, e), "self_attn.o_proj": (e, d["n_head"] * hd),
            "mlp.gate_proj": (f, e), "mlp.up_proj": (f, e), "mlp.down_proj": (e, f)}


def write_base(path: Path, seed: int) -> None:
    d = DIMS
    hd = d["n_embd"] // d["n_head"]
    w = gguf.GGUFWriter(None, "llama")
    w.add_name("big-llama-random")
    w.add_block_count(d["n_layer"])
    w.add_context_length(d["n_ctx"])
    w.add_embedding_length(d["n_embd"])
    w.add_feed_forward_length(d["n_ff"])
    w.add_head_count(d["n_head"])
    w.add_head_count_kv(d["n_head_kv"])
    w.add_rope_dimension_count(hd)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
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

    shapes = hf_shapes()
    plan, F16, F32 = [], gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32
    llama = models.get("llama")
    spec = llama.spec_from_hf({"hidden_size": d["n_embd"], "num_attention_heads": d["n_head"],
                               "num_key_value_heads": d["n_head_kv"], "num_hidden_layers": d["n_layer"],
                               "intermediate_size": d["n_ff"], "vocab_size": d["n_vocab"]}, "big base")
    for hf in llama.expected_shapes(spec, tied=False):
        name = llama.gguf_name(d["n_layer"], hf)
        if hf.endswith("norm.weight"):
            shape, t = (d["n_embd"],), F32
        elif hf in ("model.embed_tokens.weight", "lm_head.weight"):
            shape, t = (d["n_vocab"], d["n_embd"]), F16
        else:
            shape, t = shapes[hf.split(".", 3)[3].rsplit(".", 1)[0]], F16
        plan.append(PlannedTensor(name, shape, t, nbytes_of(shape, t)))
    rng = np.random.default_rng(seed)

    def data():
        for p in plan:
            if p.type == F32:
                yield np.ones(p.shape, np.float32)
            else:  # one tensor at a time; rows drawn in blocks to keep the float32 temporary small
                out = np.empty(p.shape, np.float16)
                for i in range(0, p.shape[0], 1024):
                    out[i:i + 1024] = rng.standard_normal((min(1024, p.shape[0] - i), p.shape[1]), np.float32) * 0.02
                yield out

    write_streaming(path, w, plan, data())


def write_adapter(out_dir: Path, seed: int) -> None:
    """A plain PEFT LoRA in the exact layout peft's save_pretrained writes."""
    rng = np.random.default_rng(seed + 1)
    shapes, r = hf_shapes(), LORA["r"]
    tensors = {}
    for i in range(DIMS["n_layer"]):
        for mod, (n_out, n_in) in shapes.items():
            if mod.split(".")[-1] not in LORA["targets"]:
                continue
            key = f"base_model.model.model.layers.{i}.{mod}"
            tensors[f"{key}.lora_A.weight"] = (rng.standard_normal((r, n_in), np.float32) / np.sqrt(n_in)).astype(np.float32)
            tensors[f"{key}.lora_B.weight"] = (rng.standard_normal((n_out, r), np.float32) * 0.01).astype(np.float32)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "big-llama-random",
           "r": r, "lora_alpha": LORA["lora_alpha"], "lora_dropout": 0.0, "bias": "none",
           "target_modules": list(LORA["targets"]), "use_rslora": False, "use_dora": False,
           "fan_in_fan_out": False, "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None}
    (out_dir / "adapter_config.json").write_text(json.dumps(cfg, indent=2))


def make(out: Path, seed: int = 0, force: bool = False) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    base, adapter = out / BASE_NAME, out / ADAPTER_NAME
    if force or not base.is_file():
        with atomic_output(base) as tmp:
            write_base(tmp, seed)
    if force or not (adapter / "adapter_config.json").is_file():
        write_adapter(adapter, seed)
    return base, adapter


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=default_dir())
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="Rewrite even if the files exist.")
    a = ap.parse_args()
    base, adapter = make(a.out, a.seed, a.force)
    print(f"{base} ({base.stat().st_size / 1e9:.2f} GB)\n{adapter}")


if __name__ == "__main__":
    main()
