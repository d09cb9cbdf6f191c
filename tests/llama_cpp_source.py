"""llama.cpp's own source, for the tests and benchmarks that run its converter or build its tools: the
vendor/llama.cpp tree of the llama-cpp-python sdist of the installed version, downloaded by pip once and
unpacked into the lora2gguf cache (never into the repository). LLAMA_CPP_DIR points at another tree."""

from __future__ import annotations

import os
import sys
import tarfile
import tempfile
from importlib.metadata import version
from pathlib import Path


def llama_cpp_source() -> Path | None:
    """The llama.cpp source tree, or None when it is not here and cannot be downloaded."""
    if os.environ.get("LLAMA_CPP_DIR"):
        return Path(os.environ["LLAMA_CPP_DIR"])
    from lora2gguf.errors import Lora2GGUFError
    from lora2gguf.weights.real_models import cache_dir, pip_download

    name = f"llama_cpp_python-{version('llama-cpp-python')}"
    tree = cache_dir() / name / "vendor" / "llama.cpp"
    if (tree / "convert_lora_to_gguf.py").is_file():
        return tree
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        try:
            sdist = pip_download(f"llama-cpp-python=={version('llama-cpp-python')}", Path(tmp) / "dl", "",
                                 "--no-binary", ":all:")
        except Lora2GGUFError:
            return None
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
        os.replace(Path(tmp) / name, cache_dir() / name)  # whole or not at all
    return tree


def llama_cpp_source_or_exit() -> Path:
    """For the benchmarks: the tree, or exit with one line."""
    return llama_cpp_source() or sys.exit("llama.cpp's source could not be had: the pip download of the "
                                          "llama-cpp-python sdist failed; set LLAMA_CPP_DIR to a llama.cpp tree")
