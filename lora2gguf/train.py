"""`lora2gguf train`: LoRA training on the weights of the GGUF you serve (dequantized), with its tokenizer.

One optimizer step consumes a global batch of batch_size × grad_accum sequences, drawn from a seeded
permutation of the data per epoch; the loss is the mean over the global batch's trained tokens, so the
same run under grad accumulation or torchrun (each rank a shard of every micro-batch) computes the same
update. Only LoRA A/B train (AdamW, warmup + cosine, clipping); the base is frozen. Ctrl-C finishes the
current step, saves OUT/checkpoint-<step> and exits; --resume continues from the latest checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .checkpoint import RESUME_KEYS, Interrupt, latest_checkpoint, load_checkpoint, save_checkpoint
from .errors import Lora2GGUFError
from .training_layers import fuse_for_training
from .training_model import (LossModel, adapter_config, choose_base_weights, inject_lora, load_base_model,
                             lora_parameters, parse_layers, resolve_targets, save_adapter)

LOG_NAME, PLOT_NAME = "train_log.jsonl", "loss.png"


@dataclass
class TrainConfig:
    base: str
    data: str
    out: str
    eval_data: str | None = None
    tokenizer: str | None = None  # a GGUF whose tokenizer to use (required for an HF-directory base)
    chat_template: str | None = None  # for messages records: a data.CHAT_TEMPLATES name or a Jinja file
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


def lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:  # linear warmup from 0, then cosine to 0 (transformers' cosine schedule)
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    return f


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
    from .adapter_gguf_write import check_outtype

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
        from .gguf_write import check_output

        check_output(cfg.gguf, cfg.force, [cfg.base])
    return out


# What a run leaves in OUT besides its checkpoints: a new run (--force) removes them all, so that an
# interrupted new run cannot look finished with the previous run's final adapter.
RUN_FILES = (LOG_NAME, PLOT_NAME, "adapter_model.safetensors", "adapter_config.json")


def clear_previous_run(out: Path) -> None:
    for p in out.glob("checkpoint-*"):
        shutil.rmtree(p, ignore_errors=True)
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)


def read_log(log_path: Path) -> list[dict]:
    """train_log.jsonl's records. A line cut short by a crash or a full disk mid-write (the last one) is
    dropped; the checkpoint, not the log, says where the run resumes."""
    rows = []
    if not log_path.is_file():
        return rows
    for line in log_path.read_text(errors="replace").splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(r, dict) and isinstance(r.get("step"), int):
            rows.append(r)
    return rows


def tokens_digest(examples) -> str:
    """sha256 of the tokenized examples: changes with the data, the tokenizer or the sequence length."""
    import hashlib

    import numpy as np

    h = hashlib.sha256()
    for e in examples:
        for seq in (e.ids, e.labels):
            a = np.asarray(seq, np.int64)
            h.update(len(a).to_bytes(8, "little") + a.tobytes())
    return h.hexdigest()


def file_sha256(path: str) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def plot_losses(log_path: Path, png_path: Path, warn) -> None:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        warn("warning: matplotlib is not installed; no loss-curve PNG (pip install matplotlib)")
        return
    rows = read_log(log_path)
    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train")
    ev = [r for r in rows if r.get("eval_loss") is not None]
    if ev:
        ax.plot([r["step"] for r in ev], [r["eval_loss"] for r in ev], "o-", label="eval")
    ax.set_xlabel("step"), ax.set_ylabel("loss"), ax.legend(), ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path)


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
        import torch.distributed as dist

        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        return _train(cfg, on_step, out, device, cdtype, rank, world, warn)
    finally:
        if world > 1:
            dist.destroy_process_group()


@dataclass
class Run:
    """Everything one training run holds; its methods are the pieces of the loop."""

    cfg: TrainConfig
    out: Path
    device: torch.device
    cdtype: torch.dtype
    rank: int
    world: int
    pad_id: int
    model: nn.Module
    net: nn.Module  # LossModel, wrapped in DistributedDataParallel under torchrun
    layers: dict
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    args: dict  # what a checkpoint must agree on to be resumed
    adapter_config: dict

    def forward(self, module: nn.Module, examples, backward_scale: float | None = None) -> torch.Tensor:
        """Summed loss of these examples; with backward_scale, also backpropagates loss × scale."""
        from .data import collate

        batch = {k: (v.to(self.device) if v is not None else None) for k, v in collate(examples, self.pad_id).items()}
        with torch.autocast(self.device.type, dtype=self.cdtype, enabled=self.cdtype != torch.float32):
            loss = module(batch["ids"], batch["attention_mask"], batch["targets"])
        if backward_scale is not None:
            self.scaler.scale(loss * backward_scale).backward()
        return loss.detach().float()

    def all_sum(self, x: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            torch.distributed.all_reduce(x)
        return x

    def step(self, batch: list) -> tuple[float, float, float]:
        """One optimizer step on a global batch → (mean loss per trained token, lr used, grad norm)."""
        B, K, world = self.cfg.batch_size, self.cfg.grad_accum, self.world
        n_trained = sum(e.n_trained for e in batch)
        loss_sum = torch.zeros((), device=self.device)
        for j in range(K):
            shard = batch[j * B:(j + 1) * B][self.rank::world]
            sync = world == 1 or j == K - 1  # DDP: all-reduce gradients on the last micro-batch only
            with contextlib.nullcontext() if sync else self.net.no_sync():
                # the mean over the global batch's trained tokens; DDP averages over ranks, hence × world
                loss_sum += self.forward(self.net, shard, backward_scale=world / n_trained)
        self.scaler.unscale_(self.opt)
        params = [p for g in self.opt.param_groups for p in g["params"]]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm).item()
        lr = self.sched.get_last_lr()[0]
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return self.all_sum(loss_sum).item() / n_trained, lr, grad_norm

    def evaluate(self, examples: list) -> float:
        m = self.net.module if self.world > 1 else self.net  # not through DDP: no gradients, no hooks
        m.eval()
        total = torch.zeros((), device=self.device)
        with torch.no_grad():
            for i in range(0, len(examples), self.cfg.batch_size):
                if shard := examples[i:i + self.cfg.batch_size][self.rank::self.world]:
                    total += self.forward(m, shard)
        m.train()
        return self.all_sum(total).item() / sum(e.n_trained for e in examples)

def setup(cfg, out, device, cdtype, rank, world, warn) -> tuple[Run, list, list]:
    """Tokenize the data, load the frozen base, add LoRA, build the optimizer → (run, train, eval examples)."""
    from .base import open_base
    from .data import load_dataset, open_tokenizer
    from .fingerprint import fingerprint

    tok = open_tokenizer(cfg.base, cfg.tokenizer, cfg.chat_template)
    try:
        train_ex = load_dataset(cfg.data, tok, cfg.seq_len, warn)
        eval_ex = load_dataset(cfg.eval_data, tok, cfg.seq_len, warn) if cfg.eval_data else []
    finally:
        tok.close()
    with open_base(cfg.base) as base:
        if tok.n_vocab > base.spec.n_vocab:
            raise Lora2GGUFError(f"{tok.path}: tokenizer has {tok.n_vocab} tokens but {cfg.base} has "
                                 f"{base.spec.n_vocab}; use the tokenizer of this model")
        layer_ids = parse_layers(cfg.layers, base.spec.n_layer)
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        form, why = choose_base_weights(base, cfg.base_weights, cdtype, device, local)
        warn(f"frozen base: {form} ({why})")
        model = load_base_model(base, cdtype, device, form)  # frozen base in the compute dtype
        base_name = base.spec.name or Path(cfg.base).name
        base_digest = fingerprint(base).digest
    if rank == 0:  # only now that the inputs are known good
        out.mkdir(parents=True, exist_ok=True)
        if not cfg.resume:
            clear_previous_run(out)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    layers = inject_lora(model, cfg.targets, cfg.rank, cfg.alpha, cfg.rslora, cfg.dropout, layer_ids)
    fuse_for_training(model)  # the same model and math, computed in fewer and larger steps
    model.grad_checkpointing = cfg.grad_checkpointing
    model.train()
    params = lora_parameters(layers)
    trainable = {id(p) for p in params}
    assert all(not p.requires_grad for p in model.parameters() if id(p) not in trainable), "base must be frozen"
    net: nn.Module = LossModel(model)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        # every rank loaded the same base: only LoRA weights need syncing (and mapped weights are read-only)
        frozen = [n for n, p in net.named_parameters() if not p.requires_grad]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(net, frozen)
        net = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None,
                                      broadcast_buffers=False)
    total = cfg.steps or max(1, math.ceil((cfg.epochs or 1.0) * len(train_ex) / (cfg.batch_size * cfg.grad_accum)))
    warmup = cfg.warmup if cfg.warmup is not None else int(0.03 * total)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)  # LoRA A/B only
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(warmup, total))
    scaler = torch.amp.GradScaler(device.type, enabled=cdtype == torch.float16)  # fp16 needs loss scaling
    args = {k: getattr(cfg, k) for k in RESUME_KEYS} | {
        "targets": resolve_targets(cfg.targets, model.spec.arch_module), "layers": layer_ids, "warmup": warmup,
        "total_steps": total, "data_sha256": file_sha256(cfg.data),
        # another base of the same shapes, another tokenizer or other eval data would resume silently
        "base_fingerprint": base_digest, "train_tokens": tokens_digest(train_ex), "eval_tokens": tokens_digest(eval_ex)}
    config = adapter_config(args["targets"], cfg.rank, cfg.alpha, cfg.rslora, cfg.dropout, base_name, layer_ids)
    run = Run(cfg, out, device, cdtype, rank, world, tok.pad_id, model, net, layers, opt, sched, scaler, args, config)
    return run, train_ex, eval_ex


def _train(cfg, on_step, out, device, cdtype, rank, world, warn) -> TrainResult:
    from tqdm import tqdm

    from .data import Order

    run, train_ex, eval_ex = setup(cfg, out, device, cdtype, rank, world, warn)
    total, G = run.args["total_steps"], cfg.batch_size * cfg.grad_accum
    eval_every = cfg.eval_every or max(1, total // 10)
    start = 0
    if cfg.resume:
        ck = latest_checkpoint(out)
        start = load_checkpoint(run, ck)
        warn(f"resuming from {ck} (step {start} of {total})")
    log_path = out / LOG_NAME
    if rank == 0:  # drop log lines past the checkpoint we resume from
        old = read_log(log_path) if cfg.resume else []
        log_path.write_text("".join(json.dumps(r) + "\n" for r in old if r["step"] <= start))
    order = Order(len(train_ex), cfg.seed)
    result = TrainResult(out, start, model=run.model, layers=run.layers, optimizer=run.opt, rank=rank)
    bar = tqdm(total=total, initial=start, disable=not cfg.progress or rank != 0, dynamic_ncols=True,
               desc="train", unit="step", file=sys.stderr)
    with Interrupt() as intr, bar:
        for step in range(start, total):
            t0 = time.perf_counter()
            batch = [train_ex[order[step * G + i]] for i in range(G)]
            loss, lr, grad_norm = run.step(batch)
            tok_s = sum(len(e.ids) for e in batch) / (time.perf_counter() - t0)
            done = step + 1
            result.eval_loss = run.evaluate(eval_ex) if eval_ex and (done % eval_every == 0 or done == total) else None
            result.losses.append(loss)
            result.steps = done
            if rank == 0:
                with open(log_path, "a") as f:
                    f.write(json.dumps({"step": done, "loss": loss, "eval_loss": result.eval_loss, "lr": lr,
                                        "tokens_per_s": round(tok_s, 1), "grad_norm": grad_norm}) + "\n")
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tok_s:.0f}", refresh=False)
            bar.update(1)
            if on_step is not None:
                on_step(done)
            stop = torch.tensor([float(intr.requested)], device=device)
            if world > 1:  # every rank stops at the same step, or the collectives would hang
                torch.distributed.all_reduce(stop, op=torch.distributed.ReduceOp.MAX)
            if stop.item() or (cfg.save_every and done % cfg.save_every == 0 and done < total):
                d = save_checkpoint(run, done)
                if stop.item():
                    if rank == 0:
                        plot_losses(log_path, out / PLOT_NAME, warn)
                    warn(f"interrupted at step {done}: checkpoint saved in {d}; continue with --resume")
                    intr.stop()
    if rank == 0:
        save_adapter(out, run.layers, run.adapter_config)
        plot_losses(log_path, out / PLOT_NAME, warn)
        if cfg.gguf:
            from .adapter_gguf_write import gguf_from_peft
            from .gguf_write import check_output

            gguf_from_peft(out, cfg.base, check_output(cfg.gguf, cfg.force, [out, cfg.base]), cfg.gguf_outtype)
            result.gguf = Path(cfg.gguf)
    if world > 1:
        torch.distributed.barrier()
    return result
