"""Output types for merge, and llama.cpp's own quantizer (through llama-cpp-python) for the quantized ones.

f32/f16/bf16 are plain conversions that merge writes itself, with llama.cpp's rule for which tensors
take the file's type (see `takes_file_type`). Every quantized type, q8_0 included, comes from llama.cpp's
quantizer, so its per-tensor mixes (q4_k_m's Q6_K attn_v/ffn_down, fallbacks for odd shapes) and bytes are
llama.cpp's, not an imitation. Two ways to run it:

- in this process, tensor by tensor from float rows (llamacpp.ggml.write_quantized): what merge and
  verify use, with no intermediate model file; types from llama.cpp's dry run, data from
  ggml_quantize_chunk; byte-identical to the next one (tests/llamacpp/test_ggml.py);
- `llama_quantize` here: `llama_model_quantize` on a GGUF file, in a child process (file in, file out), kept
  for merge's intermediate=True path (the reference the in-process writer is tested against) and scripts.

The types that need an importance matrix (needs_imatrix) are merge's with --imatrix / --imatrix-data only.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import llama_cpp
from gguf import GGMLQuantizationType, LlamaFileType

from lora2gguf.errors import Lora2GGUFError


@dataclass(frozen=True)
class OutputType:
    name: str  # what the user types: q4_k_m
    ftype: LlamaFileType  # general.file_type / llama_ftype
    direct: GGMLQuantizationType | None  # set for the float types merge writes itself
    needs_imatrix: bool = False  # llama.cpp refuses it without an importance matrix

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
# llama.cpp refuses these without an importance matrix (tensor_requires_imatrix in llama-quant.cpp): IQ1/IQ2,
# IQ3_XXS tensors and Q2_K_S's Q2_K ones. IQ2_M and IQ3_XS mix in such types.
OUTPUT_TYPES.update({t.name: t for t in [
    OutputType(name, _F[f"MOSTLY_{name.upper()}"], None, needs_imatrix=True)
    for name in ("iq3_xxs", "iq3_xs", "iq2_m", "iq2_s", "iq2_xs", "iq2_xxs", "iq1_m", "iq1_s", "q2_k_s")]})


def output_type(name: str) -> OutputType:
    key = name.strip().lower()
    if key in OUTPUT_TYPES:
        return OUTPUT_TYPES[key]
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
    llama.cpp's log goes to stderr only when verbose; its last error lines make the message otherwise.

    llama.cpp runs in a child process: inside its C call Python cannot act on a signal until the whole
    model is done (minutes on 8B), while a child can be killed at once. Ctrl-C / SIGTERM here raise as
    anywhere else, the child is killed and waited for, and the caller removes `dst`; the child dies
    with this process too (PR_SET_PDEATHSIG), so even a SIGKILL leaves no writer behind."""
    cmd = [sys.executable, "-m", "lora2gguf.llamacpp.quantize", os.fspath(src), os.fspath(dst), str(int(ftype)),
           str(threads or 0), str(os.getpid())]
    errors: list[str] = []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            text=True, errors="replace", bufsize=1)
    try:
        for line in proc.stdout:
            if verbose:
                sys.stderr.write(line)
            if any(w in line.lower() for w in ("error", "failed", "warn")):  # keep for the message
                errors.append(line.strip())
            if on_tensor and _TENSOR_LINE.match(line):
                on_tensor()
        rc = proc.wait()
    finally:
        if proc.poll() is None:  # interrupted: stop llama.cpp now, not when it is done
            proc.kill()
            proc.wait()
        proc.stdout.close()
    if rc != 0:
        why = next((e for e in reversed(errors) if "failed to quantize" in e), errors[-1] if errors else
                   f"the quantizer exited with status {rc}")
        raise Lora2GGUFError(f"{Path(dst)}: llama.cpp could not quantize to {LlamaFileType(ftype).name} ({why}); "
                             "run with --verbose to see llama.cpp's log")


def _child(src: str, dst: str, ftype: int, threads: int, parent: int) -> int:
    """The quantizer process: llama.cpp's log on stdout, for the parent to read."""
    with contextlib.suppress(OSError, AttributeError):  # Linux: die with the parent, whatever kills it
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before prctl took effect
        return 1
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, signal.SIG_DFL)  # die at once, mid-tensor: the parent removes the output

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads  # 0: llama.cpp uses every hardware thread
    params.allow_requantize = True

    @llama_cpp.llama_log_callback
    def log(level: int, text: bytes, user_data) -> None:
        sys.stdout.write(text.decode("utf-8", errors="replace"))
        if text.endswith(b"\n"):
            sys.stdout.flush()  # line by line: the parent's progress bar follows the tensors

    llama_cpp.llama_log_set(log, ctypes.c_void_p(0))
    rc = llama_cpp.llama_model_quantize(os.fsencode(src), os.fsencode(dst), ctypes.byref(params))
    sys.stdout.flush()
    return 0 if rc == 0 else 1


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])))
