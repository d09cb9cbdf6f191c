"""Any adapter input a verb accepts → one in-memory adapters.lora.PeftAdapter (HF module names and layout, each
module with the scale its own runtime applies): the one entry point every verb shares, so that a new input
format is added here once. The format is told by the files, never by a flag:

    adapter_model.safetensors / .bin  PEFT (also Unsloth, axolotl, torchtune's PEFT export, multimodal text towers)
    adapter_model.pt                  torchtune (adapters.torchtune)
    adapters.safetensors              mlx-lm (adapters.mlx)
    a file                            GGUF LoRA (adapters.gguf_lora)

load_for_base is the one loader that checks an adapter against a base (the arch PEFT recorded, the shapes,
and the base fingerprint a GGUF LoRA we converted carries): every verb that takes an adapter and a base.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

from lora2gguf.adapters.gguf_lora import base_match, load_gguf_lora
from lora2gguf.adapters.lora import PeftAdapter
from lora2gguf.adapters.mlx import is_mlx_dir, load_mlx
from lora2gguf.adapters.peft import load_peft
from lora2gguf.adapters.rules import check_arch
from lora2gguf.adapters.torchtune import is_torchtune_dir, load_torchtune
from lora2gguf.errors import Lora2GGUFError


def adapter_format(path: Path) -> str:
    """peft, torchtune, mlx-lm or gguf; an error naming what was looked for otherwise."""
    if path.is_file():
        return "gguf"
    if not path.is_dir():
        raise Lora2GGUFError(f"{path}: no such file or directory; expected an adapter directory or a GGUF LoRA file")
    if (path / "adapter_model.safetensors").is_file() or (path / "adapter_model.bin").is_file():
        return "peft"  # torchtune's HF checkpointer writes its PEFT export (HF row order) beside the .pt: use it
    if is_torchtune_dir(path):
        return "torchtune"
    if is_mlx_dir(path):
        return "mlx-lm"
    if (path / "adapter_config.json").is_file():
        return "peft"  # load_peft names the missing weights file
    raise Lora2GGUFError(f"{path}: not an adapter directory: no adapter_model.safetensors / .bin (PEFT), "
                         "adapter_model.pt (torchtune) or adapters.safetensors (mlx-lm)")


def adapter_files(path: Path) -> list[Path]:
    """The files that make up the adapter (for a fingerprint of its content): config first."""
    fmt = adapter_format(path)
    if fmt == "gguf":
        return [path]
    weights = {"peft": ("adapter_model.safetensors", "adapter_model.bin"), "torchtune": ("adapter_model.pt",),
               "mlx-lm": ("adapters.safetensors",)}[fmt]
    return [path / "adapter_config.json"] + [f for f in (path / w for w in weights) if f.is_file()][:1]


def load_adapter(path: str | os.PathLike, spec=None) -> PeftAdapter:
    """Any adapter, in HF layout. `spec` (base.ModelSpec) is needed where the file stores q/k rows in
    llama.cpp's permuted order (a GGUF LoRA, a torchtune .pt) for an arch that permutes them; without it
    (inspect) those rows stay as stored. Shapes are not checked here (PeftAdapter.check_base)."""
    p = Path(path)
    fmt = adapter_format(p)
    if fmt == "gguf":
        return load_gguf_lora(p, spec)
    if fmt == "torchtune":
        return load_torchtune(p, spec)
    if fmt == "mlx-lm":
        return load_mlx(p)
    a = load_peft(p)
    # PEFT resets fan_in_fan_out to False on nn.Linear (it warns), and every LoRA target of the archs we
    # support is an nn.Linear or the embedding: the flag changes nothing in PEFT's forward, so neither here.
    for m in a.modules.values():
        m.fan_in_fan_out = False
    return a


def say_notes(adapter: PeftAdapter) -> None:
    """The adapter's one-line notes (a 4-bit training base, skipped vision modules) on stderr."""
    for note in adapter.notes:
        print(f"note: {note}", file=sys.stderr)


def describe_adapter(path: Path) -> dict:
    """What inspect prints for an adapter directory of any format."""
    fmt = adapter_format(path)
    a = load_adapter(path)
    cfg = a.config
    return {
        "path": str(path), "kind": f"{fmt}-adapter", "format": fmt, "base_model": cfg.get("base_model_name_or_path"),
        "r": cfg["r"], "lora_alpha": cfg["lora_alpha"], "ranks": sorted({m.r for m in a.modules.values()}),
        "scales": sorted({round(m.scale, 6) for m in a.modules.values()}),
        "use_rslora": bool(cfg.get("use_rslora")), "use_dora": a.use_dora,
        "target_modules": sorted({m.split(".")[-1] for m in a.modules}),
        "modules": len(a.modules), "full_weights": sorted(a.full_weights),
        **({"alora_invocation_tokens": cfg["alora_invocation_tokens"]} if cfg.get("alora_invocation_tokens") else {}),
        **({"notes": a.notes} if a.notes else {}),
    }


def check_made_for(path: Path, base) -> None:
    """A GGUF LoRA that lora2gguf converted records its base's fingerprint: refuse one converted for another
    base (same shapes, other weights: whatever is computed from it would be silently wrong)."""
    match, verdict = base_match(path, base)
    if match is False:
        raise Lora2GGUFError(f"{path}: was converted for another base than {base.path} ({verdict}); pass the base "
                             "it was made for")


def load_for_base(path: str | os.PathLike, base=None, any_qk_order: bool = False) -> PeftAdapter:
    """Any adapter input, checked against the open base when one is given: the one loader every verb that
    takes an adapter and a base uses. Checks the arch (PEFT's recorded class), the shapes (a tied head is
    the writer's question, not the loader's) and, for a GGUF LoRA we wrote, the base fingerprint. Without a
    base, a GGUF LoRA of a llama-family arch keeps llama.cpp's q/k row order only when any_qk_order allows it."""
    p = Path(path)
    if not p.exists():
        raise Lora2GGUFError(f"{p}: no such file or directory; expected an adapter directory or a GGUF LoRA file")
    if base is None:
        if any_qk_order and p.is_file() and _magic(p) == b"GGUF":
            return load_gguf_lora(p, None, any_qk_order=True)
        return load_adapter(p, None)
    a = load_adapter(p, base.spec)
    if p.is_dir():
        check_arch(a, base.spec, base.path)
    else:
        check_made_for(p, base)
    a.check_base(dataclasses.replace(base.spec, tied_embeddings=False), f"base {base.path}")
    return a


def refuse_expert_lora(adapter: PeftAdapter, verb: str) -> None:
    """A verb that does not handle LoRA on stacked experts yet refuses an adapter that has some, in one line."""
    m = next((m for m in adapter.modules.values() if m.experts), None)
    if m is not None:
        raise Lora2GGUFError(f"{adapter.path}: LoRA on stacked experts ({m.module}) is not handled by `lora2gguf "
                             f"{verb}` yet; `lora2gguf convert` writes it as a GGUF LoRA")


def _magic(p: Path) -> bytes:
    with open(p, "rb") as fh:
        return fh.read(4)
