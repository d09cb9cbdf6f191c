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
    saved_dims, saved_lora = dict(mbb.DIMS), dict(mbb.LORA)
    try:
        mbb.DIMS.clear()
        mbb.DIMS.update(DIMS)
        mbb.write_base(d / "base.gguf", seed=0)
        mbb.write_adapter(d / "lora", seed=0)
        mbb.LORA["r"] = 128
        mbb.write_adapter(d / "lora-r128", seed=1)
    finally:
        mbb.DIMS.clear()
        mbb.DIMS.update(saved_dims)
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


def test_sigterm_during_llama_cpp_quantization(big, tmp_path):
    """--quant q8_0: our merge goes to an intermediate file, then llama.cpp's quantizer (C code, where Python
    cannot run a signal handler) writes the temp output. Caught there, SIGTERM still cleans up both."""
    out = tmp_path / "merged.gguf"
    out.write_bytes(OLD)
    proc = start(["merge", "--base", big / "base.gguf", "--lora", big / "lora", "-o", out, "--quant", "q8_0",
                  "--force", "--threads", "1"])
    mid_gone = lambda tmp: tmp.stat().st_size > 0 and not tmp.name.endswith(".merged.part")  # noqa: E731
    rc, err = kill_mid_write(proc, out, signal.SIGTERM, ready=mid_gone)
    assert_intact(out, signal.SIGTERM, rc, err)
    assert "Exception ignored" not in err, err


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
    from lora2gguf.gguf_file import GGUFFile

    out = tmp_path / "adapter.gguf"
    out.write_bytes(OLD)
    assert main(["convert", str(big / "lora"), "--base", str(big / "base.gguf"), "-o", str(out), "--force"]) == 0
    with GGUFFile(out) as f:
        assert f.get("general.type") == "adapter" and len(f.tensors) == 2 * 7 * DIMS["n_layer"]
    assert temps(tmp_path, out) == []


def test_ctrl_c_in_train_leaves_a_resumable_checkpoint(tmp_path, capfd):
    """A real SIGINT (what Ctrl-C sends) to this process while `lora2gguf train` runs in it through the CLI
    entry point (in process: torch is imported once; tests/test_train.py does the same from outside),
    then `--resume` continues the same run from the checkpoint it left."""
    from lora2gguf.adapter import load_peft
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


def quantizer_child(parent: int, timeout: float = 120) -> int:
    """The pid of merge's llama.cpp quantizer process (a child running lora2gguf.quantize), once it runs."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
                cmd = (d / "cmdline").read_bytes()
            except (OSError, IndexError, ValueError):
                continue
            if ppid == parent and b"lora2gguf.quantize" in cmd:
                return int(d.name)
        time.sleep(0.005)
    raise AssertionError("no quantizer process appeared")


def stop_quantizer_mid_write(proc, out: Path) -> int:
    """Freeze merge's quantizer process (SIGSTOP: it will never finish) once its output has bytes."""
    child = quantizer_child(proc.pid)
    deadline = time.time() + 120
    while True:
        try:
            if any(t.stat().st_size > 0 for t in temps(out.parent, out) if not t.name.endswith(".merged.part")):
                break
        except FileNotFoundError:
            pass
        assert time.time() < deadline and alive(child), "the quantizer wrote nothing"
        time.sleep(0.001)
    os.kill(child, signal.SIGSTOP)
    return child


def alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_merge_while_the_quantizer_cannot_finish(big, tmp_path, sig):
    """The quantizer is frozen mid-write (it would never finish): SIGTERM / Ctrl-C still end the merge,
    the quantizer process is gone and no temp file is left. Holding signals until llama.cpp returned,
    as before, would hang here for good (on 8B: minutes of quantization)."""
    out = tmp_path / "merged.gguf"
    out.write_bytes(OLD)
    proc = start(["merge", "--base", big / "base.gguf", "--lora", big / "lora", "-o", out, "--quant", "q8_0",
                  "--force", "--threads", "1"])
    child = stop_quantizer_mid_write(proc, out)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == (128 + sig if sig == signal.SIGTERM else 130), (proc.returncode, err)
    assert "Traceback" not in err, err
    assert not alive(child), "the quantizer must not outlive the merge"
    assert out.read_bytes() == OLD and temps(tmp_path, out) == []


def test_sigkill_leaves_no_writer_and_the_next_run_cleans_up(big, tmp_path):
    """SIGKILL runs no clean-up: the quantizer dies with the merge (no hidden writer keeps filling a
    multi-GB .part), and the next run removes the dead run's temp files."""
    out = tmp_path / "merged.gguf"
    args = ["merge", "--base", big / "base.gguf", "--lora", big / "lora", "-o", out, "--quant", "q8_0", "--threads", "1"]
    proc = start(args)
    child = stop_quantizer_mid_write(proc, out)
    proc.kill()
    proc.communicate(timeout=60)
    deadline = time.time() + 30
    while alive(child) and time.time() < deadline:
        time.sleep(0.01)
    assert not alive(child), "the quantizer outlived a SIGKILLed merge"
    left = temps(tmp_path, out)
    assert left and not out.exists()
    done = start(args)
    _, err = done.communicate(timeout=300)
    assert done.returncode == 0, err
    assert out.is_file() and temps(tmp_path, out) == []
