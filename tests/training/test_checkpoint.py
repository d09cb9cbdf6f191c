"""Checkpoints: Ctrl-C (a real SIGINT too) saves one, a crash leaves the periodic ones, and --resume
continues the same run bit for bit; a resume with other settings is refused."""

import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch

from conftest import ROOT
from lora2gguf.adapters.peft import load_peft
from lora2gguf.errors import Lora2GGUFError
from lora2gguf.commands.train import train
from test_train import assert_same_adapter, cfg, cli_args, log_rows, one_thread  # noqa: F401 (autouse fixture)


def interrupt_at(step):
    def hook(done):
        if done == step:
            signal.raise_signal(signal.SIGINT)  # what Ctrl-C delivers
    return hook


def test_ctrl_c_then_resume_equals_uninterrupted_run(tmp_path):
    """Dropout on (RNG state matters), grad accumulation, warmup + cosine: bitwise equal on CPU."""
    kw = dict(steps=8, batch_size=2, grad_accum=2, dropout=0.1, warmup=2)
    train(cfg(tmp_path / "full", **kw))
    with pytest.raises(KeyboardInterrupt):
        train(cfg(tmp_path / "cut", **kw), on_step=interrupt_at(3))
    assert (tmp_path / "cut" / "checkpoint-3" / "trainer_state.pt").is_file()
    assert not (tmp_path / "cut" / "adapter_model.safetensors").exists(), "no final adapter from a cut run"
    res = train(cfg(tmp_path / "cut", resume=True, **kw))
    assert res.steps == 8 and len(res.losses) == 5
    assert_same_adapter(tmp_path / "full", tmp_path / "cut")
    assert [r["loss"] for r in log_rows(tmp_path / "cut")] == [r["loss"] for r in log_rows(tmp_path / "full")]


def test_crash_resumes_from_latest_periodic_checkpoint(tmp_path):
    kw = dict(steps=7, batch_size=2, dropout=0.1)
    train(cfg(tmp_path / "full", **kw))

    def crash(done):
        if done == 5:
            raise RuntimeError("power cut")
    with pytest.raises(RuntimeError):
        train(cfg(tmp_path / "cut", save_every=2, **kw), on_step=crash)
    assert sorted(p.name for p in (tmp_path / "cut").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    train(cfg(tmp_path / "cut", save_every=2, resume=True, **kw))
    assert_same_adapter(tmp_path / "full", tmp_path / "cut")
    assert [r["step"] for r in log_rows(tmp_path / "cut")] == list(range(1, 8)), "log lines past step 4 replaced"
    with pytest.raises(Lora2GGUFError, match="differs from the checkpoint's in lr"):
        train(cfg(tmp_path / "cut", save_every=2, resume=True, **(kw | {"lr": 1e-3})))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_real_signal_to_the_cli_saves_a_checkpoint(tmp_path, sig):
    """Ctrl-C, and SIGTERM as a job scheduler sends before it kills: the step ends, a checkpoint is saved."""
    out = tmp_path / "out"
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "lora2gguf.cli", *cli_args(out, "--steps", "100000")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (out / "train_log.jsonl").is_file() and len((out / "train_log.jsonl").read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    assert sig == signal.SIGINT or "terminated by SIGTERM" in err, err
    (ckpt,) = out.glob("checkpoint-*")
    step = int(ckpt.name.split("-")[1])
    assert f"checkpoint saved in {ckpt}" in err and "Traceback" not in err
    assert step == len(log_rows(out)) >= 2
    assert load_peft(ckpt).config["r"] == 8, "a checkpoint is a usable adapter directory too"
    assert torch.load(ckpt / "trainer_state.pt", weights_only=True)["step"] == step


def test_force_with_bad_data_keeps_the_previous_run(tmp_path):
    """--force starts over only once the new inputs are known good: a bad data line loses nothing."""
    with pytest.raises(KeyboardInterrupt):
        train(cfg(tmp_path / "run", steps=6, batch_size=2), on_step=interrupt_at(2))
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "run").rglob("*"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "the cat"}\n{"text": \n')
    with pytest.raises(Lora2GGUFError, match="bad.jsonl:2"):
        train(replace(cfg(tmp_path / "run", steps=6, batch_size=2, force=True), data=str(bad)))
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "run").rglob("*")) == before
    train(cfg(tmp_path / "run", steps=6, batch_size=2, force=True))
    assert not list((tmp_path / "run").glob("checkpoint-*")), "with good data, --force starts over"


def test_truncated_checkpoint_is_a_one_line_refusal(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        train(cfg(tmp_path / "cut", steps=6, batch_size=2), on_step=interrupt_at(2))
    state = tmp_path / "cut" / "checkpoint-2" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(Lora2GGUFError, match="checkpoint-2: unreadable checkpoint"):
        train(cfg(tmp_path / "cut", steps=6, batch_size=2, resume=True))


def test_force_removes_the_previous_final_adapter(tmp_path):
    """A finished run, then --force interrupted before its end: no final adapter may remain to make the
    new run look finished."""
    run = tmp_path / "run"
    train(cfg(run, steps=3, batch_size=2))
    assert (run / "adapter_model.safetensors").is_file() and (run / "adapter_config.json").is_file()
    with pytest.raises(KeyboardInterrupt):
        train(cfg(run, steps=6, batch_size=2, force=True), on_step=interrupt_at(2))
    assert not (run / "adapter_model.safetensors").exists() and not (run / "adapter_config.json").exists()
    assert [p.name for p in run.glob("checkpoint-*")] == ["checkpoint-2"]


def test_resume_refuses_another_base_of_the_same_shapes_and_other_eval_data(tmp_path):
    from conftest import FIXTURES, fixture
    from test_gguf_lora import shuffled_base

    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(cfg(run, steps=6, batch_size=2), on_step=interrupt_at(2))
    other = shuffled_base(fixture("llama"), tmp_path / "other.gguf")  # same names and shapes, other weights
    with pytest.raises(Lora2GGUFError, match="base_fingerprint \\(another base model\\)"):
        train(replace(cfg(run, steps=6, batch_size=2, resume=True), base=str(other)))
    with pytest.raises(Lora2GGUFError, match="eval_tokens"):
        train(replace(cfg(run, steps=6, batch_size=2, resume=True), eval_data=str(FIXTURES / "train" / "text.jsonl")))
    train(cfg(run, steps=6, batch_size=2, resume=True))  # the same inputs resume
    assert [r["step"] for r in log_rows(run)] == list(range(1, 7))


def test_resume_after_a_half_written_log_line(tmp_path):
    """A crash mid-write leaves a cut last line in train_log.jsonl: --resume drops it (was a traceback)."""
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(cfg(run, steps=6, batch_size=2), on_step=interrupt_at(3))
    log = run / "train_log.jsonl"
    log.write_text(log.read_text() + '{"step": 4, "loss": 1.2')
    train(cfg(run, steps=6, batch_size=2, resume=True))
    assert [r["step"] for r in log_rows(run)] == list(range(1, 7))
