"""The training loop. One optimizer step consumes a global batch of batch_size × grad_accum sequences, drawn
from a seeded permutation of the data per epoch; the loss is the mean over the global batch's trained
tokens, so the same run under grad accumulation or torchrun (each rank a shard of every micro-batch)
computes the same update. Only LoRA A/B train (AdamW, warmup + cosine, clipping); the base is frozen. Ctrl-C
finishes the current step, saves OUT/checkpoint-<step> and exits; --resume continues from the latest
checkpoint (Run owns its checkpoint: what it saves and restores is its own state)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from lora2gguf.adapters.peft import lora_config, write_peft_files
from lora2gguf.errors import Lora2GGUFError
from lora2gguf.llamacpp.tokenizer import open_tokenizer
from lora2gguf.training.checkpoint import (
    RESUME_KEYS,
    Interrupt,
    check_resumable,
    latest_checkpoint,
    read_checkpoint,
    rng_state,
    set_rng_state,
    write_state,
)
from lora2gguf.training.config import TrainConfig, TrainResult
from lora2gguf.training.data import Order, collate, load_dataset
from lora2gguf.training.fused import fuse_for_training
from lora2gguf.training.lora import (
    EXPERTS,
    inject_lora,
    load_lora_state,
    lora_parameters,
    parse_layers,
    resolve_targets,
    to_adapter,
)
from lora2gguf.training.loss import LossModel
from lora2gguf.training.runlog import LOG_NAME, PLOT_NAME, clear_previous_run, plot_losses, read_log, write_train_data
from lora2gguf.weights.base_model import open_base
from lora2gguf.weights.fingerprint import fingerprint
from lora2gguf.weights.frozen import choose_base_weights, load_base_model

FUSED_ADAMW = ("cpu", "cuda")  # devices where torch has the fused AdamW kernel


def lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:  # linear warmup from 0, then cosine to 0 (transformers' cosine schedule)
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    return f


def tokens_digest(examples) -> str:
    """sha256 of the tokenized examples: changes with the data, the tokenizer or the sequence length."""
    h = hashlib.sha256()
    for e in examples:
        for seq in (e.ids, e.labels):
            a = np.asarray(seq, np.int64)
            h.update(len(a).to_bytes(8, "little") + a.tobytes())
    return h.hexdigest()


def file_sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


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

    def save_checkpoint(self, step: int) -> Path:
        """OUT/checkpoint-<step>: the adapter (usable as is) and the trainer state (every rank's RNG)."""
        rngs = [rng_state()]
        if self.world > 1:
            rngs = [None] * self.world
            torch.distributed.all_gather_object(rngs, rng_state())
        d = self.out / f"checkpoint-{step}"
        if self.rank == 0:
            self.save_adapter(d)
            write_state(d, {"step": step, "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                            "scaler": self.scaler.state_dict(), "rng": rngs, "args": self.args,
                            "data_position": step * self.cfg.batch_size * self.cfg.grad_accum})
        return d

    def load_checkpoint(self, ck: Path) -> int:
        """Restore a checkpoint's LoRA weights, optimizer, schedule and RNG → the step to continue from."""
        state, lora = read_checkpoint(ck, self.device)
        check_resumable(ck, state["args"], self.args)
        load_lora_state(self.layers, lora)
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"][self.rank])
        return state["step"]

    def save_adapter(self, d: Path) -> Path:
        """The adapter as a PEFT directory in `d` (created if needed; each file written whole)."""
        d.mkdir(parents=True, exist_ok=True)
        return write_peft_files(d, to_adapter(self.layers, d, self.adapter_config), self.adapter_config)

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
    with open_base(cfg.base) as base:  # an unsupported base is refused before llama.cpp reads its vocabulary
        base.spec.arch_module.require("train", base.path)
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
        targets = resolve_targets(cfg.targets, base.spec.arch_module)
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
    dropout = cfg.dropout
    if EXPERTS in targets and dropout:  # PEFT refuses to load target_parameters LoRA with lora_dropout > 0
        warn(f"--dropout {dropout} ignored: PEFT's expert LoRA (target_parameters) takes no dropout, so this run "
             "trains without it")
        dropout = 0.0
    layers = inject_lora(model, targets, cfg.rank, cfg.alpha, cfg.rslora, dropout, layer_ids)
    fuse_for_training(model)  # the same model and math, computed in fewer and larger steps
    model.grad_checkpointing = cfg.grad_checkpointing
    model.train()
    params = lora_parameters(layers)
    trainable = {id(p) for p in params}
    assert all(not p.requires_grad for p in model.parameters() if id(p) not in trainable), "base must be frozen"
    net: nn.Module = LossModel(model)
    if world > 1:
        # every rank loaded the same base: only LoRA weights need syncing (and mapped weights are read-only)
        frozen = [n for n, p in net.named_parameters() if not p.requires_grad]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(net, frozen)
        net = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None,
                                      broadcast_buffers=False)
    total = cfg.steps or max(1, math.ceil((cfg.epochs or 1.0) * len(train_ex) / (cfg.batch_size * cfg.grad_accum)))
    warmup = cfg.warmup if cfg.warmup is not None else int(0.03 * total)
    # LoRA A/B only. torch's fused AdamW (one kernel over every tensor) is the same update: on SmolLM2's 420
    # LoRA tensors a step takes 4 ms on the CPU, against 22 ms for the default loop (BENCHMARKS.md)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=device.type in FUSED_ADAMW)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(warmup, total))
    scaler = torch.amp.GradScaler(device.type, enabled=cdtype == torch.float16)  # fp16 needs loss scaling
    args = {k: getattr(cfg, k) for k in RESUME_KEYS} | {
        "targets": targets, "layers": layer_ids, "warmup": warmup,
        "total_steps": total, "data_sha256": file_sha256(cfg.data),
        # another base of the same shapes, another tokenizer or other eval data would resume silently
        "base_fingerprint": base_digest, "train_tokens": tokens_digest(train_ex), "eval_tokens": tokens_digest(eval_ex)}
    experts = sorted(model.spec.arch_module.expert_params) if EXPERTS in targets else None
    if experts and layer_ids is not None:  # peft 0.21 applies layers_to_transform to target_modules only
        experts = [f"model.layers.{i}.{p}" for i in layer_ids for p in experts]
    config = lora_config(cfg.rank, cfg.alpha, [t for t in targets if t != EXPERTS], base_name, use_rslora=cfg.rslora,
                         dropout=dropout, layers_to_transform=layer_ids, target_parameters=experts)
    run = Run(cfg, out, device, cdtype, rank, world, tok.pad_id, model, net, layers, opt, sched, scaler, args, config)
    return run, train_ex, eval_ex


