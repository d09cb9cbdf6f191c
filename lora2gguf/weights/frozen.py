"""The frozen base a training run computes on: resident (dequantized once; F32 tensors of a GGUF used in
place from its memory map) or quantized (the GGUF's own blocks, weights.quantized), chosen by free memory."""

from __future__ import annotations

import os
import warnings

import numpy as np
import torch
from gguf import GGMLQuantizationType
from torch import nn

from lora2gguf.errors import Lora2GGUFError
from lora2gguf.models.layers import Transformer
from lora2gguf.weights.base_model import GGUFBase
from lora2gguf.weights.quantized import load_quantized_model

BASE_WEIGHTS = ("auto", "resident", "quantized")


RESIDENT_SHARE = 0.5  # auto keeps the base resident when that takes at most this share of free memory


def available_memory(device: torch.device) -> int:
    """Bytes free for the frozen base: the GPU's free memory, or the host's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


def resident_cost(base, dtype: torch.dtype, device: torch.device) -> int:
    """Bytes the resident form adds beyond the file's pages: every 2-D tensor dequantized to `dtype`,
    except F32 tensors that load_base_model maps in place (CPU, fp32)."""
    total = 0
    for name in base.hf_names():
        info = base.file.tensors[base.gguf_name(name)]
        in_place = (info.type == GGMLQuantizationType.F32 and dtype == torch.float32 and device.type == "cpu"
                    and base.spec.arch_module.stored_as_hf(base.spec, name))
        total += 0 if in_place else info.n_elements * torch.finfo(dtype).bits // 8
    return total


def choose_base_weights(base, want: str, dtype: torch.dtype, device: torch.device, ranks_here: int = 1
                        ) -> tuple[str, str]:
    """(resident | quantized, why): where the frozen base lives. resident: dequantized once to `dtype`
    (fastest per step); quantized: the GGUF's own blocks, dequantized a block at a time in forward and
    backward (memory ≈ the file). auto picks resident when it needs at most RESIDENT_SHARE of the free
    memory (shared by the processes training on this machine or GPU), quantized otherwise."""
    if want not in BASE_WEIGHTS:
        raise Lora2GGUFError(f"--base-weights {want}: expected one of {', '.join(BASE_WEIGHTS)}")
    if not isinstance(base, GGUFBase):
        if want == "quantized":
            raise Lora2GGUFError(f"{base.path}: --base-weights quantized needs a GGUF base (it keeps the file's "
                                 "quant blocks); a Hugging Face directory trains resident")
        return "resident", "a Hugging Face base"
    cost, free = resident_cost(base, dtype, device), available_memory(device) // max(1, ranks_here)
    gb = lambda n: f"{n / 1e9:.1f} GB"  # noqa: E731
    why = f"resident {str(dtype).removeprefix('torch.')} needs {gb(cost)}, {gb(free)} free on {device.type}"
    if want != "auto":
        return want, f"--base-weights {want}; {why}"
    return ("resident", why) if cost <= RESIDENT_SHARE * free else ("quantized", why)


def load_base_model(base, dtype: torch.dtype, device: torch.device, weights: str = "resident") -> nn.Module:
    """The frozen base for training, `weights` = "quantized": weights.quantized.load_quantized_model; else
    Transformer.from_base, except that on CPU in fp32 the F32 tensors of a GGUF are used in place,
    straight from the file's memory map: the frozen base is never written, so it costs the file's
    pages and no copy (quantized tensors and those the arch transforms, e.g. permuted q/k rows, are still
    dequantized/copied). They are
    views of one tensor over the file, so that projections stored next to each other (gate/up) fuse
    without a copy (concat_rows)."""
    if weights == "quantized":
        return load_quantized_model(base, dtype, device)
    if not (isinstance(base, GGUFBase) and dtype == torch.float32 and device.type == "cpu"):
        return Transformer.from_base(base, dtype=dtype, device=device)

    spec = base.spec
    arch = spec.arch_module
    with torch.device("meta"):
        model = Transformer(spec, None)
    state, mapped = {}, None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not writable.*")
        for name in base.hf_names():
            info = base.file.tensors[base.gguf_name(name)]
            if info.type == GGMLQuantizationType.F32 and arch.stored_as_hf(spec, name):
                raw = base.file.raw(info.name)
                if mapped is None:  # one tensor over the whole mapped file: neighbours (gate, up) share storage
                    whole = isinstance(raw.base, memoryview) and raw.base.nbytes == base.file.size
                    mapped = torch.frombuffer(raw.base, dtype=torch.uint8) if whole else False
                if mapped is not False:
                    state[name] = mapped[info.offset:info.offset + info.nbytes].view(torch.float32).view(info.shape)
                    continue
                arr = raw.view(np.float32).reshape(info.shape)
            else:
                arr = base.tensor(name)
            state[name] = torch.from_numpy(arr)
    model.load_state_dict(state, strict=True, assign=True)
    ff = base.rope_freqs()
    model.set_rope_factors(torch.from_numpy(ff) if ff is not None else None)
    return model.eval().requires_grad_(False)
