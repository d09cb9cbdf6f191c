"""The fused training form of a pre-norm SwiGLU decoder layer (llama, qwen2, qwen3): the same parameters and
math as the plain layer (models/layers.py), in fewer and larger steps, with autograd functions that make
fewer passes over memory and keep less for backward than autograd through the modules would. Only training
uses it; an architecture opts in with `fused_training` (models/arch.py), every other one trains on its
plain layer, whose LoRALinear modules still compute each projection as one LoRAProjection.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lora2gguf.models.layers import DecoderLayer
from lora2gguf.training.lora import LoRALinear, project
from lora2gguf.weights.quantized import QuantStack, QuantWeight


def rms_forward(x: torch.Tensor, w: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm.forward's arithmetic (same operations, same order; fp32 at least) → (output, 1/rms)."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * r).mul_(w.to(xf.dtype)).to(x.dtype), r


def rms_backward(g: torch.Tensor, x: torch.Tensor, w: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """d/dx of x·r·w with r = (mean(x²) + eps)^-½: r·(g⊙w) − x·r³·⟨g⊙w, x⟩/D."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    gw = g.to(xf.dtype) * w.to(xf.dtype)
    c = (gw * xf).sum(-1, keepdim=True).mul_(r.pow(3)).div_(x.shape[-1])
    return gw.mul_(r).addcmul_(xf, c, value=-1).to(g.dtype)


class RMSNormFunction(torch.autograd.Function):
    """RMSNorm with a frozen weight: keeps x and 1/rms (not the four intermediates autograd would)."""

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        y, r = rms_forward(x, weight, eps)
        ctx.save_for_backward(x, weight, r)
        return y

    @staticmethod
    def backward(ctx, g):
        x, weight, r = ctx.saved_tensors
        return rms_backward(g, x, weight, r), None, None


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: int, out: torch.Tensor) -> torch.Tensor:
    """x·cos + rotate_half(x)·sin (sign 1) or its transpose (sign -1, the gradient), into `out`, with cos and
    sin given for one half of the head (the other half repeats them)."""
    h = x.shape[-1] // 2
    x1, x2, o1, o2 = x[..., :h], x[..., h:], out[..., :h], out[..., h:]
    torch.mul(x1, cos, out=o1).addcmul_(x2, sin, value=-sign)
    torch.mul(x2, cos, out=o2).addcmul_(x1, sin, value=sign)
    return out


class RopeQKV(torch.autograd.Function):
    """The output of one fused q/k/v projection, (B, T, (H + 2·Hkv)·D), → rotated q (B, H, T, D), rotated k
    and v (B, Hkv, T, D), each contiguous, as Attention.forward computes them (with qwen3's per-head q/k
    RMSNorm before rope when q_norm/k_norm are given). Backward writes the projection's gradient in one
    tensor, where autograd through slices would zero-fill one per slice and add them."""

    @staticmethod
    def forward(ctx, qkv, cos, sin, n_head: int, n_head_kv: int, q_norm, k_norm, eps: float):
        B, T, _ = qkv.shape
        heads = qkv.view(B, T, n_head + 2 * n_head_kv, -1).transpose(1, 2)
        cos, sin = cos.to(qkv.dtype), sin.to(qkv.dtype)
        out, rs = [], []
        for x, w in ((heads[:, :n_head], q_norm), (heads[:, n_head:n_head + n_head_kv], k_norm)):
            r = None
            if w is not None:
                x, r = rms_forward(x, w, eps)
            out.append(rotate(x, cos, sin, 1, torch.empty(x.shape, dtype=x.dtype, device=x.device)))
            rs.append(r)
        out.append(heads[:, n_head + n_head_kv:].contiguous())
        ctx.save_for_backward(cos, sin, qkv if q_norm is not None else None, q_norm, k_norm, *rs)
        ctx.n_head, ctx.n_head_kv = n_head, n_head_kv
        return tuple(out)

    @staticmethod
    def backward(ctx, gq, gk, gv):
        cos, sin, qkv, q_norm, k_norm, rq, rk = ctx.saved_tensors
        H, Hkv = ctx.n_head, ctx.n_head_kv
        B, _, T, D = gq.shape
        grad = torch.empty(B, T, H + 2 * Hkv, D, dtype=gq.dtype, device=gq.device)
        gh = grad.transpose(1, 2)
        for (a, b), g, w, r in (((0, H), gq, q_norm, rq), ((H, H + Hkv), gk, k_norm, rk)):
            if w is None:
                rotate(g, cos, sin, -1, gh[:, a:b])
            else:
                x = qkv.view(B, T, H + 2 * Hkv, D).transpose(1, 2)[:, a:b]
                gh[:, a:b] = rms_backward(rotate(g, cos, sin, -1, torch.empty_like(g)), x, w, r)
        gh[:, H + Hkv:] = gv
        return grad.view(B, T, -1), None, None, None, None, None, None, None


