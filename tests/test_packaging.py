"""The package as a user installs it: a wheel built from this tree carries the demo's datasets, and
`lora2gguf demo` run from a fresh virtual environment (not this checkout) finds them and its model."""

import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT
from lora2gguf.weights.real_models import smollm2_gguf

DATASETS = ("json-train.jsonl", "pirate-train.jsonl", "eval-prompts.jsonl")


def build_wheel(into: Path) -> Path:
    """The wheel pip builds from a copy of this tree's package files (setuptools builds in the source tree:
    a copy keeps the checkout clean and no earlier build/ can leak into the wheel), without build isolation
    (the test venv has setuptools already)."""
    src = into / "src"
    shutil.copytree(ROOT / "lora2gguf", src / "lora2gguf", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                        "-w", str(into), str(src)], capture_output=True, text=True, cwd=into)
    assert r.returncode == 0, r.stderr
    (wheel,) = into.glob("lora2gguf-*.whl")
    return wheel


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    return build_wheel(tmp_path_factory.mktemp("wheel"))


def test_wheel_carries_the_demo_data(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    assert {f"lora2gguf/demo_data/{d}" for d in DATASETS} <= names
    assert "lora2gguf/commands/convert.py" in names and "lora2gguf/models/llama.py" in names
    assert not any(n.startswith(("tests/", "fixtures/", "scripts/")) for n in names)


@pytest.mark.slow
def test_demo_from_an_installed_wheel_finds_its_data_and_model(tmp_path, wheel):
    """A fresh venv with the wheel installed (pip, not editable); its dependencies are this venv's packages,
    reached by a path file, so nothing is downloaded. The demo runs from an empty directory until it has
    trained its first adapter on SmolLM2 (data and model found), then it is stopped."""
    smollm2_gguf()  # in the cache already, as for every slow test: the demo must find it there
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = Path(subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    # a path entry, not a site dir: this venv's own .pth files (its editable lora2gguf) are not read there
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # this venv's pip installs into the new one (--python): the new venv needs no pip of its own
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index",
                        "--quiet", str(wheel)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    run = tmp_path / "elsewhere"
    run.mkdir()
    where = subprocess.run([py, "-c", "import lora2gguf.demo as d; print(d.__file__); print(d.DEMO_DATA)"],
                           capture_output=True, text=True, cwd=run, check=True).stdout.split()
    assert all(Path(w).is_relative_to(site) for w in where), where  # the installed copy, not this checkout

    proc = subprocess.Popen([venv / "bin" / "lora2gguf", "demo", "--workdir", str(run / "out"), "--steps", "1"],
                            cwd=run, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, deadline = [], time.time() + 600
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("trained ") or time.time() > deadline:
                break
    finally:
        proc.kill()
        proc.wait()
    out = "".join(lines)
    assert "SmolLM2-135M-Instruct.Q4_1.gguf" in out and "trained json: loss" in out, out
    assert (run / "out" / "json-peft" / "adapter_model.safetensors").is_file()
