#!/usr/bin/env python3
"""Generate the tiny test bases under fixtures/, deterministically.

For each arch (llama, qwen2, qwen3, gemma3, gemma2, phi3, qwen3moe, mixtral, qwen2moe): the same random weights as
  fixtures/<arch>/hf/            config.json + model.safetensors (loads in transformers)
  fixtures/<arch>/base-f32.gguf  and base-f16.gguf, base-q8_0.gguf (written with gguf-py)
  fixtures/<arch>/base-q4_k_m.gguf (llama.cpp's own quantizer via llama-cpp-python)
Two layers, width 64, 4 heads / 2 KV heads (GQA), FFN 256 (so ffn_down rows fit K-quant blocks of 256);
qwen3moe: 8 experts, 2 used per token, expert FFN 256 (ffn_down_exps rows fit K-quant blocks), stored in
hf/ one tensor per expert as the Hub's checkpoints and transformers' save_pretrained do; mixtral: the same
sizes (its experts are feed_forward_length wide) in a "llama" GGUF with llama.expert_count, its checkpoint under
Mixtral's names (block_sparse_moe.gate, block_sparse_moe.experts.E.w1/w3/w2); qwen2moe: qwen3moe's experts
plus a shared expert of width 256 and its gate, q/k/v biases, top-k weights not renormalised. A SentencePiece-style
vocabulary that llama.cpp tokenizes. Weights are scaled so that logits are
peaked (a near-uniform output would make KL and top-1 checks weak).

    python scripts/make_fixtures.py [--out fixtures]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gguf  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from lora2gguf import models  # noqa: E402

DIMS = dict(n_layer=2, n_embd=64, n_ff=256, n_head=4, n_head_kv=2, n_ctx=512, rope_theta=10000.0, eps=1e-5)
# Gemma: head_dim 32 (n_head * head_dim != n_embd, as in Gemma 3 270M), a sliding window of 8 tokens on the
# first of every two layers, local and global ropes that differ; Gemma 2 with its soft-caps.
EXTRA = {"gemma3": dict(head_dim=32, window=8, swa_pattern=2, rope_theta=100000.0, rope_local=10000.0, eps=1e-6),
         "gemma2": dict(head_dim=32, window=8, swa_pattern=2, attn_softcap=50.0, final_softcap=30.0, eps=1e-6),
         "phi3": dict(partial_rotary=0.5),  # rope on half of each head, as Phi-4-mini on 3/4
         "qwen3moe": dict(n_expert=8, n_expert_used=2, n_ff_exp=256, eps=1e-6),
         "mixtral": dict(n_expert=8, n_expert_used=2),
         "qwen2moe": dict(n_expert=8, n_expert_used=2, n_ff_exp=256, n_ff_shexp=256, eps=1e-6)}
ARCH_NAMES = ("llama", "qwen2", "qwen3", "gemma3", "gemma2", "phi3", "qwen3moe", "mixtral", "qwen2moe")
GGUF_ARCH = {"mixtral": "llama"}  # llama.cpp runs Mixtral as a llama with experts
HF_CLASS = {"llama": ("LlamaForCausalLM", "llama"), "qwen2": ("Qwen2ForCausalLM", "qwen2"),
            "qwen3": ("Qwen3ForCausalLM", "qwen3"), "gemma3": ("Gemma3ForCausalLM", "gemma3_text"),
            "gemma2": ("Gemma2ForCausalLM", "gemma2"), "phi3": ("Phi3ForCausalLM", "phi3"),
            "qwen3moe": ("Qwen3MoeForCausalLM", "qwen3_moe"), "mixtral": ("MixtralForCausalLM", "mixtral"),
            "qwen2moe": ("Qwen2MoeForCausalLM", "qwen2_moe")}
TIED = {"llama": False, "qwen2": True, "qwen3": False, "gemma3": True, "gemma2": True, "phi3": False, "qwen3moe": False,
        "mixtral": False, "qwen2moe": False}
SEED = {"llama": 1, "qwen2": 2, "qwen3": 3, "gemma3": 4, "gemma2": 5, "phi3": 6, "qwen3moe": 7, "mixtral": 8, "qwen2moe": 9}
WORDS = ("the a of and to in is it that was for on with as at by cat dog sat mat hello world "
         "one two three red green blue big small happy sun moon star tree fish bird").split()


def vocab() -> tuple[list[str], list[float], list[int]]:
    """<unk> <s> </s>, 256 byte tokens, single characters, and every '▁'-prefix of each word, so that
    llama.cpp's SPM tokenizer can reach whole words by merging (longer pieces score higher)."""
    T = gguf.TokenType
    toks, scores, types = ["<unk>", "<s>", "</s>"], [0.0, 0.0, 0.0], [T.UNKNOWN, T.CONTROL, T.CONTROL]
    for b in range(256):
        toks.append(f"<0x{b:02X}>"), scores.append(0.0), types.append(T.BYTE)
    pieces: list[str] = ["▁"] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + list(".,!?")
    for w in WORDS:
        for k in range(1, len(w) + 1):
            pieces.append("▁" + w[:k])
    seen = set()
    for p in pieces:
        if p not in seen:
            seen.add(p)
            toks.append(p), scores.append(float(len(p))), types.append(T.NORMAL)
    return toks, scores, [int(t) for t in types]