def run_training(cfg, on_step, out, device, cdtype, rank, world, warn) -> TrainResult:
    """Set the run up, resume it if asked, step it to the end (or to an interrupt), save the adapter."""
    run, train_ex, eval_ex = setup(cfg, out, device, cdtype, rank, world, warn)
    total, G = run.args["total_steps"], cfg.batch_size * cfg.grad_accum
    eval_every = cfg.eval_every or max(1, total // 10)
    start = 0
    if cfg.resume:
        ck = latest_checkpoint(out)
        start = run.load_checkpoint(ck)
        warn(f"resuming from {ck} (step {start} of {total})")
    log_path = out / LOG_NAME
    if rank == 0:  # drop log lines past the checkpoint we resume from
        old = read_log(log_path) if cfg.resume else []
        log_path.write_text("".join(json.dumps(r) + "\n" for r in old if r["step"] <= start))
        write_train_data(out, cfg.data, run.args["data_sha256"], cfg.seq_len, cfg.chat_template)
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
                d = run.save_checkpoint(done)
                if stop.item():
                    if rank == 0:
                        plot_losses(log_path, out / PLOT_NAME, warn)
                    warn(f"interrupted at step {done}: checkpoint saved in {d}; continue with --resume")
                    intr.stop()
    if rank == 0:
        run.save_adapter(out)
        plot_losses(log_path, out / PLOT_NAME, warn)
    if world > 1:
        torch.distributed.barrier()
    return result
