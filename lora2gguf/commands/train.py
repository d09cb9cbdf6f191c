"""`lora2gguf train`: LoRA training on the weights of the GGUF you serve, with its tokenizer.

This verb checks the request before any heavy work (settings, output directory, --gguf path), sets up the
device and, under torchrun, the process group, runs training.trainer, and converts the adapter to a GGUF
LoRA when asked (adapters.gguf_lora_write, as `lora2gguf convert` does).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from lora2gguf.adapters.gguf_lora_write import check_outtype, gguf_from_peft
from lora2gguf.errors import Lora2GGUFError
from lora2gguf.fileio.atomic import check_output
from lora2gguf.training.checkpoint import latest_checkpoint
from lora2gguf.training.config import TrainConfig, TrainResult, pick_device, pick_dtype
from lora2gguf.training.lora import parse_layers, resolve_targets
from lora2gguf.training.trainer import run_training

__all__ = ["TrainConfig", "TrainResult", "train"]


def check_config(cfg: TrainConfig) -> None:
    checks = [(cfg.rank >= 1, "--rank must be at least 1"), (cfg.lr > 0, "--lr must be positive"),
              (cfg.batch_size >= 1, "--batch-size must be at least 1"), (cfg.grad_accum >= 1, "--grad-accum must be at least 1"),
              (cfg.seq_len >= 2, "--seq-len must be at least 2"), (0 <= cfg.dropout < 1, "--dropout must be in [0, 1)"),
              (cfg.steps is None or cfg.steps >= 1, "--steps must be at least 1"),
              (cfg.epochs is None or cfg.epochs > 0, "--epochs must be positive"),
              (cfg.steps is None or cfg.epochs is None, "give --steps or --epochs, not both"),
              (cfg.save_every >= 0, "--save-every must be 0 (off) or positive"),
              (cfg.warmup is None or cfg.warmup >= 0, "--warmup must not be negative")]
    for ok, msg in checks:
        if not ok:
            raise Lora2GGUFError(msg)
    resolve_targets(cfg.targets)
    parse_layers(cfg.layers)
    check_outtype(cfg.gguf_outtype, "--gguf-outtype")


def prepare_output(cfg: TrainConfig) -> Path:
    """Refuse before any heavy work: an existing run without --force/--resume, an unusable --gguf path."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise Lora2GGUFError(f"{out}: is a file; -o takes a directory for the adapter")
    if cfg.resume:
        if not out.is_dir() or latest_checkpoint(out) is None:
            raise Lora2GGUFError(f"{out}: no checkpoint-<step> directory to resume from; run without --resume")
    elif out.is_dir() and any(out.iterdir()) and not cfg.force:
        raise Lora2GGUFError(f"{out}: already exists and is not empty; pass --resume to continue its run or "
                             "--force to start over (its adapter, checkpoints and log are removed)")
    if cfg.gguf:
        check_output(cfg.gguf, cfg.force, [cfg.base])
    return out


def train(cfg: TrainConfig, on_step=None) -> TrainResult:
    """Train and save a PEFT adapter in cfg.out. `on_step(step)` is called after each completed step."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = (int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))) if world > 1 else (0, 0)
    warn = (lambda msg: print(msg, file=sys.stderr)) if rank == 0 else (lambda msg: None)
    check_config(cfg)
    if cfg.batch_size % world:
        raise Lora2GGUFError(f"--batch-size {cfg.batch_size} must be a multiple of the {world} processes")
    device = pick_device(cfg.device, local)
    cdtype = pick_dtype(cfg.dtype, device)
    out = prepare_output(cfg)
    if world > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        result = run_training(cfg, on_step, out, device, cdtype, rank, world, warn)
        if rank == 0 and cfg.gguf:
            gguf_from_peft(out, cfg.base, check_output(cfg.gguf, cfg.force, [out, cfg.base]), cfg.gguf_outtype)
            result.gguf = Path(cfg.gguf)
        if world > 1:
            dist.barrier()
        return result
    finally:
        if world > 1:
            dist.destroy_process_group()
