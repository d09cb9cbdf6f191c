"""The frozen base kept in its GGUF encoding (quant_weights): the same model as the resident base, the
same training step, no dequantized copy held, and the choice between the two forms."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import ARCHS, FIXTURES
from lora2gguf.weights.base_model import GGUFBase, HFBase
from lora2gguf.errors import Lora2GGUFError
from lora2gguf.weights.quantized import QuantLinear, QuantWeight, frozen_grad_input, frozen_linear
from lora2gguf.training.fused import fuse_for_training
from lora2gguf.training.loss import LossModel
from lora2gguf.weights.frozen import choose_base_weights, load_base_model
from lora2gguf.training.lora import inject_lora

CPU = torch.device("cpu")


def _both(path):
    with GGUFBase(path) as b:
        return b, load_base_model(b, torch.float32, CPU, "resident"), load_base_model(b, torch.float32, CPU, "quantized")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", ["q4_k_m", "q8_0", "f16"])
def test_quantized_base_computes_the_resident_model(arch, kind):
    """Same logits as the model on the dequantized weights (the dequantization is gguf-py's, bit for bit;
    the products are the same GEMMs by blocks of rows)."""
    b, resident, quantized = _both(FIXTURES / arch / f"base-{kind}.gguf")
    assert any(isinstance(m, QuantLinear) for m in quantized.modules())
    ids = torch.randint(0, b.spec.n_vocab, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, q = resident(ids), quantized(ids)
    torch.testing.assert_close(q, a, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_quantized_training_step_matches_resident(arch):
    """One step's loss and LoRA gradients (dropout on, fused layer where the arch has one) agree."""
    b, *models = _both(FIXTURES / arch / "base-q4_k_m.gguf")
    ids = torch.randint(0, b.spec.n_vocab, (2, 40), generator=torch.Generator().manual_seed(0))
    out = []
    for m in models:
        torch.manual_seed(0)
        layers = inject_lora(m, "all-linear", 4, 8.0, dropout=0.1)
        for layer in layers.values():
            torch.nn.init.normal_(layer.lora_B.weight, std=0.02)
        fuse_for_training(m)
        m.train()
        torch.manual_seed(1)
        loss = LossModel(m)(ids, None, ids)
        loss.backward()
        out.append((loss.detach(), torch.cat([p.grad.flatten() for layer in layers.values()
                                              for p in (layer.lora_A.weight, layer.lora_B.weight)])))
    (la, ga), (lq, gq) = out
    torch.testing.assert_close(lq, la, rtol=1e-5, atol=0)
    assert float((gq - ga).norm() / ga.norm()) < 1e-5


def test_no_dequantized_copy_is_held():
    """Every 2-D tensor stays the file's bytes: the model's own tensors are the norms (1-D) only, and each
    QuantWeight's bytes are a view of the mapped file, not a copy."""
    path = FIXTURES / "llama" / "base-q4_k_m.gguf"
    with GGUFBase(path) as b:
        m = load_base_model(b, torch.float32, CPU, "quantized")
        assert all(p.ndim == 1 for p in m.parameters())
        weights = [mod.weight for mod in m.modules() if isinstance(getattr(mod, "weight", None), QuantWeight)]
        assert len(weights) == 7 * b.spec.n_layer + 1 + (not b.spec.tied_embeddings)
        lo = b.file.raw(next(iter(b.file.tensors))).ctypes.data - next(iter(b.file.tensors.values())).offset
        for w in weights:
            assert lo <= w.raw.data_ptr() < lo + b.file.size  # inside the map


