"""Routing-aware runs of a mixture-of-experts fixture for the tests: logits and, per layer, the experts each
token was routed to, from transformers (+ PEFT), lora2gguf's PyTorch model and llama.cpp."""

from __future__ import annotations

import torch
from conftest import fixture

from lora2gguf.llamacpp.runtime import LlamaRuntime
from lora2gguf.models.layers import MoE
from lora2gguf.parity.metrics import compare, expert_set_mismatch


def transformers_run(arch, tokens, hf_dir=None, adapter_dir=None):
    """transformers' own class for the arch's fixture (Qwen3MoeForCausalLM, MixtralForCausalLM, ...; + PEFT when
    adapter_dir): (logits, layer → chosen experts)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir or fixture(arch, "hf"), dtype=torch.float32)
    if adapter_dir is not None:
        import peft

        model = peft.PeftModel.from_pretrained(model, str(adapter_dir))
    with torch.no_grad():
        out = model.eval()(torch.tensor([tokens]), output_router_logits=True)
    k = model.config.num_experts_per_tok
    routing = {i: torch.topk(torch.softmax(r.float(), -1), k, -1).indices.numpy()
               for i, r in enumerate(out.router_logits)}
    return out.logits[0].float().numpy(), routing


def gguf_arch(arch: str) -> str:
    """general.architecture of the arch's GGUF files (Mixtral's are llama files with experts)."""
    from lora2gguf import models

    return models.get(arch).gguf_arch


def reference_run(model, tokens):
    """lora2gguf's PyTorch model: (logits, layer → chosen experts), the routing read from its MoE blocks."""
    routing = {}
    for i, layer in enumerate(model.model.layers):
        assert isinstance(layer.mlp, MoE)
        layer.mlp.register_forward_pre_hook(
            lambda mod, args, i=i: routing.__setitem__(i, mod.route(args[0].reshape(-1, args[0].shape[-1]))[0].numpy()))
    with torch.no_grad():
        return model(torch.tensor([tokens]))[0].numpy(), routing


def llama_run(path, tokens, adapters=()):
    with LlamaRuntime(path, moe_routing=True) as rt:
        if adapters:
            rt.set_adapters(list(adapters))
        return rt.logits(tokens), dict(rt.routing)


def routed(p, q, rp, rq) -> dict:
    return compare(p, q) | {"expert_set_mismatch": expert_set_mismatch(rp, rq)}
