"""The reference: the PyTorch model on the base's (dequantized) weights with adapters applied by PEFT's
exact math (adapters.lora.merged_weight / merged_bias, float64), the yardstick for convert/merge/verify.

reference_model builds it whole (an fp32 copy of the model); reference_logits computes the same logits
layer by layer, for bases whose fp32 copy would not fit (verify on an 8B)."""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import torch
from torch import nn

from lora2gguf.adapters.lora import ModuleLoRA, PeftAdapter, merged_bias, merged_weight
from lora2gguf.models.layers import ExpertLinear, MoE, Transformer
from lora2gguf.weights.base_model import GGUFBase
from lora2gguf.weights.dequantize import SUPPORTED
from lora2gguf.weights.quantized import QuantWeight, frozen_linear, quant_weight


def modules_by_target(adapters: list[tuple[PeftAdapter, float]]) -> dict[str, list[tuple[ModuleLoRA, float]]]:
    """HF module path → [(module LoRA, user scale)] over all adapters, in order."""
    out: dict[str, list[tuple[ModuleLoRA, float]]] = {}
    for adapter, scale in adapters:
        for name, m in adapter.modules.items():
            out.setdefault(name, []).append((m, scale))
    return out


def reference_model(base, adapters: list[tuple[PeftAdapter, float]] = (), dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu") -> Transformer:
    """Transformer on `base` with every adapter folded in (user scale per adapter, like llama.cpp's
    --lora-scaled): ReferenceWeights' tensors, all of them at once. modules_to_save weights replace the base
    tensor; the last adapter wins."""
    src = ReferenceWeights(base, list(adapters))
    # PEFT on a tied base: a LoRA or modules_to_save on embed_tokens changes the lookup only, the head
    # keeps multiplying by the original embedding (and a LoRA on lm_head changes the head only): untied
    spec = dataclasses.replace(base.spec, tied_embeddings=False) if src.untied else base.spec
    with torch.device("meta"):
        model = Transformer(spec, None)
    src.load(model, "")
    ff = base.rope_freqs()
    model.set_rope_factors(torch.from_numpy(ff) if ff is not None else None)
    return model.to(device=device, dtype=dtype).eval()

ROW_BLOCK = 1 << 22  # elements of one float64 merge block: PEFT's math stays row-local, a block at a time


class ReferenceWeights:
    """The reference's tensors (HF names and layout), made when asked: the base's own, with the adapters
    folded in by PEFT's math (merged_weight, a block of rows at a time) where they touch it; modules_to_save
    replace it (the last adapter wins); on a tied base whose embedding or head an adapter touches, the head
    starts as a copy of the original embedding. Untouched 2-D tensors can stay quantized (QuantWeight)."""
    def __init__(self, base, adapters: list[tuple[PeftAdapter, float]]):
        self.base, self.spec = base, base.spec
        for a, _ in adapters:
            a.check_base(dataclasses.replace(base.spec, tied_embeddings=False), f"base {base.spec.name}")
        self.mods = modules_by_target(adapters)
        self.full = {name: t for a, _ in adapters for name, t in a.full_weights.items()}
        touched = set(self.mods) | {t.rsplit(".", 1)[0] for t in self.full}
        self.untied = bool(base.spec.tied_embeddings and touched & {"lm_head", "model.embed_tokens"})
        self.touched, self.names = touched, set(base.hf_names())

    def _source_name(self, name: str) -> str:
        return "model.embed_tokens.weight" if name == "lm_head.weight" and self.spec.tied_embeddings else name

    def _quant(self, name: str):
        if not isinstance(self.base, GGUFBase) or not name.endswith(".weight"):
            return None
        return quant_weight(self.base, self._source_name(name), torch.float32)

    def quantized(self, name: str):
        """The reference tensor as a QuantWeight when it is the base's, untouched, and can be one, else None."""
        return None if name.rsplit(".", 1)[0] in self.touched or name in self.full else self._quant(name)

    def base_tensor(self, name: str) -> np.ndarray:
        """The base's tensor (float32, HF layout), dequantized by weights.dequantize where it can (gguf-py's values)."""
        q = self._quant(name)
        return q.rows().numpy() if q is not None else self.base.tensor(self._source_name(name))

    def get(self, name: str, n_out: int | None = None) -> torch.Tensor | None:
        """Tensor `name` (float32), or None for a bias that neither the base nor an adapter has."""
        if name in self.full:
            return torch.from_numpy(np.asarray(self.full[name], np.float32))
        mod, attr = name.rsplit(".", 1)
        has_base = self._source_name(name) in self.names
        if mod not in self.mods:
            return torch.from_numpy(self.base_tensor(name)) if has_base else None
        ms = self.mods[mod]
        if attr == "bias":
            b = merged_bias(self.base_tensor(name) if has_base else None, n_out, ms)
            return None if b is None else torch.from_numpy(np.asarray(b, np.float32))
        w = self.base_tensor(name)
        if any(m.embedding or m.fan_in_fan_out for m, _ in ms):  # ΔW rows are columns of A: merged whole
            return torch.from_numpy(merged_weight(w, ms).astype(np.float32))
        out = np.empty(w.shape, np.float32)
        step = max(1, ROW_BLOCK // max(1, w.shape[1]))
        for i in range(0, w.shape[0], step):
            rows = slice(i, i + step)
            out[rows] = merged_weight(w[rows], [(m.row_block(rows), u) for m, u in ms])
        return torch.from_numpy(out)

    def load(self, module: nn.Module, prefix: str, lazy_experts: bool = False) -> None:
        """Give `module` (built on the meta device) its reference tensors, `prefix` its HF path + '.'.
        lazy_experts: each stack of experts an ExpertStack (an expert's weight made when the router asks)."""
        for sub_name, sub in module.named_modules():
            path = prefix + sub_name + ("." if sub_name else "")
            if lazy_experts and isinstance(sub, ExpertLinear):
                del sub._parameters["weight"]  # a plain attribute from here on: ExpertLinear only indexes it
                sub.weight = ExpertStack(self, path + "weight")
                continue
            for attr, p in list(sub.named_parameters(recurse=False)):
                setattr(sub, attr, nn.Parameter(self.get(path + attr), requires_grad=False))
            if isinstance(sub, nn.Linear) and sub.bias is None:  # a LoRA bias adds one
                b = self.get(path + "bias", sub.out_features)
                if b is not None:
                    sub.bias = nn.Parameter(b, requires_grad=False)


class ExpertStack:
    """A stack of experts (n_expert, out, in) whose expert e is made when indexed: its rows of the base
    (dequantized from the mapped file, where a 3-D GGUF tensor stores expert after expert) with each
    adapter's pair for that expert folded in by merged_weight. The layer-by-layer reference then never holds
    a whole stack in float32 (Qwen3-30B-A3B: 805 MB per projection, three per layer, with as much again
    while folding); an expert is made once per batch that routes tokens to it."""

    def __init__(self, src: ReferenceWeights, name: str):
        self.src, self.name, self.mods = src, name, src.mods.get(name.rsplit(".", 1)[0], [])
        self.rows: QuantWeight | None = None
        self.whole: np.ndarray | None = None
        info = src.base.file.tensors[src.base.gguf_name(name)] if isinstance(src.base, GGUFBase) else None
        if name in src.full:  # modules_to_save: the adapter's stack replaces the base's, as in get()
            self.whole, self.mods = np.asarray(src.full[name], np.float32), []
        elif info is not None and info.type in SUPPORTED and src.spec.arch_module.stored_as_hf(src.spec, name):
            n_expert, self.n_out, n_in = info.shape
            raw = torch.from_numpy(src.base.file.raw(info.name).reshape(n_expert * self.n_out, -1))
            self.rows = QuantWeight(raw, info.type, n_in, None, torch.float32)
        else:  # a type weights.dequantize does not read, or an HF base: the stack once, as get() makes it
            self.whole = src.base_tensor(name)

    def __getitem__(self, e: int) -> torch.Tensor:
        w = (self.rows.rows(e * self.n_out, (e + 1) * self.n_out).numpy() if self.rows is not None
             else self.whole[e])
        if self.mods:
            w = merged_weight(w[None], [(m.row_block(slice(e, e + 1)), u) for m, u in self.mods])[0]
        return torch.from_numpy(np.ascontiguousarray(w, np.float32))


BATCH_TOKENS = 1 << 12  # padded tokens per batch of run_layers: matmuls large enough for BLAS, activations small


def _batches(sequences: list[list[int]], budget: int) -> list[list[int]]:
    """Indices of the sequences, by length, in groups of at most `budget` padded tokens (one at least)."""
    order = sorted(range(len(sequences)), key=lambda j: len(sequences[j]))
    groups: list[list[int]] = []
    for j in order:
        if groups and (len(groups[-1]) + 1) * len(sequences[j]) <= budget:
            groups[-1].append(j)
        else:
            groups.append([j])
    return groups


def run_layers(base, src: ReferenceWeights, sequences: list[list[int]],
               on_layer: Callable[[nn.Module, int], None] | None = None,
               on_batch: Callable[[torch.Tensor], None] | None = None) -> tuple[Transformer, list[torch.Tensor]]:
    """The reference model's hidden states after its last layer, for each token sequence (1, T, n_embd),
    computed layer by layer over all of them: one layer's tensors are dequantized (and the adapters folded
    in) at a time, used for every sequence and dropped, and an untouched embedding stays quantized (rows
    looked up). Sequences run in batches of similar length, padded on the right: causal attention keeps the
    padding out of every real position. on_layer(layer, i) sees each layer before it runs (to hook its
    projections), on_batch(valid) each batch's (B, T) mask of real positions before the layer runs on it.
    Returns the model shell (on the meta device but for its rope, masks and final norm's weights are not
    loaded) and the states."""
    spec = base.spec
    with torch.device("meta"):
        model = Transformer(spec, None)
    ff = base.rope_freqs()
    model.set_rope_factors(torch.from_numpy(ff) if ff is not None else None)
    groups = _batches(sequences, BATCH_TOKENS)
    with torch.no_grad():
        emb = src.quantized("model.embed_tokens.weight")
        emb_full = src.get("model.embed_tokens.weight") if emb is None else None
        xs, valid = [], []
        for g in groups:
            T = max(len(sequences[j]) for j in g)
            ids = torch.tensor([sequences[j] + [0] * (T - len(sequences[j])) for j in g])
            x = emb.take(ids) if emb is not None else emb_full[ids]
            if model.embed_scale != 1.0:
                x = x * torch.tensor(model.embed_scale, dtype=x.dtype)
            xs.append(x)
            valid.append(torch.arange(T)[None, :] < torch.tensor([len(sequences[j]) for j in g])[:, None])
        del emb_full
        lengths = {x.shape[1] for x in xs}
        ropes = {T: {k: r(torch.arange(T).expand(1, T)) for k, r in model.ropes.items()} for T in lengths}
        masks = {T: model.masks(T, None, "cpu") for T in lengths}
        for i in range(spec.n_layer):
            with torch.device("meta"):
                layer = spec.arch_module.build_layer(spec, i)
            src.load(layer, f"model.layers.{i}.", lazy_experts=True)
            if on_layer is not None:
                on_layer(layer, i)
            for k, x in enumerate(xs):
                if on_batch is not None:
                    on_batch(valid[k])
                cos, sin = ropes[x.shape[1]][layer.self_attn.rope_key]
                xs[k] = layer(x, cos, sin, masks[x.shape[1]][layer.self_attn.window])
            del layer
            if isinstance(base, GGUFBase):  # read once: its pages leave this process's resident set
                base.file.release(f"blk.{i}.")
    out: list[torch.Tensor] = [None] * len(sequences)  # type: ignore[list-item]
    for g, x in zip(groups, xs):
        for b, j in enumerate(g):
            out[j] = x[b:b + 1, :len(sequences[j])]
    return model, out


def routing_hooks(sequences: list[list[int]], store: dict[int, np.ndarray]):
    """(on_layer, on_batch) for run_layers that keep, for the first sequence, the experts each MoE layer's
    router chose (store: layer → (tokens, n_expert_used) ids), read with MoE.route itself: a pre-hook on the
    MoE blocks only (the router, a small matmul, runs twice; a dense layer is not touched)."""
    groups = _batches(sequences, BATCH_TOKENS)  # run_layers' batches, in its order
    first = next((g, b) for g, grp in enumerate(groups) for b, j in enumerate(grp) if j == 0)
    T, batch = len(sequences[0]), {"n": -1}

    def on_batch(valid: torch.Tensor) -> None:
        batch["n"] += 1

    def on_layer(layer: nn.Module, i: int) -> None:
        def pre(mod: nn.Module, args) -> None:
            if batch["n"] % len(groups) == first[0]:  # routed as the block routes it: the whole batch at once
                x = args[0]
                store[i] = mod.route(x.reshape(-1, x.shape[-1]))[0].view(*x.shape[:2], -1)[first[1], :T].numpy()
        for sub in layer.modules():
            if isinstance(sub, MoE):
                sub.register_forward_pre_hook(pre)
    return on_layer, on_batch


class Head:
    """The reference's final norm and head, logit cap included: logits for a block of positions' final hidden
    states, so that a view of a long text over a large vocabulary is made a block at a time (HeadBlocks).
    An untouched head stays quantized (logits by blocks of vocabulary rows); `key` names it then, so that
    views sharing it share its products."""

    def __init__(self, base, src: ReferenceWeights, model: Transformer | None = None):
        if model is None:  # run_layers' shell, or one like it
            with torch.device("meta"):
                model = Transformer(base.spec, None)
        src.load(model.model.norm, "model.norm.")
        head_name = "lm_head.weight" if (not base.spec.tied_embeddings or src.untied) else "model.embed_tokens.weight"
        head = src.quantized(head_name)
        self.key = head_name if head is not None else None
        self.model, self.weight = model, src.get(head_name) if head is None else head

    def normed(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model.model.norm(x)

    def project(self, h: torch.Tensor) -> np.ndarray:
        """(T, n_embd) normed states → (T, vocab) float32 logits."""
        with torch.no_grad():
            return self.model.cap_logits(frozen_linear(h, self.weight).float()).numpy()  # weight: tensor or QuantWeight

    def __call__(self, x: torch.Tensor) -> np.ndarray:
        """(T, n_embd) final hidden states → (T, vocab) float32 logits."""
        return self.project(self.normed(x))


class HeadBlocks:
    """Reference views' logits a block of `rows` positions at a time, each view a stream for parity.lockstep
    (`stream(view)`): views whose Head is the base's own untouched head (the base alone and the adapters'
    reference, unless an adapter touches the head) share one product per block, so a quantized head is
    dequantized once per block for all of them, not once per view."""

    def __init__(self, views: dict[str, tuple[Head, torch.Tensor]], rows: int):
        self.views, self.rows = views, rows
        groups: dict = {}
        for view, (head, _) in views.items():
            groups.setdefault(head.key or view, []).append(view)
        self.groups = list(groups.values())
        self._block, self._made = -1, {}

    def stream(self, view: str):
        for k, i in enumerate(range(0, len(self.views[view][1]), self.rows)):
            if self._block != k:
                self._block, self._made = k, self._make(i)
            yield self._made.pop(view)

    def _make(self, i: int) -> dict[str, np.ndarray]:
        out = {}
        for views in self.groups:
            parts = [self.views[v][0].normed(self.views[v][1][i: i + self.rows]) for v in views]
            logits = self.views[views[0]][0].project(torch.cat(parts))
            starts = np.cumsum([0] + [len(h) for h in parts])
            out |= {v: logits[a:b] for v, a, b in zip(views, starts, starts[1:])}
        return out


def reference_states(base, adapters: list[tuple[PeftAdapter, float]], sequences: list[list[int]],
                     routing: dict[int, np.ndarray] | None = None) -> tuple[Head, list[torch.Tensor]]:
    """The reference model's final hidden states for each token sequence, (T, n_embd) (run_layers), and its
    Head. Peak memory is the file's pages plus one layer, not an fp32 copy of the model. routing: a dict to
    receive the first sequence's expert choices, layer by layer (a mixture of experts; routing_hooks)."""
    src = ReferenceWeights(base, list(adapters))
    hooks = routing_hooks(sequences, routing) if routing is not None else (None, None)
    model, xs = run_layers(base, src, sequences, *hooks)
    return Head(base, src, model), [x[0] for x in xs]


def reference_logits(base, adapters: list[tuple[PeftAdapter, float]], sequences: list[list[int]],
                     routing: dict[int, np.ndarray] | None = None) -> list[np.ndarray]:
    """The reference model's float32 logits for each token sequence (reference_states, then its Head); the
    result is reference_model's."""
    head, xs = reference_states(base, adapters, sequences, routing)
    return [head(x) for x in xs]
