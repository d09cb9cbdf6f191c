"""The floors verify judges against: what llama.cpp costs the base alone at a file's type (its arithmetic
at F32/F16/BF16, that plus the rounding for quantized types), and, for a merge into the base's own quantized
type, what a correct merge of that type computes. Each quantized file is made by llama.cpp's quantizer in
this process (llamacpp.ggml), measured and removed: no file here is larger than the quantized one."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
from gguf import LlamaFileType

from lora2gguf.fileio.gguf_read import GGUFFile, file_identity
from lora2gguf.llamacpp.ggml import Importance, quantize_f32_copy, quantize_file
from lora2gguf.llamacpp.runtime import LlamaRuntime

FULL_PRECISION = {"ALL_F32", "MOSTLY_F16", "MOSTLY_BF16"}


def file_type(path: Path) -> str:

    with GGUFFile(path) as f:
        ft = f.get("general.file_type")
    try:
        return LlamaFileType(int(ft)).name if ft is not None else "ALL_F32"
    except ValueError:
        return str(ft)


BASE_ALONE: dict[tuple, np.ndarray] = {}  # one process verifying several adapters on one base quantizes it once
BASE_VIEWS: dict[tuple, tuple] = {}  # the base's own views of the last base and text verified in this process
REMEMBER_BYTES = 256 << 20  # views larger than this are not kept (verify spills the large ones to disk)


def remembered(kind: str, base_path: Path, tokens, args: tuple, compute: Callable[[], tuple[np.ndarray, dict | None]]
               ) -> tuple[np.ndarray, dict | None]:
    """compute() → (logits, expert choices or None) of a view of the base alone (`kind`: llama.cpp's, the
    reference's) over `tokens`, made with `args`; kept for the next verify of the same base and text in this
    process (the demo verifies two adapters on one base): the same inputs, so the same values."""
    key = (file_identity(base_path), tuple(tokens))
    if (kind, key, args) in BASE_VIEWS:
        return BASE_VIEWS[kind, key, args]
    value = compute()
    for k in [k for k in BASE_VIEWS if k[1] != key]:  # another base or text: the old ones go
        del BASE_VIEWS[k]
    if value[0].nbytes <= REMEMBER_BYTES:
        value[0].flags.writeable = False  # shared by the verifies that follow: nobody may change it
        BASE_VIEWS[kind, key, args] = value
    return value


def base_alone(base_path: Path, ftype_name: str, tokens, tmp: Path, n_ctx: int,
               imatrix: Importance | None = None, routing: dict | None = None) -> np.ndarray:
    """llama.cpp's logits for the base alone, no adapter, quantized to ftype_name by llama.cpp (with the
    merged file's importance matrix, if it had one): what a merged file of that type would look like if it
    carried nothing. routing: a dict to receive llama.cpp's expert choices (a mixture of experts)."""
    key = (file_identity(base_path), ftype_name, tuple(tokens), n_ctx,
           None if imatrix is None else (imatrix.file, tuple((k, v.tobytes()) for k, v in sorted(imatrix.values.items()))))
    key += (routing is not None,)
    if key not in BASE_ALONE:
        got: dict = {}
        BASE_ALONE[key] = measure_base_alone(base_path, ftype_name, tokens, tmp, n_ctx, imatrix,
                                             got if routing is not None else None), got
    logits, got = BASE_ALONE[key]
    if routing is not None:
        routing.update(got)
    return logits


def measure_base_alone(base_path: Path, ftype_name: str, tokens, tmp: Path, n_ctx: int,
                       imatrix: Importance | None = None, routing: dict | None = None) -> np.ndarray:
    """The base quantized by llama.cpp's quantizer, in this process (llamacpp.ggml): from the base itself when
    it is F32/F16/BF16, else from its tensors dequantized by gguf-py (what llama_model_quantize of
    dequantize_file's F32 copy gives, without that copy: no file here is larger than the quantized one)."""
    dst = tmp / f"base-{ftype_name}.gguf"
    if file_type(base_path) in FULL_PRECISION:
        quantize_file(base_path, dst, LlamaFileType[ftype_name], imatrix=imatrix)
    else:
        quantize_f32_copy(base_path, dst, LlamaFileType[ftype_name], imatrix=imatrix)
    return logits_of(dst, tokens, n_ctx, routing, remove=True)


def logits_of(path: Path, tokens, n_ctx: int, routing: dict | None = None, remove: bool = False) -> np.ndarray:
    """llama.cpp's logits for `tokens` on the model at `path` (as it is, not repacked), and its expert choices
    into `routing` when given (a mixture of experts); `remove`: delete the file after."""
    try:
        with LlamaRuntime(path, n_ctx=n_ctx, repack=False, moe_routing=routing is not None) as rt:
            out = rt.logits(tokens)
            if routing is not None:
                routing.update(rt.routing)
            return out
    finally:
        if remove:
            path.unlink(missing_ok=True)


def exact_merge_quantized(gb, ref, mtype: str, tokens, tmp: Path, n_ctx: int,
                          imatrix: Importance | None = None, routing: dict | None = None) -> np.ndarray | None:
    """llama.cpp's logits for the reference's merged weights (PEFT's math, float64) in place of the base's
    tensors (the others dequantized by gguf-py), quantized by llama.cpp's quantizer to the merged type in this
    process (llamacpp.ggml, no F32 copy of the base): what a correct merge of that type computes
    (`ref`: parity.reference.ReferenceWeights, which makes each merged tensor when asked). The
    floor for a merge into the base's own quantized type, where the base alone re-rounds nothing (its values
    are on the grid already) while the merge re-rounds every tensor it changes. None when the merge adds
    tensors the base lacks (a new bias, an untied head): the base-alone floor is used then."""
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
    quantize_f32_copy(gb.path, dst, LlamaFileType[mtype], replace, imatrix=imatrix)
    return logits_of(dst, tokens, n_ctx, routing, remove=True)