def test_blocked_products_equal_the_dense_ones(monkeypatch):
    """frozen_linear / frozen_grad_input over several row blocks equal x·Wᵀ and g·W on the dequantized W."""
    import lora2gguf.weights.quantized as qw

    monkeypatch.setattr(qw, "CHUNK_BYTES", 4 * 64 * 5)  # blocks of 5 rows: uneven splits
    with GGUFBase(FIXTURES / "qwen2" / "base-q4_k_m.gguf") as b:
        name = "model.layers.0.mlp.down_proj.weight"
        w = qw.quant_weight(b, name, torch.float32)
        dense = torch.from_numpy(b.tensor(name))
        assert w.block < w.shape[0]
        x = torch.randn(7, w.shape[1], dtype=torch.float64).float()
        g = torch.randn(7, w.shape[0])
        torch.testing.assert_close(frozen_linear(x, w), x @ dense.t(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(frozen_grad_input(g, w), g @ dense, rtol=1e-5, atol=1e-5)
        ids = torch.tensor([[3, 0], [w.shape[0] - 1, 7]])
        torch.testing.assert_close(w.take(ids), dense[ids], rtol=0, atol=0)


def test_permuted_rows_are_taken_in_hf_order():
    """llama stores q/k rows permuted for its rope: the QuantWeight reads them back in HF order."""
    with GGUFBase(FIXTURES / "llama" / "base-q8_0.gguf") as b:
        name = "model.layers.1.self_attn.q_proj.weight"
        w = __import__("lora2gguf.weights.quantized", fromlist=["x"]).quant_weight(b, name, torch.float32)
        assert w.perm is not None and not torch.equal(w.perm, torch.arange(len(w.perm)))
        np.testing.assert_array_equal(w.rows().numpy(), b.tensor(name))


def test_auto_picks_by_free_memory(monkeypatch):
    import lora2gguf.weights.frozen as tm

    with GGUFBase(FIXTURES / "llama" / "base-q4_k_m.gguf") as b:
        cost = tm.resident_cost(b, torch.float32, CPU)
        assert cost > 4 * sum(t.nbytes for t in b.file.tensors.values() if len(t.shape) == 2)
        monkeypatch.setattr(tm, "available_memory", lambda d: 10 * cost)
        assert choose_base_weights(b, "auto", torch.float32, CPU)[0] == "resident"
        assert choose_base_weights(b, "auto", torch.float32, CPU, ranks_here=8)[0] == "quantized"
        monkeypatch.setattr(tm, "available_memory", lambda d: cost)
        form, why = choose_base_weights(b, "auto", torch.float32, CPU)
        assert form == "quantized" and "free" in why
        assert choose_base_weights(b, "resident", torch.float32, CPU)[0] == "resident"
    with GGUFBase(FIXTURES / "llama" / "base-f32.gguf") as b:  # F32 maps in place on CPU, but permuted q/k
        arch = b.spec.arch_module
        permuted = sum(b.file.tensors[b.gguf_name(n)].nbytes for n in b.hf_names() if arch.permutes_rows(b.spec, n))
        assert 0 < permuted == tm.resident_cost(b, torch.float32, CPU)
        assert tm.resident_cost(b, torch.bfloat16, CPU) == sum(t.nbytes for t in b.file.tensors.values()) // 2


def test_hf_base_cannot_train_quantized():
    b = HFBase(FIXTURES / "llama" / "hf")
    assert choose_base_weights(b, "auto", torch.float32, CPU)[0] == "resident"
    with pytest.raises(Lora2GGUFError, match="needs a GGUF base"):
        choose_base_weights(b, "quantized", torch.float32, CPU)


def test_cli_trains_the_same_adapter_on_either_form(tmp_path):
    """Through the command users run: --base-weights quantized writes the adapter --base-weights resident
    writes (same seed, same data), to float rounding, and says which form it used."""
    from click.testing import CliRunner

    from lora2gguf.cli import cli

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"line {i} of the quick brown fox jumps"}) + "\n" for i in range(8)))
    tensors = {}
    for form in ("resident", "quantized"):
        out = tmp_path / form
        r = CliRunner().invoke(cli, ["train", "--base", str(FIXTURES / "llama" / "base-q4_k_m.gguf"), "--data",
                                     str(data), "-o", str(out), "--steps", "3", "--rank", "4", "--batch-size", "2",
                                     "--base-weights", form, "--grad-checkpointing"])
        assert r.exit_code == 0, r.output
        assert f"frozen base: {form}" in r.output
        from safetensors.torch import load_file

        tensors[form] = load_file(out / "adapter_model.safetensors")
    for k, v in tensors["resident"].items():
        torch.testing.assert_close(tensors["quantized"][k], v, rtol=1e-3, atol=1e-5)
