"""An importance matrix measured on the merged model: what `llama-imatrix` computes, taken on the reference
(the base's weights with the adapters folded in by PEFT's math, parity.reference) over the adapter's own
data instead of over llama.cpp's run of a merged F16 copy.

llama-imatrix (tools/imatrix/imatrix.cpp, collect_imatrix) adds, for every matrix multiplication by a
`blk.*` weight, each token's input activation squared into that weight's sums, per input column, and counts
the tokens; llama-quantize weighs each column's rounding error by sums / count. Here every projection of a
layer is hooked the same way (its input x, the activation the GGUF weight multiplies), layer by layer over
all sequences (parity.reference.run_layers: one layer's float tensors at a time). The output head is left
out, as llama-imatrix leaves it out without --process-output. A stack of experts (ffn_*_exps, multiplied by
mul_mat_id) gets sums and a count per expert, over the tokens routed to it, as llama-imatrix keeps them.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from lora2gguf.adapters.lora import PeftAdapter
from lora2gguf.fileio.imatrix import Imatrix
from lora2gguf.models.layers import ExpertLinear, MoE
from lora2gguf.parity.reference import ReferenceWeights, run_layers


def measure_importance(base, adapters: list[tuple[PeftAdapter, float]], sequences: list[list[int]],
                       dataset: str) -> Imatrix:
    """Sums of x² per input column and token counts for every projection weight of every layer (GGUF
    names), over these token sequences run through the merged model."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    real = {"positions": None}  # the batch's real (not padding) positions, flattened
    # q/k/v (and gate/up) read one input tensor: its squares are summed once for all of them (half the
    # hooks' time), in float64 over float32 squares
    seen: dict = {"x": None, "sq": None, "n": 0}
    muted = {"on": False}  # moe_pre's own call of the router: not a token of the model's

    def hook(name: str):
        def pre(module: nn.Module, args) -> None:
            if muted["on"]:
                return
            if args[0] is not seen["x"]:
                x = args[0].detach().reshape(-1, args[0].shape[-1])[real["positions"]]
                seen.update(x=args[0], sq=x.square().sum(0, dtype=torch.float64), n=x.shape[0])
            sums[name] = sums.get(name, 0) + seen["sq"]
            counts[name] = counts.get(name, 0) + seen["n"]
        return pre

    routed: dict[int, torch.Tensor] = {}  # expert → which of the rows MoE.forward hands it are real tokens

    def moe_pre(module: MoE, args) -> None:  # the routing MoE.forward is about to use, on the same input
        muted["on"] = True
        try:
            ids = module.route(args[0].reshape(-1, args[0].shape[-1]))[0]
        finally:
            muted["on"] = False
        routed.clear()
        routed.update({e: real["positions"][torch.where(ids == e)[0]] for e in ids.unique().tolist()})

    def expert_hook(name: str, n_expert: int):
        def pre(module: ExpertLinear, args) -> None:
            x, e = args
            if x is not seen["x"]:  # gate and up of one expert read one input
                rows = x.detach().reshape(-1, x.shape[-1])[routed[e]]
                seen.update(x=x, sq=rows.square().sum(0, dtype=torch.float64), n=rows.shape[0])
            s = sums.setdefault(name, torch.zeros(n_expert, x.shape[-1], dtype=torch.float64))
            s[e] += seen["sq"]
            counts.setdefault(name, np.zeros(n_expert))[e] += seen["n"]
        return pre

    def on_layer(layer: nn.Module, i: int) -> None:
        for sub_name, sub in layer.named_modules():
            if isinstance(sub, nn.Linear):
                sub.register_forward_pre_hook(hook(base.gguf_name(f"model.layers.{i}.{sub_name}.weight")))
            elif isinstance(sub, ExpertLinear):
                sub.register_forward_pre_hook(expert_hook(base.gguf_name(f"model.layers.{i}.{sub_name}.weight"),
                                                          base.spec.n_expert))
            elif isinstance(sub, MoE):
                sub.register_forward_pre_hook(moe_pre)

    def on_batch(valid: torch.Tensor) -> None:
        real["positions"] = valid.reshape(-1)

    run_layers(base, ReferenceWeights(base, list(adapters)), sequences, on_layer, on_batch)
    im = Imatrix(datasets=[dataset], chunk_count=len(sequences), chunk_size=max(map(len, sequences), default=0))
    for name, s in sums.items():  # (n_mat, n_in): one row, or one per expert
        im.sums[name] = s.to(torch.float32).numpy().reshape(-1, s.shape[-1])
        im.counts[name] = np.asarray(counts[name], np.float32).reshape(-1)
    return im
