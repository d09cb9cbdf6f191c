"""What a training run is asked for (TrainConfig), what it returns, and where it computes (device, dtype)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lora2gguf.errors import Lora2GGUFError


@dataclass
class TrainConfig:
    base: str
    data: str
    out: str
    eval_data: str | None = None
    tokenizer: str | None = None  # a GGUF whose tokenizer to use (required for an HF-directory base)
    chat_template: str | None = None  # for messages records: a llamacpp.tokenizer.CHAT_TEMPLATES name or a Jinja file
    rank: int = 16
    alpha: float = 32.0
    rslora: bool = False
    dropout: float = 0.05
    targets: str = "all-linear"
    layers: str | None = None  # PEFT's layers_to_transform, e.g. "20-29"; None: every layer
    lr: float = 2e-4
    steps: int | None = None
    epochs: float | None = None  # default: 1 epoch when neither steps nor epochs is given
    batch_size: int = 4  # sequences per micro-batch, over all processes together
    grad_accum: int = 1
    seq_len: int = 1024
    warmup: int | None = None  # steps; default 3% of the run
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    device: str = "auto"
    dtype: str = "auto"
    grad_checkpointing: bool = False
    base_weights: str = "auto"  # resident (dequantized once), quantized (the GGUF's blocks), auto: by free memory
    seed: int = 0
    save_every: int = 0
    eval_every: int | None = None  # default: ten evaluations per run
    resume: bool = False
    gguf: str | None = None
    gguf_outtype: str = "f32"
    force: bool = False
    progress: bool = True


@dataclass
class TrainResult:
    out: Path
    steps: int
    losses: list[float] = field(default_factory=list)  # per step, this run (not the resumed part)
    eval_loss: float | None = None
    gguf: Path | None = None
    model: nn.Module | None = None
    layers: dict | None = None
    optimizer: torch.optim.Optimizer | None = None
    rank: int = 0


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise Lora2GGUFError("--device cuda: this torch build sees no CUDA device; use --device cpu or "
                                 "install a CUDA build of torch (see README)")
        return torch.device("cuda", local_rank)
    if name == "mps" and not torch.backends.mps.is_available():
        raise Lora2GGUFError("--device mps: MPS is not available here; use --device cpu")
    if name not in ("cpu", "mps"):
        raise Lora2GGUFError(f"--device {name}: expected auto, cpu, cuda or mps")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """Compute dtype: bf16 autocast on CUDA by default (fp16 where bf16 is missing), fp32 elsewhere."""
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if name not in dtypes:
        raise Lora2GGUFError(f"--dtype {name}: expected auto, bf16, fp16 or fp32")
    return dtypes[name]
