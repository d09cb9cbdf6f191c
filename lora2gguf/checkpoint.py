"""Checkpoints of a training run: OUT/checkpoint-<step> holds the adapter (a usable PEFT directory) and
trainer_state.pt (optimizer, schedule, loss scaler, every rank's RNG, the settings it was trained with),
so that --resume continues the same run bit for bit on the same machine. Ctrl-C (or SIGTERM, SIGHUP)
finishes the current step and saves one (Interrupt)."""

from __future__ import annotations

import random
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .errors import Lora2GGUFError, Terminated
from .training_model import load_lora_state, save_adapter

if TYPE_CHECKING:
    from .train import Run

STATE_NAME = "trainer_state.pt"
# Changing any of these between a checkpoint and --resume would silently train another run.
RESUME_KEYS = ("rank", "alpha", "rslora", "dropout", "targets", "batch_size", "grad_accum", "seq_len", "seed",
               "lr", "warmup", "weight_decay", "max_grad_norm")


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    if s.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def latest_checkpoint(out: Path) -> Path | None:
    ckpts = [p for p in out.glob("checkpoint-*") if (p / STATE_NAME).is_file() and p.name[11:].isdigit()]
    return max(ckpts, key=lambda p: int(p.name[11:]), default=None)


def save_checkpoint(run: Run, step: int) -> Path:
    """OUT/checkpoint-<step>: the adapter (usable as is) and the trainer state (every rank's RNG)."""
    rngs = [rng_state()]
    if run.world > 1:
        rngs = [None] * run.world
        torch.distributed.all_gather_object(rngs, rng_state())
    d = run.out / f"checkpoint-{step}"
    if run.rank == 0:
        from .gguf_write import atomic_output

        save_adapter(d, run.layers, run.adapter_config)
        with atomic_output(d / STATE_NAME) as tmp:  # written last: a checkpoint with it is complete
            torch.save({"step": step, "optimizer": run.opt.state_dict(), "scheduler": run.sched.state_dict(),
                        "scaler": run.scaler.state_dict(), "rng": rngs, "args": run.args,
                        "data_position": step * run.cfg.batch_size * run.cfg.grad_accum}, tmp)
    return d


def load_checkpoint(run: Run, ck: Path) -> int:
    """Restore a checkpoint's LoRA weights, optimizer, schedule and RNG → the step to continue from."""
    from safetensors.torch import load_file

    try:
        state = torch.load(ck / STATE_NAME, map_location="cpu", weights_only=True)
        changed = [k for k in run.args if state["args"].get(k) != run.args[k]]
        lora = load_file(ck / "adapter_model.safetensors", device=str(run.device))
    except Exception as e:  # truncated or foreign files: torch, pickle and safetensors raise many kinds
        raise Lora2GGUFError(f"{ck}: unreadable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                             "delete this checkpoint directory to resume from an earlier one, or start over "
                             "with --force") from None
    if changed:
        raise Lora2GGUFError(f"{ck}: this run differs from the checkpoint's in {', '.join(changed)}; resume "
                             "with the same settings and data, or start over with --force")
    load_lora_state(run.layers, lora)
    run.opt.load_state_dict(state["optimizer"])
    run.sched.load_state_dict(state["scheduler"])
    run.scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"][run.rank])
    return state["step"]


class Interrupt:
    """First Ctrl-C, SIGTERM or SIGHUP (kill, a job scheduler's preemption, a closed terminal): finish the
    step, save a checkpoint, stop. A second one stops at once. `stop()` raises what the signal means:
    KeyboardInterrupt for Ctrl-C, Terminated (exit 128 + signal in the CLI) for the others."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self):
        self.signum: int | None = None
        self._old: dict = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, frame):
        if self.requested:
            self.stop()
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step (again to stop now)",
              file=sys.stderr)

    def stop(self):
        raise KeyboardInterrupt if self.signum == signal.SIGINT else Terminated(self.signum)

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
