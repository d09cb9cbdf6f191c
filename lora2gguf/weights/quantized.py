"""The frozen base kept in its GGUF encoding: QLoRA on the exact weights llama.cpp serves.

A QuantWeight is a 2-D weight held as the file's own quant blocks (rows of bytes, a view of the memory map
on CPU, a copy of those bytes on CUDA). Nothing dequantized is kept: x·Wᵀ and g·W (the input gradient)
dequantize W a block of rows at a time (weights.dequantize, bit-identical to gguf-py), use it and drop it, so a
step costs the file's pages plus one block, not an fp32 copy of the model (32 GB for an 8B). The weight
gets no gradient. QuantLinear and QuantEmbedding put such weights where the PyTorch model has
nn.Linear / nn.Embedding, under the same names, so LoRA injection, the fused training layer, the loss and
verify's reference (parity.reference) all work on either form.

`load_quantized_model` builds the PyTorch Transformer that way; `frozen_linear` / `frozen_grad_input`
are the two products every caller uses, for a resident tensor or a QuantWeight alike; `frozen_products`
does both in one pass over a QuantWeight's blocks (the loss's head).
"""

from __future__ import annotations

import threading
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from torch import nn

from lora2gguf.models.layers import Transformer
from lora2gguf.weights.dequantize import SUPPORTED, dequantize

CHUNK_BYTES = 64 << 20  # dequantized rows per block: big enough for an efficient GEMM, small beside the file


