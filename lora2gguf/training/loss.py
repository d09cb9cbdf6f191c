"""The training loss: summed next-token cross-entropy, the frozen LM head applied to trained positions only,
a chunk of rows at a time (full-vocabulary logits never exist for the whole batch)."""

from __future__ import annotations

import torch
from torch import nn

from lora2gguf.weights.quantized import frozen_products


class HeadLoss(torch.autograd.Function):
    """Σ cross-entropy of (h @ headᵀ) over rows of h, a chunk of rows at a time. The head is frozen, so
    the only gradient is w.r.t. h: computed here, chunk by chunk, and kept (rows × width) for backward.
    Full-vocabulary logits never exist for the whole batch, unlike model(ids) followed by the loss: one
    chunk's buffer holds logits, then log-probabilities, then the gradient softmax − onehot, in place. With
    a soft-cap c (Gemma 2) the logits are c·tanh(z/c), as the model's forward caps them, and the gradient
    reaching z is multiplied by 1 − tanh²(z/c).

    A QuantWeight head is dequantized block by block on each pass over it. One pass makes a chunk's logits
    and the previous chunk's gradient together, so n chunks cost n + 1 passes instead of 2n. The products
    are the same GEMMs either way, so the bits are the same, and no buffer is added: the previous softmax
    is read from the logits buffer block by block before the next chunk's logits overwrite it."""

    @staticmethod
    def forward(ctx, h, head, targets, chunk: int, softcap: float = 0.0):
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        resident = isinstance(head, torch.Tensor)  # else a QuantWeight
        h = h if resident else h.to(head.dtype)
        grad = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        head = head.to(h.dtype) if resident else head
        buf = torch.empty(min(chunk, len(h)), head.shape[0], dtype=h.dtype, device=h.device)
        pending = None  # QuantWeight: (first row, softmax − onehot) of the chunk whose gradient is still to make
        with torch.autocast(h.device.type, enabled=False):  # in h's dtype (bf16 under autocast), as F.linear
            for i in range(0, len(h), chunk):
                n = len(h[i:i + chunk])
                if resident:
                    torch.mm(h[i:i + n], head.t(), out=buf[:n])
                else:
                    _quant_head_pass(head, grad, pending, h[i:i + n], buf[:n])
                    pending = None  # dropped before the next chunk's temporaries: no extra peak
                logp = buf[:n].float()
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
                    else:  # made in the next pass over the head
                        pending = i, p.to(h.dtype)
            if pending is not None:
                _quant_head_pass(head, grad, pending)
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, g):
        (grad,) = ctx.saved_tensors
        return grad * g, None, None, None, None


def _quant_head_pass(head, grad, pending, h=None, out=None):
    """h · headᵀ into `out`, and the pending chunk's gradient p · head into its rows of `grad`: one pass
    over the head's blocks."""
    i, p = pending if pending is not None else (0, None)
    g = frozen_products(head, h, out, p)
    if p is not None:
        grad[i:i + len(p)] = g


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
