"""The PyTorch forward's building blocks, with Hugging Face's module names
(model.layers.N.self_attn.q_proj, ...) so that PEFT target names and adapter keys apply as is. Each
architecture composes its decoder layer from these in its `build_layer` (models/<arch>.py).

Weights are in HF layout: rope is rotate-half on un-permuted q/k rows, which is what llama.cpp computes
with its own (permuted, for the llama family) layout.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lora2gguf.models.spec import ModelSpec


class RMSNorm(nn.Module):
    """x / rms(x) · (offset + w): offset 0 for llama, 1 for Gemma (whose checkpoints store w − 1)."""

    def __init__(self, dim: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.offset = eps, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()  # normalise in fp32 whatever the compute dtype, like llama.cpp and HF
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        w = self.weight.float() + self.offset if self.offset else self.weight.float()
        return (xf * w).to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Rope:
    """Rotary embedding over the first n_rot dimensions of each head (all of them unless partial). A plain
    object, not a module: model.to(bfloat16) must not round the frequencies, and it has no weights."""

    def __init__(self, n_rot: int, theta: float, linear_factor: float = 1.0, freq_factors: torch.Tensor | None = None):
        # on the CPU whatever the default device (it moves to the positions' device when called): under a
        # meta-device skeleton, torch's meta arange goes through torch._refs, whose first use imports
        # torch._dynamo (~1 s of every train, verify and imatrix merge)
        inv_freq = 1.0 / (theta ** (torch.arange(0, n_rot, 2, dtype=torch.float64, device="cpu") / n_rot))
        if freq_factors is not None:  # llama3-style rope_freqs tensor: llama.cpp divides theta by it
            inv_freq = inv_freq / freq_factors.double().cpu()
        self.inv_freq, self.pos_scale, self.n_rot = inv_freq.float(), 1.0 / linear_factor, n_rot

    def __call__(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.inv_freq.to(positions.device)
        ang = (positions.float()[..., None] * self.pos_scale) * inv_freq  # (B, T, n_rot/2)
        ang = torch.cat((ang, ang), dim=-1)
        return ang.cos()[:, None], ang.sin()[:, None]  # (B, 1, T, n_rot)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    n = cos.shape[-1]
    if n == x.shape[-1]:
        return x * cos.to(x.dtype) + rotate_half(x) * sin.to(x.dtype)
    rot, keep = x[..., :n], x[..., n:]  # partial rotary: the other dimensions pass through
    return torch.cat((rot * cos.to(x.dtype) + rotate_half(rot) * sin.to(x.dtype), keep), dim=-1)


class Attention(nn.Module):
    """Multi-head attention with GQA. Options an architecture sets: a fused q/k/v projection (qkv_proj),
    per-head q/k RMSNorm, its own scale, tanh soft-capping of the scores, a sliding window, its rope."""

    def __init__(self, spec: ModelSpec, *, fused_qkv: bool = False, norm_offset: float = 0.0, scale: float = 0.0,
                 softcap: float = 0.0, window: int = 0, rope_theta: float = 0.0, rope_linear: float = 0.0):
        super().__init__()
        self.n_head, self.n_head_kv, self.head_dim = spec.n_head, spec.n_head_kv, spec.head_dim
        q_out, kv_out = spec.n_head * spec.head_dim, spec.n_head_kv * spec.head_dim
        self.sizes = (q_out, kv_out, kv_out)
        if fused_qkv:
            self.qkv_proj = nn.Linear(spec.n_embd, q_out + 2 * kv_out, bias=spec.attn_bias)
        else:
            self.q_proj = nn.Linear(spec.n_embd, q_out, bias=spec.attn_bias)
            self.k_proj = nn.Linear(spec.n_embd, kv_out, bias=spec.attn_bias)
            self.v_proj = nn.Linear(spec.n_embd, kv_out, bias=spec.attn_bias)
        self.o_proj = nn.Linear(q_out, spec.n_embd, bias=False)
        if spec.qk_norm:
            self.q_norm = RMSNorm(spec.head_dim, spec.norm_eps, norm_offset)
            self.k_norm = RMSNorm(spec.head_dim, spec.norm_eps, norm_offset)
        self.scale = scale or 1.0 / math.sqrt(spec.head_dim)
        self.softcap, self.window = softcap, window
        # which rope this layer uses: (theta, linear factor); the model builds one Rope per distinct pair
        linear = spec.rope_scaling_factor if spec.rope_scaling_type == "linear" else 1.0
        self.rope_key = (rope_theta or spec.rope_theta, rope_linear or linear)

    def forward(self, x, cos, sin, mask):
        B, T, _ = x.shape
        if hasattr(self, "qkv_proj"):
            q, k, v = self.qkv_proj(x).split(self.sizes, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, T, self.n_head, self.head_dim)
        k = k.view(B, T, self.n_head_kv, self.head_dim)
        v = v.view(B, T, self.n_head_kv, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        rep = self.n_head // self.n_head_kv
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if self.softcap:  # SDPA cannot cap the scores: the same math written out
            s = (q @ k.transpose(-1, -2)) * self.scale
            s = torch.tanh(s / self.softcap) * self.softcap
            if mask is None:
                mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            s = s.masked_fill(~mask, float("-inf"))
            y = torch.softmax(s.float(), dim=-1).to(q.dtype) @ v
        elif mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


ACTIVATIONS = {"silu": F.silu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}


class MLP(nn.Module):
    """act(gate) · up, then down; gate and up as one fused projection (gate_up_proj, gate rows first) when
    the architecture stores them so."""

    def __init__(self, n_embd: int, n_ff: int, act: str, fused: bool = False):
        super().__init__()
        if fused:
            self.gate_up_proj = nn.Linear(n_embd, 2 * n_ff, bias=False)
        else:
            self.gate_proj = nn.Linear(n_embd, n_ff, bias=False)
            self.up_proj = nn.Linear(n_embd, n_ff, bias=False)
        self.down_proj = nn.Linear(n_ff, n_embd, bias=False)
        self.act = ACTIVATIONS[act]

    def forward(self, x):
        if hasattr(self, "gate_up_proj"):
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(self.act(gate) * up)


class ExpertLinear(nn.Module):
    """n_expert stacked weights (n_expert, out, in), as one GGUF *_exps tensor: expert e computes x·W[e]ᵀ."""

    def __init__(self, n_expert: int, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_expert, n_out, n_in))

    def forward(self, x: torch.Tensor, e: int) -> torch.Tensor:
        return F.linear(x, self.weight[e])


class Experts(nn.Module):
    """The SwiGLU experts of a MoE layer: down(act(gate(x)) · up(x)) with expert e's weights."""

    def __init__(self, n_expert: int, n_embd: int, n_ff: int, act: str):
        super().__init__()
        self.gate_proj = ExpertLinear(n_expert, n_embd, n_ff)
        self.up_proj = ExpertLinear(n_expert, n_embd, n_ff)
        self.down_proj = ExpertLinear(n_expert, n_ff, n_embd)
        self.act = ACTIVATIONS[act]

    def forward(self, x: torch.Tensor, e: int) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x, e)) * self.up_proj(x, e), e)


