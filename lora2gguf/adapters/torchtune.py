"""A torchtune adapter (adapter_model.pt + adapter_config.json) → adapters.lora.PeftAdapter in HF layout.

The format, from torchtune's source (torchtune/modules/peft/lora.py, dora.py, models/convert_weights.py,
training/checkpointing/_checkpointer.py): the checkpointer `torch.save`s the adapter's state dict as is,
- `layers.N.attn.{q,k,v,output}_proj.lora_{a,b}.weight`, `layers.N.mlp.w1|w2|w3.lora_{a,b}.weight`
  (w1 = gate, w2 = down, w3 = up), `output.lora_{a,b}.weight`; lora_a is an nn.Linear(in, r), so its
  weight is PEFT's lora_A (r, in), lora_b's PEFT's lora_B (out, r); DoRA adds `<module>.magnitude` (out,);
- scale alpha / r (LoRALinear: `(alpha / rank) * lora_b(lora_a(x))`);
- q/k `lora_b` rows in Meta's interleaved rope order for the models whose HF loader permutes q/k
  (convert_weights.hf_to_tune for llama, models/gemma2/_convert_weights.py for gemma2; qwen2_hf_to_tune does
  not). This reader un-permutes them to HF order (as tune_to_peft_adapter_weights does), so that everything
  downstream, which expects HF layout, permutes exactly once, where llama.cpp's arch wants it (llama: yes,
  gemma2: no). The rule follows torchtune's model family, not llama.cpp's: the two differ for gemma2.
The HF checkpointer also writes the PEFT export (adapter_model.safetensors, already in HF order) beside the
.pt: adapters.load prefers that one; this reader is for directories holding only the .pt.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from lora2gguf.adapters.lora import ModuleLoRA, PeftAdapter
from lora2gguf.adapters.peft import bnb_note, lora_pair, peft_scale, read_config
from lora2gguf.errors import Lora2GGUFError
from lora2gguf.fileio.tensors import read_torch_pickle
from lora2gguf.models.llama import unpermute_rows

TENSORS = "adapter_model.pt"
# torchtune module → HF module (convert_weights._FROM_HF, inverted)
_MODULES = {"attn.q_proj": "self_attn.q_proj", "attn.k_proj": "self_attn.k_proj", "attn.v_proj": "self_attn.v_proj",
            "attn.output_proj": "self_attn.o_proj", "mlp.w1": "mlp.gate_proj", "mlp.w2": "mlp.down_proj",
            "mlp.w3": "mlp.up_proj"}
# torchtune's target names (get_lora_module_names) → PEFT's (convert_weights._TO_PEFT_TARGET_MODULES)
_TARGETS = {"output_proj": "o_proj", "w1": "gate_proj", "w2": "down_proj", "w3": "up_proj", "output": "lm_head"}
# Archs whose torchtune HF loader permutes q/k rows into Meta's interleaved order (checkpointer: hf_to_tune,
# gemma2_hf_to_tune); qwen2 / qwen2.5 (qwen2_hf_to_tune) keep HF's order.
META_ORDER = {"llama", "gemma2"}
_KEY = re.compile(r"(?:layers\.(\d+)\.(attn\.\w+|mlp\.w[123])|(output))\.(lora_a\.weight|lora_b\.weight|magnitude)$")


def is_torchtune_dir(path: Path) -> bool:
    return (path / TENSORS).is_file()


def hf_module(key: str) -> tuple[str, str] | None:
    """(HF module path, lora_A / lora_B / lora_magnitude_vector) for a torchtune adapter key."""
    m = _KEY.match(key)
    if not m or (m.group(2) and m.group(2) not in _MODULES):
        return None
    layer, mod, output, kind = m.groups()
    name = "lm_head" if output else f"model.layers.{layer}.{_MODULES[mod]}"
    return name, {"lora_a.weight": "lora_A", "lora_b.weight": "lora_B", "magnitude": "lora_magnitude_vector"}[kind]


def load_torchtune(path: Path, spec=None) -> PeftAdapter:
    """`spec` (base.ModelSpec) gives the heads for un-permuting q/k; without it (inspect) the rows stay in
    torchtune's order, which describing the adapter does not look at."""
    if not (path / "adapter_config.json").is_file():
        raise Lora2GGUFError(f"{path}: {TENSORS} without adapter_config.json; its scale (lora_alpha / r) is not in "
                             "the .pt: write adapter_config.json with the recipe's lora_rank as \"r\" and lora_alpha")
    cfg = dict(read_config(path))
    if isinstance(cfg.get("target_modules"), list):
        cfg["target_modules"] = [_TARGETS.get(t, t) for t in cfg["target_modules"]]
    parts: dict[str, dict] = {}
    for key, t in read_torch_pickle(path / TENSORS, "torchtune's checkpointer").items():
        got = hf_module(key)
        if got is None:
            raise Lora2GGUFError(f"{path / TENSORS}: tensor {key} is not a torchtune LoRA tensor of a supported module "
                                 "(layers.N.attn.{q,k,v,output}_proj, layers.N.mlp.w1|w2|w3, output)")
        if not np.all(np.isfinite(t)):
            raise Lora2GGUFError(f"{path / TENSORS}: tensor {key} contains NaN or Inf; the adapter is broken")
        parts.setdefault(got[0], {})[got[1]] = t
    modules = {}
    for mod, p in sorted(parts.items()):
        A, B = lora_pair(path / TENSORS, mod, p, "lora_A", "lora_B")  # PEFT's names by now (hf_module)
        r, alpha, scale = peft_scale(cfg, mod)
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1] or A.shape[0] != r:
            raise Lora2GGUFError(f"{path / TENSORS}: {mod}: lora_a {tuple(A.shape)} and lora_b {tuple(B.shape)} do not "
                                 f"form a rank-{r} pair (r in adapter_config.json)")
        if spec is not None and spec.arch in META_ORDER and mod.endswith(("self_attn.q_proj", "self_attn.k_proj")):
            B = unpermute_rows(B, spec.n_head if mod.endswith("q_proj") else spec.n_head_kv)
        modules[mod] = ModuleLoRA(mod, A, B, r, alpha, scale, magnitude=p.get("lora_magnitude_vector"))
    cfg["source_format"] = "torchtune"
    return PeftAdapter(path, cfg, modules, notes=[n for n in (bnb_note(path, cfg),) if n])
