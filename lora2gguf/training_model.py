"""Trainable LoRA on the reference model, with PEFT's math and PEFT's file format.

A LoRALinear wraps a frozen nn.Linear: y = base(x) + B(A(dropout(x))) · scale, scale = alpha/r
(alpha/√r with rsLoRA), A initialised kaiming-uniform(a=√5) and B zeros, as PEFT does. Saving writes
adapter_config.json + adapter_model.safetensors with the keys PEFT's save_pretrained writes
(`base_model.model.<module>.lora_A.weight`), so the result loads with `peft.PeftModel.from_pretrained`
and with every lora2gguf verb.

Also the rest of the trainable model: the frozen base loaded from a GGUF without copying what needs no
conversion; each LoRA'd projection computed as one LoRAProjection (the fused layer of llama-style archs is
in training_layers); and the training loss, which applies the (frozen) LM head to trained positions only
and a chunk at a time.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import models
from .errors import Lora2GGUFError
from .gguf_write import atomic_output
from .quant_weights import frozen_grad_input, frozen_linear

PREFIX = "base_model.model."


def dropped_positions(n: int, p: float) -> torch.Tensor:
    """Sorted flat indices of the n inputs that dropout zeroes, each independently with probability p
    (nn.Dropout's Bernoulli mask), drawn as the gaps between them: geometric, P(gap = k) = (1-p)^(k-1)·p,
    so about n·p random numbers rather than n. Drawn on the CPU from torch's generator (which checkpoints
    and activation checkpointing save and restore)."""
    log_q, k = math.log1p(-p), int(n * p + 6 * math.sqrt(n * p) + 16)  # enough gaps, but for ~1e-9
    parts, last = [], -1
    while last < n:
        gaps = torch.rand(k, dtype=torch.float64).neg_().log1p_().div_(log_q).floor_().add_(1)
        parts.append(gaps.cumsum_(0).add_(last).long())
        last = int(parts[-1][-1])
    idx = torch.cat(parts) if len(parts) > 1 else parts[0]
    return idx[:int(torch.searchsorted(idx, n))]


def _drop(x2: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    if idx is None:
        return x2
    x2 = x2.clone()
    x2.view(-1)[idx] = 0
    return x2


class LoRAProjection(torch.autograd.Function):
    """y = x·Wᵀ + bias + residual with W frozen, then for each LoRA j on its block of output columns:
    y[:, a_j:b_j] += (dropout_j(x)·A_jᵀ)·s_j·B_jᵀ — PEFT's lora_B(lora_A(dropout(x)))·scale, with
    s_j = scale_j/(1-p) and the positions in drops_j zeroed.

    One GEMM for the frozen weight however many projections read x (q/k/v, gate/up concatenated); each
    LoRA added into that output by a GEMM (addmm), the residual too; no gradient for frozen weights, so
    backward needs no x: it keeps each LoRA's dropped-out input (x itself without dropout, shared), its
    (N, r) product and its dropped positions (8 bytes each, PEFT keeps a float mask). Computes in W's
    dtype (bf16 under autocast), A/B gradients in theirs."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, spans, drops, *ab):
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1]).to(weight.dtype).contiguous()
            if isinstance(weight, torch.Tensor):
                if residual is None:
                    y = F.linear(x2, weight, bias)
                else:
                    y = torch.addmm(residual.reshape(-1, weight.shape[0]).to(weight.dtype), x2, weight.t())
                    if bias is not None:
                        y += bias
            else:  # kept quantized: dequantized a block of rows at a time, here and again in backward
                y = frozen_linear(x2, weight, bias)
                if residual is not None:
                    y += residual.reshape(-1, weight.shape[0])
            us, xms = [], []
            for (a, b, s), idx, A, B in zip(spans, drops, ab[0::2], ab[1::2]):
                xms.append(_drop(x2, idx))
                us.append((xms[-1] @ A.to(x2.dtype).t()).mul_(s))
                y[:, a:b].addmm_(us[-1], B.to(x2.dtype).t())
        ctx.spans, ctx.x_shape = spans, x.shape
        ctx.weight = None if isinstance(weight, torch.Tensor) else weight
        ctx.save_for_backward(weight if ctx.weight is None else None, *us, *xms, *drops, *ab)
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, gy):
        weight, *rest = ctx.saved_tensors
        weight = ctx.weight if ctx.weight is not None else weight
        n = len(ctx.spans)
        us, xms, drops, ab = rest[:n], rest[n:2 * n], rest[2 * n:3 * n], rest[3 * n:]
        with torch.autocast(gy.device.type, enabled=False):
            gy2 = gy.reshape(-1, gy.shape[-1]).to(weight.dtype)
            gx = frozen_grad_input(gy2, weight) if ctx.needs_input_grad[0] else None
            grads = []
            for (a, b, s), u, xm, idx, A, B in zip(ctx.spans, us, xms, drops, ab[0::2], ab[1::2]):
                g = gy2[:, a:b]
                gu = (g @ B.to(gy2.dtype)).mul_(s)
                grads += [(gu.t() @ xm).to(A.dtype), (g.t() @ u).to(B.dtype)]
                if gx is None:
                    continue
                if idx is None:
                    gx.addmm_(gu, A.to(gy2.dtype))
                else:  # the gradient only reaches the inputs that were kept
                    gl = gu @ A.to(gy2.dtype)
                    gl.view(-1)[idx] = 0
                    gx += gl
        gx = gx.view(ctx.x_shape) if gx is not None else None
        return gx, None, None, gy if ctx.needs_input_grad[3] else None, None, None, *grads


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r: int, alpha: float, rslora: bool = False, dropout: float = 0.0):
        super().__init__()
        self.base_layer = base
        self.r, self.alpha, self.p = r, alpha, dropout
        self.scale = alpha / math.sqrt(r) if rslora else alpha / r
        dev = base.weight.device
        # LoRA weights stay float32 whatever the base dtype: optimizer updates are tiny.
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=dev, dtype=torch.float32)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=dev, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled():
            return project(x, self.base_layer.weight, self.base_layer.bias, [(self, 0, self.base_layer.out_features)])
        # as PEFT: the input goes to the LoRA weights' dtype (autocast, if on, picks the compute dtype)
        return self.base_layer(x) + self.lora_B(self.lora_A(x.to(self.lora_A.weight.dtype))) * self.scale