class MoE(nn.Module):
    """A mixture-of-experts MLP with a softmax router, as transformers' Qwen3MoeSparseMoeBlock (and Mixtral's)
    computes it and llama.cpp's build_moe_ffn: router probabilities softmax(gate(x)) in float32, the top
    n_used experts per token, their probabilities renormalised to sum to 1 when norm_topk, and the experts'
    outputs summed with those weights (each expert over its tokens, in expert order, as transformers adds)."""

    def __init__(self, n_embd: int, n_ff: int, n_expert: int, n_used: int, norm_topk: bool, act: str):
        super().__init__()
        self.gate = nn.Linear(n_embd, n_expert, bias=False)
        self.experts = Experts(n_expert, n_embd, n_ff, act)
        self.n_used, self.norm_topk = n_used, norm_topk

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(expert ids, their weights), each (tokens, n_used), for x (tokens, n_embd)."""
        probs = torch.softmax(self.gate(x).float(), dim=-1)
        weights, ids = torch.topk(probs, self.n_used, dim=-1)
        if self.norm_topk:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return ids, weights.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        ids, weights = self.route(flat)
        out = torch.zeros_like(flat)
        for e in ids.unique().tolist():
            tok, k = torch.where(ids == e)
            out.index_add_(0, tok, self.experts(flat[tok], e) * weights[tok, k, None])
        return out.view(x.shape)


class SharedExpertMoE(MoE):
    """MoE plus an always-on SwiGLU expert scaled per token by sigmoid(shared_expert_gate(x)), as transformers'
    Qwen2MoeSparseMoeBlock and llama.cpp's qwen2moe (ffn_*_shexp, ffn_gate_inp_shexp) compute it."""

    def __init__(self, n_embd: int, n_ff: int, n_expert: int, n_used: int, norm_topk: bool, act: str,
                 n_ff_shared: int):
        super().__init__(n_embd, n_ff, n_expert, n_used, norm_topk, act)
        self.shared_expert = MLP(n_embd, n_ff_shared, act)
        self.shared_expert_gate = nn.Linear(n_embd, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)


class DecoderLayer(nn.Module):
    """x + attn_out(attn(attn_in(x))), then the same for the MLP. The norms are registered under the names
    the architecture gives them (llama's post_attention_layernorm is the MLP's input norm, Gemma's the
    attention's output norm); a missing *_out norm is the identity."""

    def __init__(self, norms: dict[str, nn.Module], attn_in: str, mlp_in: str, self_attn: nn.Module,
                 mlp: nn.Module, attn_out: str | None = None, mlp_out: str | None = None):
        super().__init__()
        for name, norm in norms.items():
            self.add_module(name, norm)
        self.self_attn, self.mlp = self_attn, mlp
        self.roles = (attn_in, attn_out, mlp_in, mlp_out)

    def _norm(self, name: str | None, x):
        return x if name is None else getattr(self, name)(x)

    def forward(self, x, cos, sin, mask):
        attn_in, attn_out, mlp_in, mlp_out = self.roles
        x = x + self._norm(attn_out, self.self_attn(self._norm(attn_in, x), cos, sin, mask))
        return x + self._norm(mlp_out, self.mlp(self._norm(mlp_in, x)))


