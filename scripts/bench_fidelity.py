#!/usr/bin/env python3
"""Benchmark: what training on the quantized file buys. The full-precision weights (F32) are quantized
by llama.cpp to the file users serve (Q4_K_M by default). An adapter trained on that file itself
(`--base-weights quantized`) and one trained on the F32 weights (the usual way), same data, seed and
recipe, are both served the way users serve them: llama.cpp, the quantized file, the GGUF LoRA at run
time. For each, the KL from the model it was trained as (the reference on its training base + the
adapter) to the model users get, on held-out chat prompts followed by either adapter's answer, and how
often the served greedy answer follows the trained format. Two floors without an adapter: llama.cpp
against the served file's own weights (its compute alone), and against the F32 weights (the
quantization gap).

The public files are quantized, so "full precision" here is a published file dequantized: SmolLM2's
Q4_1 (requantizing it to Q4_K_M moves every weight to another grid: a real gap, the default) or Gemma 3's
Q4_K_M (requantized to its own type, the gap is only what a second pass of the quantizer changes).

    .venv/bin/python scripts/bench_fidelity.py [--base smollm2|gemma3] [--quant q4_k_m] [--steps 40] [--rank 8]
    .venv/bin/python scripts/bench_fidelity.py --control [...]   # identical weights, the two training paths
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lora2gguf.weights import real_models  # noqa: E402

BASES = {"gemma3": real_models.gemma3_f32_gguf, "smollm2": real_models.smollm2_f32_gguf}  # the F32 weights


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="smollm2", choices=sorted(BASES))
    ap.add_argument("--quant", default="q4_k_m", help="the type users serve, made from the F32 weights by llama.cpp")
    ap.add_argument("--behaviour", default="json", choices=["json", "pirate"])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--answer-tokens", type=int, default=24)
    ap.add_argument("--control", action="store_true",
                    help="instead: train on the served file twice (quantized and resident paths, identical weights) "
                         "and print how far apart the two adapters are")
    a = ap.parse_args()

    import numpy as np

    from lora2gguf.adapters.load import load_adapter
    from lora2gguf.weights.base_model import GGUFBase
    from lora2gguf.llamacpp.tokenizer import Tokenizer
    from lora2gguf.demo import BEHAVIOURS, DEMO_DATA, chat_template_for
    from lora2gguf.parity.metrics import compare
    from lora2gguf.llamacpp.quantize import llama_quantize, output_type
    from lora2gguf.parity.reference import reference_logits
    from lora2gguf.llamacpp.runtime import LlamaRuntime
    from lora2gguf.training.config import TrainConfig
    from lora2gguf.commands.train import train

    f32 = BASES[a.base]()
    quant = f32.with_name(f32.name.replace(".F32.", f".{a.quant.upper()}-from-F32."))
    if not quant.is_file():  # made once, next to the F32 copy
        part = quant.with_suffix(".part")
        llama_quantize(f32, part, output_type(a.quant).ftype)
        part.rename(quant)
    behaviour = next(b for b in BEHAVIOURS if b.name == a.behaviour)
    with GGUFBase(quant) as b:
        template = chat_template_for(b)
    prompts = [json.loads(line)["messages"] for line in (DEMO_DATA / "eval-prompts.jsonl").read_text().splitlines()
               if line.strip()]
    tok = Tokenizer(quant, template)
    prompt_ids = [tok.encode(tok.render(m, add_generation_prompt=True)) for m in prompts]
    tok.close()
    n_prompts = len(prompt_ids)

    def updates_apart(dirs) -> list[float]:
        """‖ΔW_a − ΔW_b‖ / ‖ΔW_b‖ per module, for the adapters in two PEFT directories."""
        da, db = (load_adapter(d).modules for d in dirs)
        return [np.linalg.norm(da[m].delta() - db[m].delta()) / np.linalg.norm(db[m].delta()) for m in db]

    with tempfile.TemporaryDirectory() as tmp:
        trained = {}  # form → (training base, GGUF LoRA, PEFT directory, last loss)
        for form, base in (("quantized", quant), ("resident", quant if a.control else f32)):
            out = Path(tmp) / form
            out.mkdir()  # train writes the GGUF LoRA beside the adapter; its directory must exist
            r = train(TrainConfig(base=str(base), data=str(DEMO_DATA / behaviour.data), out=str(out), rank=a.rank,
                                  alpha=2 * a.rank, lr=1e-3, steps=a.steps, batch_size=4, seq_len=128, dropout=0.0,
                                  targets="all-linear", gguf=str(out / "lora.gguf"), force=True, progress=False,
                                  seed=0, chat_template=template, base_weights=form))
            trained[form] = (base, out / "lora.gguf", out, r.losses[-1])
        if a.control:
            apart = updates_apart([trained[f][2] for f in ("quantized", "resident")])
            print(f"\ncontrol, {a.base}: both paths on {quant.name}, {a.steps} steps: last loss "
                  f"{trained['quantized'][3]:.7f} (quantized) vs {trained['resident'][3]:.7f} (resident); updates "
                  f"{np.median(apart):.2g} apart (median over modules; max {max(apart):.2g})")
            return
        # One set of sequences for every row: each prompt with each adapter's own greedy answer as served.
        # (Comparing each adapter on its own answers would compare how peaked two different texts are.)
        seqs, adherence = [], {}
        with LlamaRuntime(quant, n_ctx=256) as rt:
            for form, (_, lora, _, _) in trained.items():
                rt.set_adapters([(lora, 1.0)])
                answers = [rt.greedy(p, a.answer_tokens) for p in prompt_ids]
                adherence[form] = float(np.mean([behaviour.adheres(rt.detokenize(x)) for x in answers]))
                seqs += [p + x for p, x in zip(prompt_ids, answers)]
        starts = [len(p) for p in prompt_ids] * 2

        def served_logits(lora):
            with LlamaRuntime(quant, n_ctx=256) as rt:
                rt.set_adapters([(lora, 1.0)] if lora else [])
                return [rt.logits(s) for s in seqs]

        def reference(base, peft_dir):
            with GGUFBase(base) as b:
                return reference_logits(b, [(load_adapter(peft_dir, b.spec), 1.0)] if peft_dir else [], seqs)

        def row(label, ref, served, adh=None):
            every = [compare(r[:-1], s[:-1]) for r, s in zip(ref, served)]  # positions that predict a token
            ans = [compare(r[k - 1:-1], s[k - 1:-1]) for r, s, k in zip(ref, served, starts) if len(r) > k]
            return (label, float(np.mean([c["mean_kl"] for c in every])), float(np.mean([c["top1"] for c in every])),
                    float(np.mean([c["mean_kl"] for c in ans])), adh)

        # How far apart the two adapters are: ‖ΔW_quantized − ΔW_F32‖ / ‖ΔW_F32‖ per module
        apart = updates_apart([trained[f][2] for f in ("quantized", "resident")])
        q_base, q_lora, q_dir, _ = trained["quantized"]
        f_base, f_lora, f_dir, _ = trained["resident"]
        no_lora = served_logits(None)
        rows = [row(f"{quant.name} (`--base-weights quantized`) + its adapter", reference(q_base, q_dir),
                    served_logits(q_lora), adherence["quantized"]),
                row("F32 weights (`--base-weights resident`) + its adapter", reference(f_base, f_dir),
                    served_logits(f_lora), adherence["resident"]),
                row("no adapter: the served file's own weights (llama.cpp's compute alone)", reference(quant, None), no_lora),
                row("no adapter: F32 weights (the quantization gap)", reference(f32, None), no_lora)]
    print(f"\n{a.base}: {a.behaviour} adapter, rank {a.rank} all-linear, {a.steps} steps, the same data, seed and "
          f"recipe on both bases; served by llama.cpp on {Path(quant).name} with the GGUF LoRA at run time; "
          f"{n_prompts} held-out prompts × 2 answers ({a.answer_tokens} tokens at most, each adapter's greedy answer), "
          f"{sum(map(len, seqs))} positions. The two adapters' updates differ by {np.median(apart):.3f} (median "
          f"over modules; max {max(apart):.3f}) of the F32-trained one's norm\n")
    print("| trained as (reference) | KL trained → served, every position | top-1 agreement | KL, answer positions "
          "| served answers in the trained format |")
    print("|---|---:|---:|---:|---:|")
    for label, kl, top1, kl_ans, adh in rows:
        print(f"| {label} | {kl:.3g} | {top1:.1%} | {kl_ans:.3g} | {'-' if adh is None else f'{adh:.0%}'} |")

if __name__ == "__main__":
    main()
