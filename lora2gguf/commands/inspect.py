"""`lora2gguf inspect`: what a GGUF model/adapter (or an HF model, or a PEFT / torchtune / mlx-lm adapter
directory) is."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from gguf import LlamaFileType

from lora2gguf import models
from lora2gguf.adapters import lowrank
from lora2gguf.adapters.gguf_lora import describe_gguf_adapter
from lora2gguf.adapters.load import describe_adapter, load_for_base  # PEFT, torchtune, mlx-lm: told by the files
from lora2gguf.fileio.gguf_read import GGUFFile
from lora2gguf.weights.base_model import GGUFBase, HFBase


def _file_type_name(v) -> str | None:
    if v is None:
        return None
    try:
        return LlamaFileType(int(v)).name
    except (ValueError, TypeError):
        return str(v)


def describe(path: str, base: str | None = None) -> dict:
    p = Path(path)
    if p.is_dir():
        if any((p / n).exists() for n in ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin",
                                          "adapter_model.pt", "adapters.safetensors")):

            return describe_adapter(p) | expert_summary(p)
        with HFBase(p) as b:
            return {"path": str(p), "kind": "hf-model", "spec": b.spec.to_dict()}
    with GGUFFile(p) as f:
        info = {
            "path": str(p), "kind": "gguf-adapter" if f.get("general.type") == "adapter" else "gguf-model",
            "architecture": f.string("general.architecture"), "name": f.string("general.name"),
            "file_type": _file_type_name(f.get("general.file_type")), "gguf_version": f.version,
            "tensor_count": len(f.tensors), "tensor_bytes": sum(t.nbytes for t in f.tensors.values()),
            "tensor_types": dict(Counter(t.type.name for t in f.tensors.values())),
        }
        if info["kind"] == "gguf-adapter":
            info.update(describe_gguf_adapter(f, base=base))
            return info | (expert_summary(p) if any("_exps." in n for n in f.tensors) else {})
        arch = info["architecture"]
        # the architecture's own scalar metadata (block_count, expert_count, ssm.*…), whatever the arch
        info["metadata"] = {k: v for k, v in ((k, f.get(k)) for k in f.fields if arch and k.startswith(arch + "."))
                            if isinstance(v, (str, int, float, bool))}
    if arch not in models.NAMES:
        info["supported"] = False
        info["verdict"] = (f"architecture {arch!r} is not one lora2gguf supports ({', '.join(models.NAMES)}): train, "
                           "convert, merge, verify and export cannot use it; inspect reads its header only")
        return info
    with GGUFBase(p) as b:
        info["supported"] = True
        info["spec"] = b.spec.to_dict()
    return info


def expert_summary(path: Path) -> dict:
    """For an adapter with LoRA on stacked experts, which experts it really changes (analyze's per-expert
    numbers: `lora2gguf analyze` tells more); nothing for one without."""
    a = load_for_base(path, None, any_qk_order=True)
    stacks = {}
    with lowrank.small_matrix_threads():
        for m in a.modules.values():
            if m.experts:
                b, A = lowrank.module_factors(m)
                layer, kind = lowrank.module_label(m.module)
                stacks[f"{layer}.{kind}"] = lowrank.expert_stats(b, A, m.scale)
    if not stacks:
        return {}
    over = lowrank.experts_overview(list(stacks.values()))
    per = {k: f"{len(x['experts_changed'])}/{x['n_expert']} changed {x['experts_changed']}, mean entropy rank "
           f"{x['entropy_rank']:.2f}" for k, x in stacks.items()}
    return {"experts": {"n_expert": over["n_expert"], "changed": over["experts_changed"],
                        "changed_in_every_stack": over["experts_changed_everywhere"], **per}}


def format_description(info: dict) -> str:
    lines = []
    for k, v in info.items():
        if isinstance(v, dict):
            lines.append(f"{k}:")
            lines += [f"  {kk}: {json.dumps(vv) if isinstance(vv, (list, dict)) else vv}" for kk, vv in v.items()]
        elif isinstance(v, list):
            lines.append(f"{k}: {', '.join(map(str, v))}")
        else:
            lines.append(f"{k}: {v}")
    return "\n".join(lines)