class SwiGLU(torch.autograd.Function):
    """silu(gate)·up on one fused gate/up projection (…, 2·F) → (…, F), as MLP.forward computes it; backward
    writes the projection's gradient in one tensor (autograd through the two slices would zero-fill two
    and add them)."""

    @staticmethod
    def forward(ctx, h):
        f = h.shape[-1] // 2
        s = F.silu(h[..., :f])
        ctx.save_for_backward(h, s)
        return s * h[..., f:]

    @staticmethod
    def backward(ctx, g):
        h, s = ctx.saved_tensors
        f = h.shape[-1] // 2
        grad = torch.empty_like(h)
        gate, up = grad[..., :f], grad[..., f:]
        torch.mul(g, s, out=up)
        # silu's gradient in place over g·up: one 25 MB temporary less per layer at 4 × 1024 tokens (SmolLM2)
        torch.ops.aten.silu_backward.grad_input(torch.mul(g, h[..., f:], out=gate), h[..., :f], grad_input=gate)
        return grad


def concat_rows(ts: list[torch.Tensor]) -> torch.Tensor:
    """The row blocks `ts` as one matrix: a view when they already lie so in one storage (F32 tensors used
    in place from a GGUF, stored in this order), else a copy."""
    t0, rows = ts[0], sum(t.shape[0] for t in ts)
    st = t0.untyped_storage()
    if all(t.is_contiguous() and t.dtype == t0.dtype and t.shape[1:] == t0.shape[1:] for t in ts) and all(
            b.untyped_storage().data_ptr() == st.data_ptr() and b.storage_offset() == a.storage_offset() + a.numel()
            for a, b in zip(ts, ts[1:])):
        return torch.empty(0, dtype=t0.dtype, device=t0.device).set_(st, t0.storage_offset(), (rows, *t0.shape[1:]))
    return torch.cat(ts)


class Projection:
    """Projections of one layer that read the same input, computed as one: their frozen weights
    concatenated by rows (each module's weight and bias then become views of the block: nothing is
    duplicated, and the modules compute as before), each one's LoRA, if it has one, on its columns."""

    def __init__(self, modules: list[nn.Module]):
        linears = [m.base_layer if isinstance(m, LoRALinear) else m for m in modules]
        quantized = isinstance(linears[0].weight, QuantWeight)  # a frozen base kept in its GGUF encoding
        self.weight = QuantStack([lin.weight for lin in linears]) if quantized else concat_rows([lin.weight for lin in linears])
        biases = [lin.bias for lin in linears]
        self.bias = concat_rows(biases) if biases[0] is not None else None
        self.loras, a = [], 0
        for m, lin in zip(modules, linears):
            b = a + lin.out_features
            if not quantized:
                lin.weight = nn.Parameter(self.weight[a:b], requires_grad=False)
            if self.bias is not None:
                lin.bias = nn.Parameter(self.bias[a:b], requires_grad=False)
            if isinstance(m, LoRALinear):
                self.loras.append((m, a, b))
            a = b

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return project(x, self.weight, self.bias, self.loras, residual)


class TrainingLayer(DecoderLayer):
    """A DecoderLayer computed for training: its parameters and its math, in fewer and larger steps. q/k/v
    run as one GEMM against their concatenated frozen weights, gate/up as another (SmolLM2's GQA k/v are
    576×192: with 2 threads on a busy 2-core machine one 576×960 GEMM took 25-35% less time than three);
    each LoRA is added into its GEMM's output and the residual by the o_proj/down_proj GEMMs; RMSNorm,
    rope and SwiGLU are single autograd functions; attention reads k/v once per group (SDPA's enable_gqa,
    no repeat_interleave). fuse_for_training makes a model's layers these, in place: module names,
    parameters and the adapter the LoRALinear modules save do not change."""

    qkv: Projection
    o: Projection
    gate_up: Projection
    down: Projection

    def forward(self, x, cos, sin, mask):
        attn, (B, T, _) = self.self_attn, x.shape
        norm1, norm2 = self.input_layernorm, self.post_attention_layernorm
        qk = (attn.q_norm.weight, attn.k_norm.weight, attn.q_norm.eps) if hasattr(attn, "q_norm") else (None, None, 0.0)
        half = cos.shape[-1] // 2  # cos/sin repeat over the two halves of a head
        qkv = self.qkv(RMSNormFunction.apply(x, norm1.weight, norm1.eps))
        q, k, v = RopeQKV.apply(qkv, cos[..., :half], sin[..., :half], attn.n_head, attn.n_head_kv, *qk)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
        x = self.o(y.transpose(1, 2).reshape(B, T, -1), residual=x)
        return self.down(SwiGLU.apply(self.gate_up(RMSNormFunction.apply(x, norm2.weight, norm2.eps))), residual=x)


def fuse_for_training(model: nn.Module) -> bool:
    """Turn each layer of `model` (after inject_lora, on its device) into a TrainingLayer, where its
    architecture computes a pre-norm SwiGLU layer with full-width rope (`fused_training`); else leave the
    plain layers, whose LoRALinear modules compute each projection as one LoRAProjection. Whether it
    fused."""
    spec = model.spec
    if not (spec.arch_module.fused_training and spec.n_rot == spec.head_dim):
        return False
    for layer in model.model.layers:
        at, mlp = layer.self_attn, layer.mlp
        # an arch that stores q/k/v (gate/up) as one projection (phi3) gives the block as it is
        layer.qkv = Projection([at.qkv_proj] if hasattr(at, "qkv_proj") else [at.q_proj, at.k_proj, at.v_proj])
        layer.o = Projection([at.o_proj])
        layer.gate_up = Projection([mlp.gate_up_proj] if hasattr(mlp, "gate_up_proj") else [mlp.gate_proj, mlp.up_proj])
        layer.down = Projection([mlp.down_proj])
        layer.__class__ = TrainingLayer
    return True
