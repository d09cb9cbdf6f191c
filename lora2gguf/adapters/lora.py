"""The in-memory LoRA: one adapter's modules in Hugging Face layout (HF module names and row order), each
with the scale its own runtime applies, and the merge math (PEFT's, DoRA and LoRA bias included) that merge
and the reference both apply. Every reader (adapters.peft, gguf_lora, mlx, torchtune) produces this; every
writer takes it."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lora2gguf.errors import Lora2GGUFError


@dataclass
class ModuleLoRA:
    """One adapted module. A and B exactly as PEFT stores them; for a stack of experts (a 3-D weight
    (n_expert, out, in), model.layers.0.mlp.experts.gate_proj) one pair per expert: A (n_expert, r, in) and
    B (n_expert, out, r), as llama.cpp's *_exps LoRA tensors hold them."""

    module: str  # HF module path: model.layers.0.self_attn.q_proj, model.embed_tokens, lm_head
    A: np.ndarray  # lora_A.weight (r, in) — or lora_embedding_A (r, vocab); experts (n_expert, r, in)
    B: np.ndarray  # lora_B.weight (out, r) — or lora_embedding_B (dim, r); experts (n_expert, out, r)
    r: int
    alpha: float
    scale: float  # PEFT's: alpha / r, or alpha / sqrt(r) with rsLoRA
    embedding: bool = False
    fan_in_fan_out: bool = False
    magnitude: np.ndarray | None = None  # DoRA lora_magnitude_vector (out,)
    bias: np.ndarray | None = None  # lora_B.bias (out,) with lora_bias=True
    open_experts: bool = False  # stacked from per-expert modules: experts past the last one had no LoRA (zero)

    @property
    def weight_name(self) -> str:
        return self.module + ".weight"

    def delta(self) -> np.ndarray:
        """scale · B @ A in the layout of the base weight (out, in); embeddings: (vocab, dim); experts
        (n_expert, out, in), one product per expert.
        Not the DoRA update (that needs the base weight: see merge)."""
        d = self.B.astype(np.float64) @ self.A.astype(np.float64)
        d *= self.scale  # in place: one (out, in) float64 array, not two
        if self.embedding or self.fan_in_fan_out:
            d = d.T
        return d.astype(np.float32)

    def factors(self) -> tuple[np.ndarray, np.ndarray]:
        """(a, b) with b @ a == delta()/scale, a: (r, in), b: (out, r) in the base weight's layout."""
        if self.embedding or self.fan_in_fan_out:
            return self.B.T, self.A.T
        return self.A, self.B

    def row_block(self, rows: slice) -> "ModuleLoRA":
        """The part of this LoRA that produces these output rows (ΔW rows are rows of B, or columns of A
        for embeddings); DoRA's per-row magnitude goes with them. For a stack of experts the first axis is the
        expert: `rows` selects experts."""
        if self.experts:
            return dataclasses.replace(self, A=self.A[rows], B=self.B[rows])
        if self.embedding or self.fan_in_fan_out:
            return dataclasses.replace(self, A=self.A[:, rows], bias=None)
        mag = None if self.magnitude is None else self.magnitude[rows]
        return dataclasses.replace(self, B=self.B[rows], magnitude=mag, bias=None)

    @property
    def experts(self) -> bool:
        """Whether this is a stack of per-expert pairs (3-D A and B)."""
        return self.A.ndim == 3

    def delta_shape(self) -> tuple[int, ...]:
        a, b = self.factors()
        return (*b.shape[:-1], a.shape[-1])


