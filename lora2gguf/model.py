"""The reference model: a small Llama-family transformer in PyTorch whose module names are the Hugging
Face ones (model.layers.N.self_attn.q_proj, ...), so PEFT target names and adapter keys apply as is.

Covers llama (Mistral, SmolLM, TinyLlama), qwen2 (q/k/v bias) and qwen3 (per-head q/k RMSNorm).
Weights are in HF layout: rope is rotate-half on un-permuted q/k rows, which is what llama.cpp computes
with its own (permuted) layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import ModelSpec


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()  # normalise in fp32 whatever the compute dtype, like llama.cpp and HF
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Rope(nn.Module):
    def __init__(self, spec: ModelSpec, freq_factors: torch.Tensor | None = None):
        super().__init__()
        d = spec.head_dim
        inv_freq = 1.0 / (spec.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
        if freq_factors is not None:  # llama3-style rope_freqs tensor: llama.cpp divides theta by it
            inv_freq = inv_freq / freq_factors.double()
        self.pos_scale = 1.0 / spec.rope_scaling_factor if spec.rope_scaling_type == "linear" else 1.0
        # A plain attribute, not a buffer: model.to(bfloat16) must not round the frequencies.
        self.inv_freq = inv_freq.float()

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.inv_freq.to(positions.device)
        ang = (positions.float()[..., None] * self.pos_scale) * inv_freq  # (B, T, d/2)
        ang = torch.cat((ang, ang), dim=-1)
        return ang.cos()[:, None], ang.sin()[:, None]  # (B, 1, T, d)


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.n_head, self.n_head_kv, self.head_dim = spec.n_head, spec.n_head_kv, spec.head_dim
        q_out, kv_out = spec.n_head * spec.head_dim, spec.n_head_kv * spec.head_dim
        self.q_proj = nn.Linear(spec.n_embd, q_out, bias=spec.attn_bias)
        self.k_proj = nn.Linear(spec.n_embd, kv_out, bias=spec.attn_bias)
        self.v_proj = nn.Linear(spec.n_embd, kv_out, bias=spec.attn_bias)
        self.o_proj = nn.Linear(q_out, spec.n_embd, bias=False)
        if spec.qk_norm:
            self.q_norm = RMSNorm(spec.head_dim, spec.norm_eps)
            self.k_norm = RMSNorm(spec.head_dim, spec.norm_eps)

    def forward(self, x, cos, sin, mask):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_head_kv, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_head_kv, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q = q * cos.to(q.dtype) + rotate_half(q) * sin.to(q.dtype)
        k = k * cos.to(k.dtype) + rotate_half(k) * sin.to(k.dtype)
        rep = self.n_head // self.n_head_kv
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.gate_proj = nn.Linear(spec.n_embd, spec.n_ff, bias=False)
        self.up_proj = nn.Linear(spec.n_embd, spec.n_ff, bias=False)
        self.down_proj = nn.Linear(spec.n_ff, spec.n_embd, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.input_layernorm = RMSNorm(spec.n_embd, spec.norm_eps)
        self.self_attn = Attention(spec)
        self.post_attention_layernorm = RMSNorm(spec.n_embd, spec.norm_eps)
        self.mlp = MLP(spec)

    def forward(self, x, cos, sin, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.embed_tokens = nn.Embedding(spec.n_vocab, spec.n_embd)
        self.layers = nn.ModuleList(DecoderLayer(spec) for _ in range(spec.n_layer))
        self.norm = RMSNorm(spec.n_embd, spec.norm_eps)


class Transformer(nn.Module):
    """Decoder-only LM. `forward(ids)` → logits (B, T, vocab) in float32."""

    def __init__(self, spec: ModelSpec, freq_factors: torch.Tensor | None = None):
        super().__init__()
        self.spec = spec
        self.model = Decoder(spec)
        if not spec.tied_embeddings:
            self.lm_head = nn.Linear(spec.n_embd, spec.n_vocab, bias=False)
        self.rope = Rope(spec, freq_factors)
        self.grad_checkpointing = False

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.hidden_states(ids, attention_mask)
        head = self.model.embed_tokens.weight if self.spec.tied_embeddings else self.lm_head.weight
        return F.linear(x, head).float()

    def hidden_states(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Everything up to and including the final norm (training applies the head to trained rows only)."""
        B, T = ids.shape
        x = self.model.embed_tokens(ids)
        if attention_mask is None:
            positions = torch.arange(T, device=ids.device).expand(B, T)
            mask = None
        else:  # left or right padding: positions count real tokens, keys at padding are masked out
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            causal = torch.ones(T, T, dtype=torch.bool, device=ids.device).tril()
            mask = causal[None, None] & attention_mask.bool()[:, None, None, :]
            mask = mask | torch.eye(T, dtype=torch.bool, device=ids.device)  # no fully masked rows
        cos, sin = self.rope(positions)
        for layer in self.model.layers:
            if self.grad_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask)
        return self.model.norm(x)

    @classmethod
    def from_base(cls, base, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        """Build from an opened base (GGUFBase or HFBase): GGUF weights dequantized, in HF layout."""
        ff = base.rope_freqs()
        with torch.device("meta"):
            model = cls(base.spec, None)
        state = {name: torch.from_numpy(base.tensor(name)) for name in base.hf_names()}
        model.load_state_dict(state, strict=True, assign=True)
        model.rope = Rope(base.spec, torch.from_numpy(ff) if ff is not None else None)
        return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


# -- Training-time forms of the computations above ------------------------------------------------------
# The same math as RMSNorm, rope and the MLP's activation, as autograd functions that make fewer passes
# over memory and keep less for backward than autograd through the modules would. Only training uses them
# (lora.TrainingLayer); the reference forward above, which verify and the KL tests measure, does not.

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
        torch.mul(g, s, out=grad[..., f:])
        torch.ops.aten.silu_backward.grad_input(g * h[..., f:], h[..., :f], grad_input=grad[..., :f])
        return grad
