#!/usr/bin/env python3
"""Benchmark: what training on the quantized file buys. An adapter trained on the Q4_K_M GGUF itself
(`--base-weights quantized`) and one trained on the F32 weights (the usual way: full-precision weights),
same data, seed and recipe, are both served the way users serve them: llama.cpp, the Q4_K_M base, the
GGUF LoRA at run time. For each, the KL from the model it was trained as (the reference on its training
base + the adapter) to the model users get, on held-out chat prompts with the adapter's own answers, and
how often the greedy answer still follows the trained format.

    .venv/bin/python scripts/bench_fidelity.py [--base gemma3] [--steps 40] [--rank 8]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lora2gguf import real_models  # noqa: E402

BASES = {"gemma3": (real_models.gemma3_gguf, real_models.gemma3_f32_gguf),
         "smollm2": (real_models.smollm2_gguf, real_models.smollm2_f32_gguf)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="gemma3", choices=sorted(BASES))
    ap.add_argument("--behaviour", default="json", choices=["json", "pirate"])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--answer-tokens", type=int, default=24)
    a = ap.parse_args()

    import numpy as np

    from lora2gguf.adapter_any import load_adapter
    from lora2gguf.base import GGUFBase
    from lora2gguf.data import Tokenizer
    from lora2gguf.demo import BEHAVIOURS, DEMO_DATA, chat_template_for
    from lora2gguf.metrics import compare
    from lora2gguf.reference import reference_logits
    from lora2gguf.runtime import LlamaRuntime
    from lora2gguf.train import TrainConfig, train

    quant, f32 = (get() for get in BASES[a.base])
    behaviour = next(b for b in BEHAVIOURS if b.name == a.behaviour)
    with GGUFBase(quant) as b:
        template = chat_template_for(b)
    prompts = [json.loads(line)["messages"] for line in (DEMO_DATA / "eval-prompts.jsonl").read_text().splitlines()
               if line.strip()]
    tok = Tokenizer(quant, template)
    prompt_ids = [tok.encode(tok.render(m, add_generation_prompt=True)) for m in prompts]
    tok.close()
    rows = []

    def answer_kl(trained, served) -> tuple[float, float]:
        """Mean KL and top-1 agreement over the answer positions (what the adapter was trained to produce);
        a prompt answered with end-of-turn at once has none."""
        kl = [compare(t[len(p) - 1:-1], s[len(p) - 1:-1]) for t, s, p in zip(trained, served, prompt_ids)
              if len(t) > len(p)]
        return float(np.mean([k["mean_kl"] for k in kl])), float(np.mean([k["top1"] for k in kl]))

    with tempfile.TemporaryDirectory() as tmp:
        for label, base, form in (("Q4_K_M file (quantized path)", quant, "quantized"), ("F32 weights", f32, "resident")):
            out = Path(tmp) / form
            out.mkdir()  # train writes the GGUF LoRA beside the adapter; its directory must exist
            train(TrainConfig(base=str(base), data=str(DEMO_DATA / behaviour.data), out=str(out), rank=a.rank,
                              alpha=2 * a.rank, lr=1e-3, steps=a.steps, batch_size=4, seq_len=128, dropout=0.0,
                              targets="all-linear", gguf=str(out / "lora.gguf"), force=True, progress=False,
                              seed=0, chat_template=template, base_weights=form))
            with LlamaRuntime(quant, n_ctx=256) as rt:
                rt.set_adapters([(out / "lora.gguf", 1.0)])
                seqs = [p + rt.greedy(p, a.answer_tokens) for p in prompt_ids]
                served = [rt.logits(s) for s in seqs]
                answers = [rt.detokenize(s[len(p):]) for s, p in zip(seqs, prompt_ids)]
            with GGUFBase(base) as b:
                trained = reference_logits(b, [(load_adapter(out, b.spec), 1.0)], seqs)
            rows.append((label, *answer_kl(trained, served), float(np.mean([behaviour.adheres(x) for x in answers]))))
            if form == "resident":  # the floor: the same answers, no adapter, F32 weights → the Q4_K_M file
                with LlamaRuntime(quant, n_ctx=256) as rt:
                    served = [rt.logits(s) for s in seqs]
                with GGUFBase(base) as b:
                    trained = reference_logits(b, [], seqs)
                rows.append(("no adapter: F32 weights, served on the Q4_K_M file", *answer_kl(trained, served), None))
    print(f"\n{a.base}: {a.behaviour} adapter, rank {a.rank} all-linear, {a.steps} steps; served on "
          f"{Path(quant).name} by llama.cpp; {len(prompt_ids)} held-out prompts, {a.answer_tokens} answer tokens\n")
    print("| trained on | KL trained → served | top-1 agreement | served answers in the trained format |")
    print("|---|---|---|---|")
    for label, kl, top1, adh in rows:
        print(f"| {label} | {kl:.4g} | {top1:.1%} | {'-' if adh is None else f'{adh:.0%}'} |")


if __name__ == "__main__":
    main()