def project(x, weight, bias, loras, residual=None) -> torch.Tensor:
    """LoRAProjection for the LoRALinear modules in `loras` [(module, first output column, end)], drawing
    each one's dropout positions when it trains."""
    spans, drops, ab = [], [], []
    for m, a, b in loras:
        p = m.p if m.training and torch.is_grad_enabled() else 0.0
        spans.append((a, b, m.scale / (1 - p)))
        drops.append(dropped_positions(x.numel(), p).to(x.device) if p > 0 else None)
        ab += [m.lora_A.weight, m.lora_B.weight]
    return LoRAProjection.apply(x, weight, bias, residual, tuple(spans), tuple(drops), *ab)


def resolve_targets(targets: str | list[str], arch: models.Arch | None = None) -> list[str]:
    """`all-linear` or a comma list of projection names (q_proj, ...) → sorted short names: "all-linear" in
    PEFT's sense for a decoder, every projection of every layer of `arch`, not the LM head. Without an arch
    (before the base is read) names are checked against every supported arch's projections."""
    archs = [arch] if arch is not None else models.all_archs()
    known = sorted({p.split(".")[-1] for a in archs for p in a.layer_linears})
    names = targets.split(",") if isinstance(targets, str) else list(targets)
    names = [n.strip() for n in names if n.strip()]
    if names == ["all-linear"]:
        return known
    bad = [n for n in names if n not in known]
    if bad or not names:
        extra = ("; lm_head and embed_tokens are not trainable targets here (llama.cpp cannot apply LoRA "
                 "to a tied head)" if any(b in ("lm_head", "embed_tokens") for b in bad) else "")
        where = f" of {arch.name}" if arch is not None else ""
        raise Lora2GGUFError(f"--targets: unknown target {bad[0] if bad else '(empty)'!r}{where}; use all-linear "
                             f"or a comma list of {', '.join(known)}{extra}")
    return sorted(set(names))


