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

import torch
from safetensors.torch import load_file

from lora2gguf.errors import Lora2GGUFError, Terminated
from lora2gguf.fileio.atomic import atomic_output

STATE_NAME = "trainer_state.pt"
# Changing any of these between a checkpoint and --resume would silently train another run.
RESUME_KEYS = ("rank", "alpha", "rslora", "dropout", "targets", "batch_size", "grad_accum", "seq_len", "seed",
               "lr", "warmup", "weight_decay", "max_grad_norm")

INPUTS = {"base_fingerprint": "another base model", "train_tokens": "other training data or tokenizer",
          "eval_tokens": "other eval data or tokenizer", "data_sha256": "another training data file"}


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


def write_state(d: Path, state: dict) -> None:
    """trainer_state.pt, written last into a checkpoint directory: a checkpoint that has it is complete."""
    with atomic_output(d / STATE_NAME) as tmp:
        torch.save(state, tmp)


def read_checkpoint(ck: Path, device: torch.device) -> tuple[dict, dict[str, torch.Tensor]]:
    """(trainer state, LoRA tensors by PEFT key) of a checkpoint; an unreadable one is one clear error."""
    try:
        state = torch.load(ck / STATE_NAME, map_location="cpu", weights_only=True)
        if not isinstance(state.get("args"), dict):  # a foreign file: no settings to compare
            raise KeyError("args")
        lora = load_file(ck / "adapter_model.safetensors", device=str(device))
    except Exception as e:  # truncated or foreign files: torch, pickle and safetensors raise many kinds
        raise Lora2GGUFError(f"{ck}: unreadable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                             "delete this checkpoint directory to resume from an earlier one, or start over "
                             "with --force") from None
    return state, lora


def check_resumable(ck: Path, saved_args: dict, args: dict) -> None:
    """The run resumed must be the run saved: same settings and inputs (RESUME_KEYS, INPUTS)."""
    changed = [k for k in args if saved_args.get(k) != args[k]]
    if changed:
        what = ", ".join(f"{k} ({INPUTS[k]})" if k in INPUTS else k for k in changed)
        raise Lora2GGUFError(f"{ck}: this run differs from the checkpoint's in {what}; resume with the same "
                             "base, tokenizer, data and settings, or start over with --force")


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
