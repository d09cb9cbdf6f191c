"""The loss's head (training.loss.HeadLoss) on a quantized head: one pass over the head's blocks makes a
chunk's logits and the previous chunk's gradient, and the loss and gradient keep the bits of the former
order (per chunk, one pass for the logits, then one for the gradient)."""

from __future__ import annotations

import pytest
import torch

from conftest import FIXTURES
import lora2gguf.weights.quantized as qw
from lora2gguf.training.loss import HeadLoss
from lora2gguf.weights.base_model import GGUFBase


def _former(h, w, targets, chunk, softcap):
    """HeadLoss's arithmetic before the passes were shared, spelled out: per chunk, h·Wᵀ block by block
    (frozen_linear), then p·W summed block after block (frozen_grad_input), each pass dequantizing W."""
    total, grad = torch.zeros(()), torch.empty_like(h)
    for i in range(0, len(h), chunk):
        n = len(h[i:i + chunk])
        logits = torch.empty(n, w.shape[0], dtype=w.dtype)
        for a, b in w.blocks():
            torch.mm(h[i:i + n], w.rows(a, b).t(), out=logits[:, a:b])
        logp = logits.float()
        if softcap:
            tanh = torch.tanh(logp / softcap)
            logp = torch.mul(tanh, softcap, out=logp)
        logp = torch.log_softmax(logp, -1)
        rows, t = torch.arange(n), targets[i:i + n]
        total -= logp[rows, t].sum()
        p = logp.exp()
        p[rows, t] -= 1
        if softcap:
            p.mul_(1 - tanh.square())
        p, g = p.to(h.dtype), None
        for a, b in w.blocks():
            g = p[:, a:b] @ w.rows(a, b) if g is None else g.addmm_(p[:, a:b], w.rows(a, b))
        grad[i:i + n] = g
    return total, grad


@pytest.mark.parametrize("softcap", [0.0, 30.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [7, 256])
def test_quantized_head_shares_passes_and_keeps_the_bits(monkeypatch, softcap, dtype, chunk):
    """Gemma 2's tied Q8_0 head (Gemma 3 270M's head type) in uneven blocks of 37 rows, 40 positions in
    chunks of 7 (the last one short) or in one chunk: the same loss and gradient bits as the former order,
    with the head dequantized n + 1 times per block, not 2n. bf16: the softmax is a copy, not the buffer."""
    monkeypatch.setattr(qw, "CHUNK_BYTES", 4 * 64 * 37)
    with GGUFBase(FIXTURES / "gemma2" / "base-q4_k_m.gguf") as b:
        w = qw.quant_weight(b, "model.embed_tokens.weight", dtype)
    n_blocks = len(list(w.blocks()))
    assert n_blocks > 2 and w.shape[0] % w.block
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(40, w.shape[1], generator=gen).to(dtype) * 3
    targets = torch.randint(0, w.shape[0], (40,), generator=gen)
    dequantized = []
    rows = qw.QuantWeight.rows
    monkeypatch.setattr(qw.QuantWeight, "rows", lambda self, *a, **k: dequantized.append(a) or rows(self, *a, **k))

    want_loss, want_grad = _former(h, w, targets, chunk, softcap)
    n_chunks = -(-len(h) // chunk)
    assert len(dequantized) == 2 * n_chunks * n_blocks
    dequantized.clear()
    x = h.clone().requires_grad_()
    loss = HeadLoss.apply(x, w, targets, chunk, softcap)
    assert len(dequantized) == (n_chunks + 1) * n_blocks
    loss.backward(torch.tensor(2.0))

    assert torch.equal(loss.detach(), want_loss)
    assert torch.equal(x.grad, 2 * want_grad)
    assert want_grad.abs().max() > 0.1  # not a vanishing gradient that any order would match


def test_no_gradient_wanted_makes_only_the_logits(monkeypatch):
    """Under no_grad (an eval loss): one pass per chunk, and the former loss."""
    with GGUFBase(FIXTURES / "gemma2" / "base-q4_k_m.gguf") as b:
        w = qw.quant_weight(b, "model.embed_tokens.weight", torch.float32)
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(20, w.shape[1], generator=gen)
    targets = torch.randint(0, w.shape[0], (20,), generator=gen)
    want = _former(h, w, targets, 6, 0.0)[0]
    passes = []
    rows = qw.QuantWeight.rows
    monkeypatch.setattr(qw.QuantWeight, "rows", lambda self, *a, **k: passes.append(a) or rows(self, *a, **k))
    with torch.no_grad():
        loss = HeadLoss.apply(h, w, targets, 6, 0.0)
    assert len(passes) == 4  # 4 chunks, the head in one block
    assert torch.equal(loss, want)