class QuantWeight:
    """W (rows × n_cols) as GGUF quant blocks; `perm` maps HF row i to stored row perm[i] (llama's q/k rows
    are stored permuted). Read-only: `raw` may be a view of a read-only memory map."""

    def __init__(self, raw: torch.Tensor, qtype, n_cols: int, perm: torch.Tensor | None = None,
                 dtype: torch.dtype = torch.float32):
        self.raw, self.qtype, self.perm, self.dtype = raw, qtype, perm, dtype
        self.shape = torch.Size((raw.shape[0], n_cols))
        self.block = max(1, CHUNK_BYTES // (4 * n_cols))

    @property
    def device(self) -> torch.device:
        return self.raw.device

    def rows(self, a: int = 0, b: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """W[a:b] dequantized, in self.dtype (into `out`, (b - a) · n_cols values, if given)."""
        b = self.shape[0] if b is None else b
        raw = self.raw[a:b] if self.perm is None else self.raw[self.perm[a:b]]
        return dequantize(raw, self.qtype, self.shape[1], self.dtype, out)

    def take(self, ids: torch.Tensor) -> torch.Tensor:
        """W[ids] (an embedding lookup): only the rows asked for are dequantized."""
        idx = ids.reshape(-1).to(self.raw.device)
        if self.perm is not None:
            idx = self.perm[idx]
        return dequantize(self.raw[idx], self.qtype, self.shape[1], self.dtype).view(*ids.shape, self.shape[1])

    def blocks(self):
        for a in range(0, self.shape[0], self.block):
            yield a, min(a + self.block, self.shape[0])

    def to(self, device=None, dtype: torch.dtype | None = None) -> "QuantWeight":
        perm = self.perm.to(device) if (self.perm is not None and device is not None) else self.perm
        return QuantWeight(self.raw.to(device) if device is not None else self.raw, self.qtype, self.shape[1], perm,
                           dtype or self.dtype)


class QuantStack:
    """QuantWeights stacked by rows (q/k/v, gate/up: one projection of the fused training layer), without
    copying them: their types may differ (Q4_K_M stores some v/down rows in Q6_K)."""

    def __init__(self, parts: list[QuantWeight]):
        self.parts, self.dtype = parts, parts[0].dtype
        self.shape = torch.Size((sum(p.shape[0] for p in parts), parts[0].shape[1]))
        self.device = parts[0].device


_SCRATCH = threading.local()


def _scratch(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """n values of one buffer per thread, dtype and device, kept between calls: a block dequantized into
    fresh memory spends most of its time in page faults (Q4_K 4096×4096: 17.8 ms fresh, 2.8 ms reused;
    `scripts/bench_dequantize.py`)."""
    key = (dtype, device)
    bufs = _SCRATCH.__dict__.setdefault("bufs", {})  # this thread's
    buf = bufs.get(key)
    if buf is None or buf.numel() < n:
        buf = bufs[key] = torch.empty(n, dtype=dtype, device=device)
    return buf[:n]


def _row_blocks(w):
    """(first row, last row, that block dequantized) over a QuantWeight or a QuantStack. Every block is
    the same reused buffer (on the CPU): the caller is done with a block when it asks for the next."""
    offset = 0
    for part in (w.parts if isinstance(w, QuantStack) else [w]):
        if part.qtype == GGMLQuantizationType.F32 and part.perm is None and part.dtype == torch.float32:
            # F32 rows are the mapped file's bytes as they are: read in place, not copied (verify's reference
            # multiplies Gemma 3's 671 MB F32 head once per block of positions)
            yield offset, offset + part.shape[0], part.raw.view(torch.float32)
            offset += part.shape[0]
            continue
        for a, b in part.blocks():
            out = _scratch((b - a) * part.shape[1], part.dtype, part.device) if part.device.type == "cpu" else None
            yield offset + a, offset + b, part.rows(a, b, out)
        offset += part.shape[0]


def frozen_linear(x2: torch.Tensor, w, bias: torch.Tensor | None = None, out: torch.Tensor | None = None):
    """x2 (N × in) · wᵀ (+ bias), w a tensor, a QuantWeight or a QuantStack, in w's dtype."""
    if isinstance(w, torch.Tensor):
        return F.linear(x2, w, bias)
    y = torch.empty(x2.shape[0], w.shape[0], dtype=w.dtype, device=x2.device) if out is None else out
    frozen_products(w, x2, y)
    if bias is not None:
        y += bias
    return y


def frozen_grad_input(g2: torch.Tensor, w) -> torch.Tensor:
    """g2 (N × out) · w: the gradient reaching a frozen linear layer's input."""
    if isinstance(w, torch.Tensor):
        return g2 @ w
    return frozen_products(w, g2=g2)


def frozen_products(w, x2: torch.Tensor | None = None, out: torch.Tensor | None = None,
                    g2: torch.Tensor | None = None) -> torch.Tensor | None:
    """x2 · wᵀ into `out`, and g2 · w (returned), w a QuantWeight or a QuantStack: one pass over its row
    blocks, each dequantized once for both products, each product the same GEMMs in the same order either
    way. A block's columns of g2 are read before the same columns of `out` are written, so `out` may be
    g2's memory (the loss's logits buffer holds one chunk's softmax while the next chunk's logits fill it)."""
    gx = None
    for a, b, block in _row_blocks(w):
        if g2 is not None:
            gx = g2[:, a:b] @ block if gx is None else gx.addmm_(g2[:, a:b], block)
        if x2 is not None:
            torch.mm(x2, block.t(), out=out[:, a:b])
    return gx


class QuantMatmul(torch.autograd.Function):
    """x·Wᵀ + bias with W a QuantWeight: dequantized again in backward for the input gradient (nothing kept)."""
    @staticmethod
    def forward(ctx, x, bias, w: QuantWeight):
        ctx.w = w
        with torch.autocast(x.device.type, enabled=False):
            y = frozen_linear(x.reshape(-1, x.shape[-1]).to(w.dtype), w, bias)
        return y.view(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, gy):
        w = ctx.w
        gx = None
        if ctx.needs_input_grad[0]:
            with torch.autocast(gy.device.type, enabled=False):
                gx = frozen_grad_input(gy.reshape(-1, gy.shape[-1]).to(w.dtype), w).view(*gy.shape[:-1], w.shape[1])
        return gx, None, None


class QuantLinear(nn.Linear):
    """nn.Linear whose frozen weight is a QuantWeight (not a parameter: it has no gradient and no state)."""

    def __init__(self, weight: QuantWeight, bias: torch.Tensor | None = None):
        nn.Module.__init__(self)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.weight = weight
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return QuantMatmul.apply(x, self.bias, self.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.weight.qtype.name}"


class QuantEmbedding(nn.Module):
    def __init__(self, weight: QuantWeight):
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight.shape
        self.weight = weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight.take(ids)

    def as_linear(self, x: torch.Tensor) -> torch.Tensor:
        """The tied output head: x · Wᵀ from the blocks (models.layers.Embedding.as_linear's counterpart)."""
        return QuantMatmul.apply(x, None, self.weight)


def quant_weight(base, hf_name: str, dtype: torch.dtype, device: torch.device | str = "cpu") -> QuantWeight | None:
    """The base's 2-D tensor `hf_name` as a QuantWeight over the mapped file, or None where it cannot be one:
    a type weights.dequantize does not read, or a value transform other than a row permutation."""
    spec, arch = base.spec, base.spec.arch_module
    info = base.file.tensors[base.gguf_name(hf_name)]
    if len(info.shape) != 2 or info.type not in SUPPORTED:
        return None
    permuted = arch.permutes_rows(spec, hf_name)
    if not (permuted or arch.stored_as_hf(spec, hf_name)):
        return None
    rows = info.shape[0]
    with warnings.catch_warnings():  # the map is read-only; QuantWeight never writes into it
        warnings.filterwarnings("ignore", message=".*not writable.*")
        raw = torch.from_numpy(base.file.raw(info.name).reshape(rows, -1))
    perm = None
    if permuted:  # HF row i is stored at row perm[i]
        perm = torch.from_numpy(np.ascontiguousarray(arch.rows_from_gguf(spec, hf_name, np.arange(rows))))
    w = QuantWeight(raw, info.type, info.shape[1], perm, dtype)
    return w.to(device) if torch.device(device).type != "cpu" else w


def load_quantized_model(base, dtype: torch.dtype, device: torch.device):
    """The PyTorch Transformer on a GGUF base with every 2-D weight (projections, embedding, head) a
    QuantWeight; norms and anything weights.dequantize cannot read are resident, in `dtype`."""
    with torch.device("meta"):
        model = Transformer(base.spec, None)
    state = {}
    for name in base.hf_names():
        mod_name, attr = name.rsplit(".", 1)
        module = model.get_submodule(mod_name)
        w = quant_weight(base, name, dtype, device) if attr == "weight" else None
        if w is not None and isinstance(module, (nn.Linear, nn.Embedding)):
            parent, child = mod_name.rsplit(".", 1) if "." in mod_name else ("", mod_name)
            bias_name = f"{mod_name}.bias"
            bias = torch.from_numpy(base.tensor(bias_name)).to(device, dtype) if bias_name in base.hf_names() else None
            new = QuantLinear(w, bias) if isinstance(module, nn.Linear) else QuantEmbedding(w)
            setattr(model.get_submodule(parent) if parent else model, child, new)
        elif not (attr == "bias" and isinstance(module, QuantLinear)):
            state[name] = torch.from_numpy(base.tensor(name)).to(device=device, dtype=dtype)
    for name, t in state.items():
        mod_name, attr = name.rsplit(".", 1)
        module = model.get_submodule(mod_name)
        if not isinstance(module, QuantLinear) or attr != "bias":
            setattr(module, attr, nn.Parameter(t, requires_grad=False))
    ff = base.rope_freqs()
    model.set_rope_factors(torch.from_numpy(ff) if ff is not None else None)
    return model.eval().requires_grad_(False)
