"""Killing merge and convert mid-write: nothing partial at the output path, a previous file there intact,
and on SIGTERM no temp file left either. Ctrl-C in train leaves a checkpoint that --resume continues.

To catch a write in the act without a multi-gigabyte model, the test freezes the process (SIGSTOP) as
soon as its temp output has bytes in it, checks that the final path still holds the old file, then
delivers the signal and lets it run (SIGCONT): deterministic, whatever the machine's load."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import FIXTURES, ROOT, fixture

sys.path.insert(0, str(ROOT / "scripts"))
import make_big_base as mbb  # noqa: E402

OLD = b"the previous output, which must survive\n"
DIMS = dict(n_layer=4, n_embd=512, n_ff=1408, n_head=8, n_head_kv=2, n_vocab=8000, n_ctx=512)  # 20 M params, 40 MB F16
ENV = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """A llama-shaped F16 base of modest size and a PEFT adapter for it (scripts/make_big_base.py at
    smaller dimensions), and a larger-rank adapter whose conversion takes long enough to catch."""
    d = tmp_path_factory.mktemp("big")
    dims = dict(mbb.SHAPES["big"], **DIMS)
    saved_lora = dict(mbb.LORA)
    try:
        mbb.write_base(d / "base.gguf", seed=0, d=dims)
        mbb.write_adapter(d / "lora", seed=0, d=dims)
        mbb.LORA["r"] = 128
        mbb.write_adapter(d / "lora-r128", seed=1, d=dims)
    finally:
        mbb.LORA.clear()
        mbb.LORA.update(saved_lora)
    return d


def temps(d: Path, out: Path) -> list[Path]:
    """Hidden temp files of an output (atomic_output's .<name>.*.part, merge's .merged.part)."""
    return [p for p in d.iterdir() if p.name.startswith(f".{out.name}.")]


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lora2gguf.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)


def freeze_mid_write(proc: subprocess.Popen, out: Path, ready=lambda tmp: tmp.stat().st_size > 0,
                     timeout: float = 120) -> Path:
    """Poll until a temp file of `out` satisfies `ready` (bytes written), then SIGSTOP the process."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"finished before it could be caught: {proc.communicate()}"
        for tmp in temps(out.parent, out):
            try:
                if tmp.name.endswith(".part") and ready(tmp):
                    proc.send_signal(signal.SIGSTOP)
                    return tmp
            except FileNotFoundError:
                pass
        time.sleep(0.001)
    proc.kill()
    raise AssertionError("no temp output appeared")


def kill_mid_write(proc, out: Path, sig: int, **kw) -> tuple[int, str]:
    tmp = freeze_mid_write(proc, out, **kw)
    # caught in the act: the temp file is there, the final path still holds the old file
    assert tmp.exists() and out.read_bytes() == OLD
    proc.send_signal(sig)
    proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def assert_intact(out: Path, sig: int, rc: int, err: str):
    assert out.read_bytes() == OLD, "the previous file at the output path was changed"
    assert "Traceback" not in err, err
    if sig == signal.SIGTERM:
        assert rc == 128 + signal.SIGTERM and "terminated by SIGTERM" in err, (rc, err)
        assert temps(out.parent, out) == [], "SIGTERM must clean up the temp files"
    else:
        assert rc == -signal.SIGKILL, (rc, err)  # nothing can clean up after SIGKILL: only the temp is left


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_kill_merge_mid_write(big, tmp_path, sig):
    out = tmp_path / "merged.gguf"
    out.write_bytes(OLD)
    proc = start(["merge", "--base", big / "base.gguf", "--lora", big / "lora", "-o", out, "--quant", "f16",
                  "--force", "--threads", "1"])
    rc, err = kill_mid_write(proc, out, sig)
    assert_intact(out, sig, rc, err)


def past_header(tmp: Path) -> bool:
    """The merge's output temp (not its few-KB type probe) holds tensor data: quantization is under way."""
    return not tmp.name.endswith(".types.part") and tmp.stat().st_size > (1 << 20)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_during_in_process_quantization(big, tmp_path, sig):
    """--quant q8_0: llama.cpp's quantizer runs inside the merge process (quantize_ggml: one chunk of rows per
    C call, on worker threads, the main thread waiting in Python). Caught mid-quantization, SIGTERM / Ctrl-C
    end the merge: exit 143 / 130, the previous output intact, no temp file (output or probe) left."""
    out = tmp_path / "merged.gguf"
    out.write_bytes(OLD)
    proc = start(["merge", "--base", big / "base.gguf", "--lora", big / "lora", "-o", out, "--quant", "q8_0",
                  "--force", "--threads", "1"])
    rc, err = kill_mid_write(proc, out, sig, ready=past_header)
    assert out.read_bytes() == OLD and "Traceback" not in err and "Exception ignored" not in err, err
    assert rc == (128 + sig if sig == signal.SIGTERM else 130), (rc, err)
    assert temps(out.parent, out) == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_kill_convert_mid_write(big, tmp_path, sig):
    out = tmp_path / "adapter.gguf"
    out.write_bytes(OLD)
    proc = start(["convert", big / "lora-r128", "--base", big / "base.gguf", "-o", out, "--outtype", "q8_0", "--force"])
    rc, err = kill_mid_write(proc, out, sig)
    assert_intact(out, sig, rc, err)


