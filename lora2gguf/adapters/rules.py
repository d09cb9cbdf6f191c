"""The rules that connect a PEFT LoRA to llama.cpp's GGUF LoRA, each written once.

- llama.cpp scales a tensor pair by alpha_file / r (r: that pair's rank), and alpha 0 means scale 1;
- the token embedding's pair is stored flipped (llama.cpp gathers lora_a rows by token id);
- a LoRA on the embedding of a tied base would reach the output head in llama.cpp too;
- PEFT records the transformers class an adapter was made on.
The q/k row permutation is an architecture's rule: see models.
"""

from __future__ import annotations

import numpy as np

from lora2gguf import models
from lora2gguf.errors import Lora2GGUFError

MERGE_HINT = "`lora2gguf merge` applies it exactly into the base instead"


def llama_alpha(alpha_file: float, r: int) -> float:
    """The alpha llama.cpp applies to a rank-r tensor pair: the file's, or r when the file's alpha is 0
    (llama-adapter.cpp then scales by 1)."""
    return alpha_file if alpha_file else float(r)


def llama_scale(alpha_file: float, r: int) -> float:
    """What llama.cpp multiplies a rank-r tensor pair by at run time (user scale 1): alpha / r, or 1 when
    the file's alpha is 0."""
    return llama_alpha(alpha_file, r) / r


def to_gguf_pair(a: np.ndarray, b: np.ndarray, embedding: bool) -> tuple[np.ndarray, np.ndarray]:
    """(a (r, in), b (out, r)) with b @ a = ΔW/scale in the base weight's layout → (lora_a, lora_b) as
    llama.cpp stores them. The token embedding is flipped: build_inp_embd gathers lora_a by token id
    ((vocab, r) in numpy) and multiplies by lora_b ((dim, r))."""
    return (b, a.T) if embedding else (a, b)


def from_gguf_pair(lora_a: np.ndarray, lora_b: np.ndarray, embedding: bool) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of to_gguf_pair for PEFT's own tensors: (lora_A, lora_B) as PEFT stores them; for the
    embedding, lora_embedding_A (r, vocab) and lora_embedding_B (dim, r)."""
    return (lora_a.T, lora_b) if embedding else (lora_a, lora_b)


def check_tied_embedding(modules, spec, where, base_label: str) -> None:
    """With tied embeddings llama.cpp multiplies the output by token_embd.weight and applies any LoRA on
    that tensor there too, in the flipped embedding layout: its graph asserts and the process aborts.
    PEFT applies embedding LoRA to the lookup only, so no GGUF LoRA can express it on a tied base."""
    if "model.embed_tokens" in modules and spec.tied_embeddings:
        raise Lora2GGUFError(f"{where}: LoRA on embed_tokens, but {base_label} ties the output head to the token "
                             "embeddings, so llama.cpp would apply it to the output as well (and abort); "
                             f"{MERGE_HINT}")


def check_arch(adapter, spec, base_path) -> None:
    """PEFT records the transformers class it wrapped; refuse an adapter made for another known arch
    (shapes alone cannot tell a qwen2 adapter from a llama one of the same size)."""
    cls = (adapter.config.get("auto_mapping") or {}).get("base_model_class")
    other = next((a for a in models.all_archs() if cls in a.hf_architectures), None)
    if other is not None and other is not spec.arch_module:
        raise Lora2GGUFError(f"{adapter.path}: the adapter was made on a {cls} ({other.name}) but {base_path} is a "
                             f"{spec.arch} model; pass the base it was trained on")


def check_not_activated(adapter, verb: str) -> None:
    """An activated LoRA (aLoRA) changes only the tokens after its invocation sequence; a merged weight
    would change every token."""
    if adapter.config.get("alora_invocation_tokens"):
        raise Lora2GGUFError(f"{adapter.path}: an activated LoRA (aLoRA, alora_invocation_tokens) applies only after "
                             f"its invocation tokens, which {verb} cannot express; convert it to a GGUF LoRA and "
                             "serve it with llama-server, which activates it")