def parse_layers(spec: str | None, n_layer: int | None = None) -> list[int] | None:
    """`--layers`: a comma list of layer indices and ranges ("20-29", "0,2,4-6") → sorted indices;
    None or "all" → None (every layer). Checked against n_layer when given."""
    if spec is None or spec.strip() in ("", "all"):
        return None
    out: set[int] = set()
    try:
        for part in spec.split(","):
            lo, _, hi = part.strip().partition("-")
            out.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise Lora2GGUFError(f"--layers {spec!r}: use layer indices and ranges, e.g. 20-29 or 0,2,4-6") from None
    if not out or (n_layer is not None and max(out) >= n_layer):
        raise Lora2GGUFError(f"--layers {spec!r}: the model has layers 0-{(n_layer or 1) - 1}")
    return sorted(out)


def inject_lora(model: nn.Module, targets: str | list[str], r: int, alpha: float, rslora: bool = False,
                dropout: float = 0.0, layers: list[int] | None = None) -> dict[str, LoRALinear]:
    """Freeze `model` and wrap every target projection (of `layers`, default all) in a LoRALinear.
    Returns HF module path → layer. Layers below the first adapted one get no backward pass at all:
    nothing there requires a gradient, so autograd records nothing."""
    if r <= 0:
        raise Lora2GGUFError(f"--rank must be positive, got {r}")
    short = resolve_targets(targets, model.spec.arch_module)
    model.requires_grad_(False)
    wrapped: dict[str, LoRALinear] = {}
    for name, module in list(model.named_modules()):
        if (isinstance(module, nn.Linear) and name.split(".")[-1] in short and name.startswith("model.layers.")
                and (layers is None or int(name.split(".")[2]) in layers)):
            parent, attr = name.rsplit(".", 1)
            layer = LoRALinear(module, r, alpha, rslora, dropout)
            setattr(model.get_submodule(parent), attr, layer)
            wrapped[name] = layer
    return wrapped


def lora_parameters(layers: dict[str, LoRALinear]) -> list[nn.Parameter]:
    return [p for layer in layers.values() for p in (layer.lora_A.weight, layer.lora_B.weight)]