@dataclass
class PeftAdapter:
    path: Path
    config: dict
    modules: dict[str, ModuleLoRA]  # by HF module path
    full_weights: dict[str, np.ndarray] = field(default_factory=dict)  # modules_to_save / trained biases
    notes: list[str] = field(default_factory=list)  # one line each, for the verbs to print (bnb base, skipped towers)

    @property
    def use_dora(self) -> bool:
        return any(m.magnitude is not None for m in self.modules.values())

    @property
    def has_lora_bias(self) -> bool:
        return any(m.bias is not None for m in self.modules.values())

    def check_base(self, spec, base_label: str = "base") -> None:
        """Every adapted module must exist in the base with matching shapes; raise otherwise."""
        arch = spec.arch_module
        shapes = arch.target_shapes(spec)
        for name, m in self.modules.items():
            if name == "model.embed_tokens":
                want = (spec.n_vocab, spec.n_embd)
            elif name == "lm_head":
                if spec.tied_embeddings:
                    raise Lora2GGUFError(
                        f"{self.path}: LoRA on lm_head, but {base_label} ties lm_head to the token embeddings "
                        "(no separate output tensor), so llama.cpp cannot apply it at run time; "
                        "use `lora2gguf merge` (it writes an untied output tensor) or retrain without lm_head")
                want = (spec.n_vocab, spec.n_embd)
            else:
                mt = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
                if not mt or mt.group(2) not in shapes:
                    raise Lora2GGUFError(
                        f"{self.path}: target module {name} has no GGUF tensor in arch {arch.name}; "
                        f"supported targets: {', '.join(p.split('.')[-1] for p in arch.layer_linears)}, "
                        "embed_tokens, lm_head")
                if int(mt.group(1)) >= spec.n_layer:
                    raise Lora2GGUFError(f"{self.path}: {name} is beyond the {spec.n_layer} layers of {base_label}; "
                                         "the adapter was made for another model")
                want = shapes[mt.group(2)]
            got = m.delta_shape()
            if m.open_experts and len(got) == len(want) == 3 and got[0] < want[0] and got[1:] == want[1:]:
                def pad(x, n=want[0]):  # zero pairs for the experts past the last adapted one
                    return np.concatenate([x, np.zeros((n - x.shape[0],) + x.shape[1:], x.dtype)])
                m = self.modules[name] = dataclasses.replace(m, A=pad(m.A), B=pad(m.B), open_experts=False)
                got = m.delta_shape()
            if got != want:
                what = lambda s: "x".join(map(str, s)) + (f" ({s[0]} experts)" if len(s) == 3 else "")  # noqa: E731
                raise Lora2GGUFError(
                    f"{self.path}: {name} changes a {what(got)} weight but {base_label} has {what(want)}; "
                    "the adapter was made for another model")


def merged_weight(w: np.ndarray, mods: list[tuple[ModuleLoRA, float]]) -> np.ndarray:
    """The base weight (HF layout) with these adapters applied as PEFT computes them, in float64:
    W + Σ u·s·B·A, where u is the user's scale and s PEFT's; a DoRA module contributes
    (m / ‖W + u·s·B·A‖_row − 1)·W + (m / ‖W + u·s·B·A‖_row)·u·s·B·A (PEFT's DoRA forward, merged).
    As in PEFT, each adapter's DoRA norm is taken against the base weight, not the others' sum."""
    out = w.astype(np.float64)
    base = out.copy() if any(m.magnitude is not None for m, _ in mods) else None  # DoRA's norms read the base
    for m, u in mods:
        # float32 deltas add into float64 exactly as their float64 copies would: no copy of the weight's size
        d = m.delta() if u == 1.0 else m.delta().astype(np.float64) * u
        if m.magnitude is None:
            out += d
        else:
            norm = np.linalg.norm(base + d, axis=1, keepdims=True)
            g = m.magnitude.astype(np.float64).reshape(-1, 1) / norm
            out += (g - 1.0) * base + g * d
    return out


def merged_bias(b: np.ndarray | None, n_out: int, mods: list[tuple[ModuleLoRA, float]]) -> np.ndarray | None:
    """The module's bias after LoRA bias terms (lora_B.bias · s · u); None when nothing adds one."""
    terms = [(m, u) for m, u in mods if m.bias is not None]
    if not terms:
        return b
    out = np.zeros(n_out, np.float64) if b is None else b.astype(np.float64)
    for m, u in terms:
        out += m.bias.astype(np.float64) * m.scale * u
    return out
