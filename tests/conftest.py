"""Shared test helpers: fixture paths, token sequences, llama.cpp logits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
ARCHS = ("llama", "qwen2", "qwen3", "gemma3", "gemma2", "phi3")
MOE_ARCHS = ("qwen3moe", "mixtral", "qwen2moe")  # tested on their own (tests/models/test_moe.py); not every verb takes them yet

TEXT = ("the cat sat on the mat and the dog sat with the cat . hello world , one two three red green "
        "blue . the big tree and the small fish in the sun with the moon and a star . a happy bird was "
        "at the tree by the blue sea . the dog is big and the cat is small .")


def fixture(arch: str, kind: str = "f32") -> Path:
    return FIXTURES / arch / ("hf" if kind == "hf" else f"base-{kind}.gguf")


def token_ids(n_vocab: int, n: int = 96, seed: int = 0) -> list[int]:
    """A deterministic token sequence: BOS then random non-control ids."""
    rng = np.random.default_rng(seed)
    return [1] + rng.integers(3, n_vocab, size=n - 1).tolist()


def merge_input_file(src, dst, replace: dict) -> Path:
    """The model a merge hands llama.cpp's quantizer, as a file, written with gguf-py: src's tensors as stored
    except those in `replace` (GGUF name -> float32 array), F32; src's key-values with file type ALL_F32."""
    from gguf import GGMLQuantizationType as T

    from lora2gguf.fileio.gguf_read import GGUFFile
    from lora2gguf.fileio.gguf_write import f32_copy_writer

    with GGUFFile(src) as f:
        w = f32_copy_writer(f)
        for t in f.tensors.values():
            if t.name in replace:
                w.add_tensor(t.name, np.ascontiguousarray(replace[t.name], np.float32))
            elif t.type in (T.F32, T.F16):
                w.add_tensor(t.name, f.raw(t.name).view(np.float32 if t.type == T.F32 else np.float16).reshape(t.shape))
            else:  # gguf-py takes quantized data as bytes, one row of blocks per row
                w.add_tensor(t.name, f.raw(t.name).reshape(*t.shape[:-1], -1), raw_dtype=t.type)
        w.write_header_to_file(Path(dst))
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return Path(dst)


def reference_logits(model, tokens) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([list(tokens)]))[0].numpy()


@pytest.fixture(scope="module", params=MOE_ARCHS)
def moe_arch(request) -> str:
    """Each mixture-of-experts fixture in turn (tests/moe_helpers.py runs them routing-aware)."""
    return request.param


@pytest.fixture(scope="session")
def llama_quantize_bin() -> Path:
    """llama.cpp's own `llama-quantize` program, built once from its source (tests/llama_cpp_source.py)."""
    from llama_cpp_source import llama_quantize_tool

    t = llama_quantize_tool()
    if t is None:
        pytest.skip("llama.cpp's source or a C++ compiler is not here: llama-quantize cannot be built")
    return t


@pytest.fixture(scope="session")
def smollm2_f32() -> Path:
    from lora2gguf.weights.real_models import smollm2_f32_gguf

    return smollm2_f32_gguf()


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_f32) -> Path:
    """SmolLM2 as a transformers directory (same weights as the F32 GGUF copy), cached beside it."""
    from peft_helpers import hf_dir_from_base

    return hf_dir_from_base(smollm2_f32, smollm2_f32.parent / "SmolLM2-135M-Instruct-hf")


@pytest.fixture(scope="session")
def gemma3_q4() -> Path:
    from lora2gguf.weights.real_models import gemma3_gguf

    return gemma3_gguf()


@pytest.fixture(scope="session")
def gemma3_f32(gemma3_q4) -> Path:
    from lora2gguf.weights.real_models import gemma3_f32_gguf

    return gemma3_f32_gguf()
