"""The floors verify judges against: what llama.cpp costs the base alone at a file's type (its arithmetic
at F32/F16/BF16, that plus the rounding for quantized types), and, for a merge into the base's own quantized
type, what a correct merge of that type computes. Each quantized file is made by llama.cpp's quantizer in
this process (llamacpp.ggml) into verify's temporary directory, which goes when verify ends: no file here
is larger than the quantized one."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
from gguf import LlamaFileType

from lora2gguf.fileio.gguf_read import GGUFFile, file_identity
from lora2gguf.llamacpp.ggml import Importance, quantize_file, quantize_replaced

FULL_PRECISION = {"ALL_F32", "MOSTLY_F16", "MOSTLY_BF16"}


def file_type(path: Path) -> str:

    with GGUFFile(path) as f:
        ft = f.get("general.file_type")
    try:
        return LlamaFileType(int(ft)).name if ft is not None else "ALL_F32"
    except ValueError:
        return str(ft)


BASE_STATES: dict[tuple, tuple] = {}  # the base reference's states for the last base and text verified


def remembered_base_states(base_path: Path, tokens, compute: Callable[[], tuple]) -> tuple:
    """compute(): the reference's final hidden states of the base alone over `tokens` (and its expert
    choices), kept for the next verify of the same base and text in this process (the demo verifies two
    adapters on one base): the same inputs, so the same values. Small (tokens × n_embd), not logits."""
    key = (file_identity(base_path), tuple(tokens))
    if key not in BASE_STATES:
        BASE_STATES.clear()  # another base or text: the old one goes
        BASE_STATES[key] = compute()
    return BASE_STATES[key]


def base_alone_file(base_path: Path, ftype_name: str, tmp: Path, imatrix: Importance | None = None) -> Path:
    """The base alone, no adapter, quantized to ftype_name by llama.cpp's quantizer in this process
    (llamacpp.ggml), with the merged file's importance matrix if it had one: what a merged file of that type
    would be if it carried nothing. llama_model_quantize of the base itself, as a merge hands it the
    tensors no adapter touches: those already of their target type are copied, the others requantized from
    their stored values."""
    dst = tmp / f"base-{ftype_name}.gguf"
    quantize_file(base_path, dst, LlamaFileType[ftype_name], imatrix=imatrix)
    return dst


def exact_merge_file(gb, ref, mtype: str, tmp: Path, imatrix: Importance | None = None) -> Path | None:
    """The reference's merged weights (PEFT's math, float64) in place of the base's tensors they change,
    quantized by llama.cpp's quantizer to the merged type in this process (llamacpp.ggml), the tensors no
    adapter touches kept as stored, as a merge keeps them: what a correct merge of that type computes
    (`ref`: parity.reference.ReferenceWeights, which makes each merged tensor when asked). The floor for a
    merge into the base's own quantized type, where the base alone re-rounds nothing (its values are on the
    grid already) while the merge re-rounds every tensor it changes, and only those. None when the merge
    adds tensors the base lacks (a new bias, an untied head): the base-alone floor is used then."""
    spec, arch = gb.spec, gb.spec.arch_module
    changed = ref.touched  # modules an adapter changes or replaces
    if spec.tied_embeddings and changed & {"model.embed_tokens", "lm_head"}:
        return None  # the merge unties the head: a tensor the base lacks
    replace = {}
    names = set(gb.hf_names())
    for mod in sorted(changed):
        n_out = gb.file.tensors[gb.gguf_name(f"{mod}.weight")].shape[0] if f"{mod}.weight" in names else None
        for attr in ("weight", "bias"):
            name = f"{mod}.{attr}"
            if name not in names:
                if ref.get(name, n_out) is not None:
                    return None  # a tensor the base lacks (a LoRA bias on a bias-free projection)
                continue
            # made when the quantizer reaches it: one merged tensor in memory at a time
            replace[gb.gguf_name(name)] = lambda name=name, n_out=n_out: np.ascontiguousarray(
                arch.to_gguf(spec, name, ref.get(name, n_out).numpy()), np.float32)
    dst = tmp / f"exact-merge-{mtype}.gguf"
    quantize_replaced(gb.path, dst, LlamaFileType[mtype], replace, imatrix=imatrix)
    return dst
