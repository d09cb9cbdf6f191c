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


def llama_quantize_tool() -> Path | None:
    """llama.cpp's `llama-quantize` program (llama_tool), for the tests: the same quantizer code the package runs,
    behind llama.cpp's own command line and importance-matrix loader. None without the source or a compiler."""
    return llama_tool("quantize")


# what each tool needs of common/ besides its own sources (--gc-sections drops the rest of common.cpp); None:
# all of common/ (argument parsing pulls in the chat, sampling and download code)
_COMMON = {"quantize": ("imatrix-loader.cpp", "log.cpp", "common.cpp", "json.cpp")}


def llama_tool(name: str) -> Path | None:
    """llama.cpp's `llama-<name>` program (quantize, imatrix, export-lora...), built from that tree's tools/<name>
    and linked against the libllama that llama-cpp-python ships, so both sides of a comparison run the same
    ggml. Built once into the cache with g++ (about 15 s for quantize, 2-3 minutes for a tool that needs all
    of common/); None without the source or a C++ compiler."""
    import shutil
    import subprocess
    from importlib.metadata import version

    import llama_cpp

    from lora2gguf.weights.real_models import cache_dir

    src = llama_cpp_source()
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if src is None or cxx is None:
        return None
    tool = cache_dir() / f"llama-tools-{version('llama-cpp-python')}" / f"llama-{name}"
    if tool.is_file():
        return tool
    tool.parent.mkdir(parents=True, exist_ok=True)
    lib = Path(llama_cpp.__file__).parent / "lib"
    info = (src / "common" / "build-info.cpp.in").read_text().replace("@LLAMA_BUILD_NUMBER@", "0")
    for key in ("@LLAMA_BUILD_COMMIT@", "@BUILD_COMPILER@", "@BUILD_TARGET@"):
        info = info.replace(key, "llama-cpp-python")
    common = src / "common"
    flags = ["-O2", "-std=c++17", "-ffunction-sections", "-fdata-sections",
             *(f"-I{src / d}" for d in ("include", "ggml/include", "common", "vendor", "vendor/cpp-httplib"))]
    libs = [f"-L{lib}", "-lllama", "-lggml", "-lggml-base", "-lggml-cpu", f"-Wl,-rpath,{lib}", "-lpthread"]
    with tempfile.TemporaryDirectory(dir=tool.parent) as tmp:
        (Path(tmp) / "build-info.cpp").write_text(info)
        if name in _COMMON:
            extra = [str(common / n) for n in _COMMON[name]]
        else:  # all of common/, compiled once into an archive that the next tool links too
            extra = [str(_common_archive(cxx, flags, src, tool.parent))]
        sources = [*map(str, (src / "tools" / name).glob("*.cpp")), str(Path(tmp) / "build-info.cpp")]
        cmd = [cxx, *flags, "-Wl,--gc-sections", *sources, *extra, *libs, "-o", str(Path(tmp) / tool.name)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"building {tool.name} failed:\n{r.stderr[-3000:]}")
        os.replace(Path(tmp) / tool.name, tool)
    return tool


def _common_archive(cxx: str, flags: list[str], src: Path, where: Path) -> Path:
    """llama.cpp's common/ (and the HTTP client its argument parser links), as one static archive."""
    import subprocess
    from concurrent.futures import ThreadPoolExecutor

    archive = where / "libcommon.a"
    if archive.is_file():
        return archive
    common = src / "common"
    files = [p for p in (*common.glob("*.cpp"), *common.glob("jinja/*.cpp"), *common.glob("parsers/*.cpp"),
                         *(src / "vendor" / "cpp-httplib").glob("*.cpp")) if p.name != "llguidance.cpp"]
    with tempfile.TemporaryDirectory(dir=where) as tmp:
        objs = [Path(tmp) / f"{i}-{p.stem}.o" for i, p in enumerate(files)]

        def compile_one(pair):
            r = subprocess.run([cxx, *flags, "-c", str(pair[0]), "-o", str(pair[1])], capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"compiling {pair[0]} failed:\n{r.stderr[-3000:]}")

        with ThreadPoolExecutor(os.cpu_count() or 2) as ex:
            list(ex.map(compile_one, zip(files, objs)))
        subprocess.run(["ar", "rcs", str(Path(tmp) / archive.name), *map(str, objs)], check=True)
        os.replace(Path(tmp) / archive.name, archive)
    return archive
