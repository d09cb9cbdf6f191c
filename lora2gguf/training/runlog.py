"""What a run leaves in its output directory besides checkpoints: train_log.jsonl (one record per step), the
loss curve and train_data.json (which data it trained on: merge --imatrix-data measures on it by default);
a new run (--force) clears them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

LOG_NAME, PLOT_NAME, DATA_NAME = "train_log.jsonl", "loss.png", "train_data.json"


# What a run leaves in OUT besides its checkpoints: a new run (--force) removes them all, so that an
# interrupted new run cannot look finished with the previous run's final adapter.
RUN_FILES = (LOG_NAME, PLOT_NAME, DATA_NAME, "adapter_model.safetensors", "adapter_config.json")


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


def write_train_data(out: Path, data: str, sha256: str, seq_len: int, chat_template: str | None) -> None:
    """The data file (absolute), its sha256, and the chat template it was rendered with (a name or a Jinja
    file, as given; None: the base's own)."""
    if chat_template is not None and Path(chat_template).is_file():
        chat_template = str(Path(chat_template).resolve())
    (out / DATA_NAME).write_text(json.dumps({"data": str(Path(data).resolve()), "data_sha256": sha256,
                                             "seq_len": seq_len, "chat_template": chat_template}) + "\n")


def read_train_data(adapter_dir: Path) -> dict | None:
    """train_data.json of a training run's output directory, or None where there is none (an adapter made
    elsewhere, or a file)."""
    p = Path(adapter_dir) / DATA_NAME
    if not p.is_file():
        return None
    try:
        r = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    return r if isinstance(r, dict) and isinstance(r.get("data"), str) else None