def lora_state_dict(layers: dict[str, LoRALinear]) -> dict[str, torch.Tensor]:
    """PEFT's keys (as save_pretrained writes them), float32 on CPU."""
    out = {}
    for name, layer in sorted(layers.items()):
        out[f"{PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight.detach().float().cpu().contiguous()
        out[f"{PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight.detach().float().cpu().contiguous()
    return out


def load_lora_state(layers: dict[str, LoRALinear], state: dict[str, torch.Tensor]) -> None:
    want = {f"{PREFIX}{n}.lora_{ab}.weight" for n in layers for ab in "AB"}
    if set(state) != want:
        raise Lora2GGUFError("checkpoint LoRA tensors do not match this run's targets; resume with the same "
                             "--targets and --rank")
    with torch.no_grad():
        for name, layer in layers.items():
            layer.lora_A.weight.copy_(state[f"{PREFIX}{name}.lora_A.weight"])
            layer.lora_B.weight.copy_(state[f"{PREFIX}{name}.lora_B.weight"])


def adapter_config(targets: list[str], r: int, alpha: float, rslora: bool, dropout: float, base_name: str,
                   layers: list[int] | None = None) -> dict:
    """The adapter_config.json PEFT writes for this LoraConfig (the keys PEFT reads, plus its defaults)."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
        "r": r, "lora_alpha": alpha, "use_rslora": rslora, "lora_dropout": dropout,
        "target_modules": sorted(targets), "bias": "none", "fan_in_fan_out": False, "use_dora": False,
        "lora_bias": False, "modules_to_save": None, "init_lora_weights": True, "inference_mode": True,
        "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": layers, "layers_pattern": None,
        "revision": None,
    }


def save_adapter(out_dir: str | Path, layers: dict[str, LoRALinear], config: dict) -> Path:
    """Write a PEFT adapter directory; each file appears whole or not at all."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_output(out_dir / "adapter_model.safetensors") as tmp:
        save_file(lora_state_dict(layers), str(tmp), metadata={"format": "pt"})
    with atomic_output(out_dir / "adapter_config.json") as tmp:
        tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out_dir


class HeadLoss(torch.autograd.Function):
    """Σ cross-entropy of (h @ headᵀ) over rows of h, a chunk of rows at a time. The head is frozen, so
    the only gradient is w.r.t. h: computed here, chunk by chunk, and kept (rows × width) for backward.
    Full-vocabulary logits never exist for the whole batch, unlike model(ids) followed by the loss: one
    chunk's buffer holds logits, then log-probabilities, then the gradient softmax − onehot, in place. With
    a soft-cap c (Gemma 2) the logits are c·tanh(z/c), as the model's forward caps them, and the gradient
    reaching z is multiplied by 1 − tanh²(z/c)."""

    @staticmethod
    def forward(ctx, h, head, targets, chunk: int, softcap: float = 0.0):
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        resident = isinstance(head, torch.Tensor)  # else a QuantWeight: dequantized by blocks, twice per chunk
        h = h if resident else h.to(head.dtype)
        grad = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        head = head.to(h.dtype) if resident else head
        buf = torch.empty(min(chunk, len(h)), head.shape[0], dtype=h.dtype, device=h.device)
        with torch.autocast(h.device.type, enabled=False):  # in h's dtype (bf16 under autocast), as F.linear
            for i in range(0, len(h), chunk):
                n = len(h[i:i + chunk])
                if resident:
                    logp = torch.mm(h[i:i + n], head.t(), out=buf[:n]).float()
                else:
                    logp = frozen_linear(h[i:i + n], head, out=buf[:n]).float()
                if softcap:
                    tanh = torch.tanh(logp / softcap)
                    logp = torch.mul(tanh, softcap, out=logp)
                logp = torch.log_softmax(logp, -1, out=logp)
                t, rows = targets[i:i + n], torch.arange(n, device=h.device)
                total -= logp[rows, t].sum()
                if grad is not None:  # d loss / d logits = softmax - onehot
                    p = logp.exp_()
                    p[rows, t] -= 1
                    if softcap:
                        p.mul_(1 - tanh.square_())
                    if resident:
                        torch.mm(p.to(h.dtype), head, out=grad[i:i + n])
                    else:
                        grad[i:i + n] = frozen_grad_input(p.to(h.dtype), head)
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, g):
        (grad,) = ctx.saved_tensors
        return grad * g, None, None, None, None


class LossModel(nn.Module):
    """Summed next-token loss in one forward, so that DistributedDataParallel sees the whole step."""

    def __init__(self, model: nn.Module, chunk: int = 256):
        super().__init__()
        self.model, self.chunk = model, chunk

    def forward(self, ids, attention_mask, targets):
        h = self.model.hidden_states(ids, attention_mask)
        keep = targets != -100
        m = self.model
        head = m.model.embed_tokens.weight if m.spec.tied_embeddings else m.lm_head.weight
        return HeadLoss.apply(h[keep], head, targets[keep], self.chunk, m.final_softcap)


BASE_WEIGHTS = ("auto", "resident", "quantized")
RESIDENT_SHARE = 0.5  # auto keeps the base resident when that takes at most this share of free memory


def available_memory(device: torch.device) -> int:
    """Bytes free for the frozen base: the GPU's free memory, or the host's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


def resident_cost(base, dtype: torch.dtype, device: torch.device) -> int:
    """Bytes the resident form adds beyond the file's pages: every 2-D tensor dequantized to `dtype`,
    except F32 tensors that load_base_model maps in place (CPU, fp32)."""
    from gguf import GGMLQuantizationType

    total = 0
    for name in base.hf_names():
        info = base.file.tensors[base.gguf_name(name)]
        in_place = (info.type == GGMLQuantizationType.F32 and dtype == torch.float32 and device.type == "cpu"
                    and base.spec.arch_module.stored_as_hf(base.spec, name))
        total += 0 if in_place else info.n_elements * torch.finfo(dtype).bits // 8
    return total


def choose_base_weights(base, want: str, dtype: torch.dtype, device: torch.device, ranks_here: int = 1
                        ) -> tuple[str, str]:
    """(resident | quantized, why): where the frozen base lives. resident: dequantized once to `dtype`
    (fastest per step); quantized: the GGUF's own blocks, dequantized a block at a time in forward and
    backward (memory ≈ the file). auto picks resident when it needs at most RESIDENT_SHARE of the free
    memory (shared by the processes training on this machine or GPU), quantized otherwise."""
    from .base import GGUFBase

    if want not in BASE_WEIGHTS:
        raise Lora2GGUFError(f"--base-weights {want}: expected one of {', '.join(BASE_WEIGHTS)}")
    if not isinstance(base, GGUFBase):
        if want == "quantized":
            raise Lora2GGUFError(f"{base.path}: --base-weights quantized needs a GGUF base (it keeps the file's "
                                 "quant blocks); a Hugging Face directory trains resident")
        return "resident", "a Hugging Face base"
    cost, free = resident_cost(base, dtype, device), available_memory(device) // max(1, ranks_here)
    gb = lambda n: f"{n / 1e9:.1f} GB"  # noqa: E731
    why = f"resident {str(dtype).removeprefix('torch.')} needs {gb(cost)}, {gb(free)} free on {device.type}"
    if want != "auto":
        return want, f"--base-weights {want}; {why}"
    return ("resident", why) if cost <= RESIDENT_SHARE * free else ("quantized", why)


def load_base_model(base, dtype: torch.dtype, device: torch.device, weights: str = "resident") -> nn.Module:
    """The frozen base for training, `weights` = "quantized": quant_weights.load_quantized_model; else
    Transformer.from_base, except that on CPU in fp32 the F32 tensors of a GGUF are used in place,
    straight from the file's memory map: the frozen base is never written, so it costs the file's
    pages and no copy (quantized tensors and those the arch transforms, e.g. permuted q/k rows, are still
    dequantized/copied). They are
    views of one tensor over the file, so that projections stored next to each other (gate/up) fuse
    without a copy (concat_rows)."""
    from .base import GGUFBase
    from .models.layers import Transformer

    if weights == "quantized":
        from .quant_weights import load_quantized_model

        return load_quantized_model(base, dtype, device)
    if not (isinstance(base, GGUFBase) and dtype == torch.float32 and device.type == "cpu"):
        return Transformer.from_base(base, dtype=dtype, device=device)
    import warnings

    from gguf import GGMLQuantizationType

    spec = base.spec
    arch = spec.arch_module
    with torch.device("meta"):
        model = Transformer(spec, None)
    state, mapped = {}, None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not writable.*")
        for name in base.hf_names():
            info = base.file.tensors[base.gguf_name(name)]
            if info.type == GGMLQuantizationType.F32 and arch.stored_as_hf(spec, name):
                raw = base.file.raw(info.name)
                if mapped is None:  # one tensor over the whole mapped file: neighbours (gate, up) share storage
                    whole = isinstance(raw.base, memoryview) and raw.base.nbytes == base.file.size
                    mapped = torch.frombuffer(raw.base, dtype=torch.uint8) if whole else False
                if mapped is not False:
                    state[name] = mapped[info.offset:info.offset + info.nbytes].view(torch.float32).view(info.shape)
                    continue
                arr = raw.view(np.float32).reshape(info.shape)
            else:
                arr = base.tensor(name)
            state[name] = torch.from_numpy(arr)
    model.load_state_dict(state, strict=True, assign=True)
    ff = base.rope_freqs()
    model.set_rope_factors(torch.from_numpy(ff) if ff is not None else None)
    return model.eval().requires_grad_(False)