def test_completed_runs_replace_the_old_file(big, tmp_path):
    """The control for the kill tests: left alone, the same commands do replace the old file."""
    from lora2gguf.cli import main
    from lora2gguf.fileio.gguf_read import GGUFFile

    out = tmp_path / "adapter.gguf"
    out.write_bytes(OLD)
    assert main(["convert", str(big / "lora"), "--base", str(big / "base.gguf"), "-o", str(out), "--force"]) == 0
    with GGUFFile(out) as f:
        assert f.get("general.type") == "adapter" and len(f.tensors) == 2 * 7 * DIMS["n_layer"]
    assert temps(tmp_path, out) == []


def test_ctrl_c_in_train_leaves_a_resumable_checkpoint(tmp_path, capfd):
    """A real SIGINT (what Ctrl-C sends) to this process while `lora2gguf train` runs in it through the CLI
    entry point (in process: torch is imported once; tests/commands/test_train.py does the same from outside),
    then `--resume` continues the same run from the checkpoint it left."""
    from lora2gguf.adapters.peft import load_peft
    from lora2gguf.cli import main

    out, steps = tmp_path / "run", 30
    args = [str(a) for a in ["train", "--base", fixture("llama"), "--data", FIXTURES / "train" / "text.jsonl", "-o", out,
                             "--steps", steps, "--rank", "4", "--lr", "1e-2", "--dropout", "0", "--seq-len", "32",
                             "--batch-size", "2", "--device", "cpu"]]
    log = out / "train_log.jsonl"
    sent = threading.Event()

    def ctrl_c():  # once a step is done, like a user pressing Ctrl-C
        deadline = time.time() + 120
        while time.time() < deadline and not (log.is_file() and log.read_text().count("\n") >= 1):
            time.sleep(0.001)
        os.kill(os.getpid(), signal.SIGINT)
        sent.set()

    import torch

    stray = []  # a SIGINT outside training would reach this handler, not pytest's KeyboardInterrupt
    old, threads = signal.signal(signal.SIGINT, lambda s, f: stray.append(s)), torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is fastest, and 2 threads spin on a shared 2-core machine
    try:
        watcher = threading.Thread(target=ctrl_c, daemon=True)
        watcher.start()
        capfd.readouterr()
        rc = main(args)
        watcher.join(10)
        err = capfd.readouterr().err
        assert sent.is_set() and not stray, "the signal did not arrive during training"
        assert rc == 130 and "Traceback" not in err, err
        (ckpt,) = out.glob("checkpoint-*")
        step = int(ckpt.name.split("-")[1])
        assert 1 <= step < steps and f"checkpoint saved in {ckpt}" in err, err
        assert not (out / "adapter_model.safetensors").exists(), "an interrupted run has no final adapter"
        before = [json.loads(line) for line in log.read_text().splitlines()]
        assert [r["step"] for r in before] == list(range(1, step + 1))

        assert main(args + ["--resume"]) == 0
    finally:
        signal.signal(signal.SIGINT, old)
        torch.set_num_threads(threads)
    err = capfd.readouterr().err
    assert f"resuming from {ckpt} (step {step} of {steps})" in err, err
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, steps + 1)), "continued after the checkpoint, each step once"
    assert rows[:step] == before, "the steps before the interrupt are kept as they were"
    assert load_peft(out).config["r"] == 4


def test_sigkill_mid_quantization_and_the_next_run_cleans_up(big, tmp_path):
    """SIGKILL runs no clean-up: the partial temp output stays, nothing keeps writing it (the quantizer is
    the merge process itself, no child outlives it), and the next run removes the dead run's temp files."""
    out = tmp_path / "merged.gguf"
    args = ["merge", "--base", big / "base.gguf", "--lora", big / "lora", "-o", out, "--quant", "q8_0", "--threads", "1"]
    proc = start(args)
    freeze_mid_write(proc, out, ready=past_header)
    proc.kill()
    proc.communicate(timeout=60)
    left = {p: p.stat().st_size for p in temps(tmp_path, out)}
    time.sleep(1)
    assert left and not out.exists() and left == {p: p.stat().st_size for p in temps(tmp_path, out)}
    done = start(args)
    _, err = done.communicate(timeout=300)
    assert done.returncode == 0, err
    assert out.is_file() and temps(tmp_path, out) == []