class Embedding(nn.Embedding):
    """The token embedding, also callable as the output head of a tied model (as mlx-lm's `as_linear`): the
    model asks the module for logits, never what storage its weight has (weights.quantized.QuantEmbedding
    answers the same call from GGUF blocks)."""

    def as_linear(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def reset_parameters(self) -> None:
        # A skeleton on the meta device, for weights assigned after: torch's meta normal_ goes through
        # torch._refs, whose first use imports torch._dynamo (as Rope's arange would)
        if not self.weight.is_meta:
            super().reset_parameters()


class Decoder(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        arch = spec.arch_module
        self.embed_tokens = Embedding(spec.n_vocab, spec.n_embd)
        self.layers = nn.ModuleList(arch.build_layer(spec, i) for i in range(spec.n_layer))
        self.norm = RMSNorm(spec.n_embd, spec.norm_eps, arch.norm_offset)


class Transformer(nn.Module):
    """Decoder-only LM. `forward(ids)` → logits (B, T, vocab) in float32."""

    def __init__(self, spec: ModelSpec, freq_factors: torch.Tensor | None = None):
        super().__init__()
        self.spec = spec
        self.model = Decoder(spec)
        if not spec.tied_embeddings:
            self.lm_head = nn.Linear(spec.n_embd, spec.n_vocab, bias=False)
        self.set_rope_factors(freq_factors)
        arch = spec.arch_module
        self.embed_scale, self.final_softcap = arch.embed_scale(spec), arch.final_softcap(spec)
        self.grad_checkpointing = False

    def set_rope_factors(self, freq_factors: torch.Tensor | None) -> None:
        """One Rope per distinct (theta, linear factor) the layers use (Gemma 3: local and global)."""
        keys = {layer.self_attn.rope_key for layer in self.model.layers}
        self.ropes = {k: Rope(self.spec.n_rot, k[0], k[1], freq_factors) for k in keys}

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.cap_logits(self.head(self.hidden_states(ids, attention_mask)).float())

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """The output projection: lm_head, or the embedding as a linear layer when they are tied."""
        return self.model.embed_tokens.as_linear(x) if self.spec.tied_embeddings else self.lm_head(x)

    def cap_logits(self, logits: torch.Tensor) -> torch.Tensor:
        if self.final_softcap:
            return torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits

    def masks(self, T: int, attention_mask: torch.Tensor | None, device) -> dict[int, torch.Tensor | None]:
        """window (0: none) → boolean mask (B or 1, 1, T, T), None where plain causal attention does."""
        out = {}
        for w in {layer.self_attn.window for layer in self.model.layers}:
            if attention_mask is None and (not w or T <= w):
                out[w] = None
                continue
            i = torch.arange(T, device=device)
            allowed = i[:, None] >= i[None, :]
            if w:  # llama.cpp masks a key when q − k ≥ n_swa (as transformers' sliding window does)
                allowed = allowed & (i[:, None] - i[None, :] < w)
            mask = allowed[None, None]
            if attention_mask is not None:  # keys at padding are masked out; no row fully masked
                mask = (mask & attention_mask.bool()[:, None, None, :]) | torch.eye(T, dtype=torch.bool, device=device)
            out[w] = mask
        return out

    def hidden_states(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Everything up to and including the final norm (training applies the head to trained rows only)."""
        B, T = ids.shape
        x = self.model.embed_tokens(ids)
        if self.embed_scale != 1.0:  # in the embedding's dtype, as transformers' Gemma does
            x = x * torch.tensor(self.embed_scale, dtype=x.dtype)
        if attention_mask is None:
            positions = torch.arange(T, device=ids.device).expand(B, T)
        else:  # left or right padding: positions count real tokens
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        rope = {k: r(positions) for k, r in self.ropes.items()}
        masks = self.masks(T, attention_mask, ids.device)
        for layer in self.model.layers:
            cos, sin = rope[layer.self_attn.rope_key]
            mask = masks[layer.self_attn.window]
            if self.grad_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask)
        return self.model.norm(x)

    @classmethod
    def from_base(cls, base, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        """Build from an opened base (GGUFBase or HFBase): GGUF weights dequantized, in HF layout."""
        with torch.device("meta"):
            model = cls(base.spec, None)
        state = {name: torch.from_numpy(base.tensor(name)) for name in base.hf_names()}
        model.load_state_dict(state, strict=True, assign=True)
        ff = base.rope_freqs()
        model.set_rope_factors(torch.from_numpy(ff) if ff is not None else None)
        return model.to(device=device, dtype=dtype).eval().requires_grad_(False)
