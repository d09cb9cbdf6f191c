"""Any adapter input a verb accepts → one in-memory adapter.PeftAdapter (HF module names and layout, each
module with the scale its own runtime applies): the one entry point merge, verify and the adapter verbs
share, so that a new input format is added here once."""

from __future__ import annotations

import os
from pathlib import Path

from .adapter import PeftAdapter, load_peft
from .errors import Lora2GGUFError


def load_adapter(path: str | os.PathLike, spec=None) -> PeftAdapter:
    """A PEFT directory or a GGUF LoRA file. `spec` (base.ModelSpec) is needed for a GGUF LoRA of an arch
    whose q/k rows llama.cpp stores permuted; shapes are not checked here (PeftAdapter.check_base)."""
    p = Path(path)
    if p.is_dir():
        a = load_peft(p)
        # PEFT resets fan_in_fan_out to False on nn.Linear (it warns), and every LoRA target of the archs we
        # support is an nn.Linear or the embedding: the flag changes nothing in PEFT's forward, so neither here.
        for m in a.modules.values():
            m.fan_in_fan_out = False
        return a
    if not p.is_file():
        raise Lora2GGUFError(f"{p}: no such file or directory; expected a PEFT adapter directory or a GGUF LoRA file")
    from .adapter_gguf import load_gguf_lora

    return load_gguf_lora(p, spec)
