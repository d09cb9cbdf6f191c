"""Output types for merge, and llama.cpp's own quantizer (through llama-cpp-python) for the quantized ones.

f32/f16/bf16 are plain conversions that merge writes itself, with llama.cpp's rule for which tensors
take the file's type (see `takes_file_type`). Every quantized type, q8_0 included, comes from
`llama_model_quantize`: the same code path as the `llama-quantize` tool, so its per-tensor mixes
(q4_k_m's Q6_K attn_v/ffn_down, fallbacks for odd shapes) and bytes are llama.cpp's, not an imitation.
"""

from __future__ import annotations

import ctypes
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from gguf import GGMLQuantizationType, LlamaFileType

from .errors import Lora2GGUFError, signals_deferred


@dataclass(frozen=True)
class OutputType:
    name: str  # what the user types: q4_k_m
    ftype: LlamaFileType  # general.file_type / llama_ftype
    direct: GGMLQuantizationType | None  # set for the float types merge writes itself

    @property
    def label(self) -> str:
        return self.name.upper()


_F = LlamaFileType
OUTPUT_TYPES: dict[str, OutputType] = {t.name: t for t in [
    OutputType("f32", _F.ALL_F32, GGMLQuantizationType.F32),
    OutputType("f16", _F.MOSTLY_F16, GGMLQuantizationType.F16),
    OutputType("bf16", _F.MOSTLY_BF16, GGMLQuantizationType.BF16),
    OutputType("q8_0", _F.MOSTLY_Q8_0, None),
    OutputType("q6_k", _F.MOSTLY_Q6_K, None),
    OutputType("q5_k_m", _F.MOSTLY_Q5_K_M, None),
    OutputType("q5_k_s", _F.MOSTLY_Q5_K_S, None),
    OutputType("q5_1", _F.MOSTLY_Q5_1, None),
    OutputType("q5_0", _F.MOSTLY_Q5_0, None),
    OutputType("q4_k_m", _F.MOSTLY_Q4_K_M, None),
    OutputType("q4_k_s", _F.MOSTLY_Q4_K_S, None),
    OutputType("q4_1", _F.MOSTLY_Q4_1, None),
    OutputType("q4_0", _F.MOSTLY_Q4_0, None),
    OutputType("q3_k_l", _F.MOSTLY_Q3_K_L, None),
    OutputType("q3_k_m", _F.MOSTLY_Q3_K_M, None),
    OutputType("q3_k_s", _F.MOSTLY_Q3_K_S, None),
    OutputType("q2_k", _F.MOSTLY_Q2_K, None),
    OutputType("iq4_nl", _F.MOSTLY_IQ4_NL, None),
    OutputType("iq4_xs", _F.MOSTLY_IQ4_XS, None),
    OutputType("iq3_s", _F.MOSTLY_IQ3_S, None),
    OutputType("iq3_m", _F.MOSTLY_IQ3_M, None),
]}
# llama.cpp refuses these without an importance matrix (tensor_requires_imatrix in llama-quant.cpp).
NEEDS_IMATRIX = ("iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq2_m", "iq3_xxs", "iq3_xs", "q2_k_s")


def output_type(name: str) -> OutputType:
    key = name.strip().lower()
    if key in OUTPUT_TYPES:
        return OUTPUT_TYPES[key]
    if key in NEEDS_IMATRIX:
        raise Lora2GGUFError(f"--quant {name}: llama.cpp needs an importance matrix for this type, which merge "
                             "does not take; merge to f16, then run llama-quantize --imatrix on that file")
    raise Lora2GGUFError(f"--quant {name}: unknown type; valid: {', '.join(OUTPUT_TYPES)}")


def takes_file_type(name: str, shape: tuple[int, ...]) -> bool:
    """Whether llama.cpp converts this tensor to the file's type (tensor_allows_quantization in
    llama-quant.cpp, for the llama/qwen2/qwen3 tensors): 2-D+ weights except norms. Others keep theirs."""
    return len(shape) >= 2 and name.endswith("weight") and "_norm.weight" not in name


_TENSOR_LINE = re.compile(r"\[\s*\d+/\s*\d+\]")


def llama_quantize(src: str | os.PathLike, dst: str | os.PathLike, ftype: LlamaFileType, threads: int | None = None,
                   verbose: bool = False, on_tensor: Callable[[], None] | None = None) -> None:
    """Quantize a GGUF model file with llama.cpp (what `llama-quantize src dst TYPE` does). Tensors already
    of their target type are copied as is; other quantized tensors are requantized (allow_requantize).
    llama.cpp's log goes to stderr only when verbose; its last error lines make the message otherwise."""
    import llama_cpp
    import llama_cpp._logger as lc_logger

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(ftype)
    params.nthread = threads or 0  # 0: llama.cpp uses every hardware thread
    params.allow_requantize = True
    errors: list[str] = []
    raised: list[BaseException] = []

    @llama_cpp.llama_log_callback
    def log(level: int, text: bytes, user_data) -> None:
        # An exception cannot cross llama.cpp's C frames (ctypes would print and drop it): keep it and
        # raise it once llama.cpp returns. Signals are held meanwhile (signals_deferred).
        try:
            line = text.decode("utf-8", errors="replace")
            if verbose:
                sys.stderr.write(line)
            if level in (2, 3) or "error" in line.lower():  # WARN, ERROR: keep for the message
                errors.append(line.strip())
            if on_tensor and _TENSOR_LINE.match(line):
                on_tensor()
        except BaseException as e:  # noqa: B036 — re-raised below, outside the C call
            raised.append(e)

    llama_cpp.llama_log_set(log, ctypes.c_void_p(0))
    try:
        with signals_deferred():  # Ctrl-C / SIGTERM: after the C call, so the caller removes its temp files
            rc = llama_cpp.llama_model_quantize(os.fsencode(src), os.fsencode(dst), ctypes.byref(params))
    finally:
        llama_cpp.llama_log_set(lc_logger.llama_log_callback, ctypes.c_void_p(0))
    if raised:
        raise raised[0]
    if rc != 0:
        why = next((e for e in reversed(errors) if "failed to quantize" in e), errors[-1] if errors else "no reason given")
        raise Lora2GGUFError(f"{Path(dst)}: llama.cpp could not quantize to {LlamaFileType(ftype).name} ({why}); "
                             "run with --verbose to see llama.cpp's log")