def spec_of(arch: str, n_vocab: int) -> models.ModelSpec:
    return models.get(arch).spec_from_hf(hf_config(arch, n_vocab), "fixture")


def hf_weights(arch: str, n_vocab: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(SEED[arch])
    shapes = models.get(arch).expected_shapes(spec_of(arch, n_vocab))
    gemma = arch.startswith("gemma")  # HF stores Gemma's norm weights as w, the norm multiplies by 1 + w

    def normal(shape, std):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    w: dict[str, np.ndarray] = {}
    for name, shape in shapes.items():
        if name == "model.embed_tokens.weight" or name == "lm_head.weight":
            w[name] = normal(shape, 0.5)  # large enough that logits are peaked
        elif name.endswith("norm.weight"):
            w[name] = (1.0 + rng.standard_normal(shape) * 0.1).astype(np.float32) - np.float32(gemma)
            if gemma and ("post_attention" in name or "post_feedforward" in name):
                # the embedding enters scaled by sqrt(n_embd) (RMS 4 here) while Gemma normalises each block's
                # output: scale those outputs up (1 + w ≈ 3.5) so the layers, and an adapter on them, move the
                # logits; in [2.2, 2.8] both w and the GGUF's 1 + w are exact in float32, so they round-trip
                w[name] += np.float32(2.5)
        elif name.endswith(".bias"):
            w[name] = normal(shape, 0.1)
        elif name.endswith(".mlp.gate.weight"):  # the router: clear preferences, few near-ties between experts
            w[name] = normal(shape, 3.0 / np.sqrt(shape[-1]))
        else:
            w[name] = normal(shape, 1.0 / np.sqrt(shape[-1]))
    return w


def hf_config(arch: str, n_vocab: int) -> dict:
    """The transformers config.json, written here by hand from transformers' own config classes (not by
    lora2gguf's models/), so that transformers and llama.cpp check our readers independently."""
    d = DIMS | EXTRA.get(arch, {})
    hd = d.get("head_dim", d["n_embd"] // d["n_head"])
    cfg = {
        "architectures": [HF_CLASS[arch][0]], "model_type": HF_CLASS[arch][1],
        "vocab_size": n_vocab, "hidden_size": d["n_embd"], "intermediate_size": d["n_ff"],
        "num_hidden_layers": d["n_layer"], "num_attention_heads": d["n_head"],
        "num_key_value_heads": d["n_head_kv"], "head_dim": hd,
        "max_position_embeddings": d["n_ctx"], "rms_norm_eps": d["eps"], "rope_theta": d["rope_theta"],
        "hidden_act": "silu", "tie_word_embeddings": TIED[arch], "attention_bias": arch == "qwen2",
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32",
    }
    if arch == "qwen2":
        cfg["use_sliding_window"] = False
    if arch == "qwen2moe":  # transformers' Qwen2MoeConfig names the q/k/v bias qkv_bias
        del cfg["attention_bias"]
        cfg.update(qkv_bias=True, num_experts=d["n_expert"], num_experts_per_tok=d["n_expert_used"],
                   moe_intermediate_size=d["n_ff_exp"], shared_expert_intermediate_size=d["n_ff_shexp"],
                   norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[], use_sliding_window=False)
    if arch.startswith("gemma"):
        del cfg["hidden_act"], cfg["rope_theta"]
        cfg.update(hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=hd, sliding_window=d["window"],
                   layer_types=["sliding_attention" if i % d["swa_pattern"] < d["swa_pattern"] - 1 else
                                "full_attention" for i in range(d["n_layer"])],
                   attn_logit_softcapping=d.get("attn_softcap"), final_logit_softcapping=d.get("final_softcap"))
        if arch == "gemma3":  # transformers 5: one rope per layer type
            cfg["rope_parameters"] = {"full_attention": {"rope_type": "default", "rope_theta": d["rope_theta"]},
                                      "sliding_attention": {"rope_type": "default", "rope_theta": d["rope_local"]}}
        else:
            cfg["rope_theta"] = d["rope_theta"]
    if arch == "phi3":
        cfg.update(partial_rotary_factor=d["partial_rotary"], sliding_window=None, pad_token_id=None,
                   original_max_position_embeddings=d["n_ctx"])
    if arch == "qwen3moe":
        cfg.update(num_experts=d["n_expert"], num_experts_per_tok=d["n_expert_used"],
                   moe_intermediate_size=d["n_ff_exp"], norm_topk_prob=True, decoder_sparse_step=1,
                   mlp_only_layers=[], use_sliding_window=False)
    if arch == "mixtral":
        cfg.update(num_local_experts=d["n_expert"], num_experts_per_tok=d["n_expert_used"], router_jitter_noise=0.0,
                   sliding_window=None)
    return cfg


MIXTRAL_DISK = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


def hf_checkpoint(arch: str, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The tensors as an HF checkpoint stores them: a MoE's stacked experts one tensor per expert
    (model.layers.N.mlp.experts.E.gate_proj.weight; Mixtral: block_sparse_moe.experts.E.w1.weight and its
    router block_sparse_moe.gate.weight), as the Hub's files and transformers' save_pretrained."""
    out = {}
    for name, t in weights.items():
        head, sep, proj = name.partition(".mlp.experts.")
        if sep and arch == "mixtral":
            p, w = proj.split(".")
            out.update({f"{head}.block_sparse_moe.experts.{e}.{MIXTRAL_DISK[p]}.{w}": np.ascontiguousarray(t[e])
                        for e in range(t.shape[0])})
        elif sep:
            out.update({f"{head}.mlp.experts.{e}.{proj}": np.ascontiguousarray(t[e]) for e in range(t.shape[0])})
        elif arch == "mixtral" and ".mlp.gate." in name:
            out[name.replace(".mlp.gate.", ".block_sparse_moe.gate.")] = t
        else:
            out[name] = t
    return out


def write_gguf(path: Path, arch: str, weights: dict[str, np.ndarray], ftype: str) -> None:
    d = DIMS | EXTRA.get(arch, {})
    toks, scores, types = vocab()
    hd = d.get("head_dim", d["n_embd"] // d["n_head"])
    w = gguf.GGUFWriter(str(path), GGUF_ARCH.get(arch, arch))
    # llama.cpp special-cases the vocabulary of a model *named* phi3 (it expects <|endoftext|>, which this tiny
    # vocabulary lacks): the phi3 fixture is named without it
    w.add_name("tiny-phi" if arch == "phi3" else f"tiny-{arch}")
    w.add_block_count(d["n_layer"])
    w.add_context_length(d["n_ctx"])
    w.add_embedding_length(d["n_embd"])
    w.add_feed_forward_length(d["n_ff"])
    w.add_head_count(d["n_head"])
    w.add_head_count_kv(d["n_head_kv"])
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_rope_dimension_count(int(hd * d.get("partial_rotary", 1.0)))
    w.add_rope_freq_base(d["rope_theta"])
    w.add_layer_norm_rms_eps(d["eps"])
    if arch.startswith("gemma"):
        w.add_sliding_window(d["window"])
        w.add_sliding_window_pattern(d["swa_pattern"])
    if arch == "gemma3":
        w.add_rope_freq_base_swa(d["rope_local"])
    if "n_expert" in d:
        w.add_expert_count(d["n_expert"])
        w.add_expert_used_count(d["n_expert_used"])
    if "n_ff_exp" in d:
        w.add_expert_feed_forward_length(d["n_ff_exp"])
    if "n_ff_shexp" in d:
        w.add_expert_shared_feed_forward_length(d["n_ff_shexp"])
    if arch == "gemma2":
        w.add_attn_logit_softcapping(d["attn_softcap"])
        w.add_final_logit_softcapping(d["final_softcap"])
    w.add_vocab_size(len(toks))
    w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[ftype])
    w.add_tokenizer_model("llama")
    w.add_token_list(toks)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    a, spec = models.get(arch), spec_of(arch, len(toks))
    for hf_name, t in weights.items():
        t = a.to_gguf(spec, hf_name, t)
        name = a.gguf_name(d["n_layer"], hf_name)
        if t.ndim == 1 or ftype == "f32":
            w.add_tensor(name, np.ascontiguousarray(t, dtype=np.float32))
        elif ftype == "f16":
            w.add_tensor(name, t.astype(np.float16))
        else:
            qt = gguf.GGMLQuantizationType.Q8_0
            w.add_tensor(name, gguf.quants.quantize(t, qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def quantize_with_llama_cpp(src: Path, dst: Path, ftype_name: str) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype_name.upper()}")
    params.nthread = 1  # one thread: the output must not depend on scheduling
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise SystemExit(f"llama_model_quantize failed for {src} ({rc})")


def make(out: Path) -> list[Path]:
    written = []
    n_vocab = len(vocab()[0])
    for arch in ARCH_NAMES:
        d = out / arch
        (d / "hf").mkdir(parents=True, exist_ok=True)
        weights = hf_weights(arch, n_vocab)
        save_file(hf_checkpoint(arch, weights), str(d / "hf" / "model.safetensors"), metadata={"format": "pt"})
        (d / "hf" / "config.json").write_text(json.dumps(hf_config(arch, n_vocab), indent=2) + "\n")
        for ftype in ("f32", "f16", "q8_0"):
            write_gguf(d / f"base-{ftype}.gguf", arch, weights, ftype)
        quantize_with_llama_cpp(d / "base-f32.gguf", d / "base-q4_k_m.gguf", "q4_k_m")
        written += [d / "hf" / "model.safetensors", d / "hf" / "config.json"]
        written += [d / f"base-{t}.gguf" for t in ("f32", "f16", "q8_0", "q4_k_m")]
    return written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "fixtures"))
    args = ap.parse_args()
    os.environ.setdefault("LLAMA_LOG_LEVEL", "error")
    for p in make(Path(args.out)):
        print(f"{p.stat().st_size:>9}  {p}")


if __name__ == "__main__":
    main()
