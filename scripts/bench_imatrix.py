#!/usr/bin/env python3
"""Benchmark: merges that keep what the adapter bought. One F32 base, one adapter trained on it with the
demo's recipe and data, merged and quantized three ways, side by side:

  1. llama.cpp without an importance matrix: llama-export-lora (F32 merged file), then llama-quantize;
  2. llama.cpp with one: llama-export-lora, llama-imatrix over the adapter's training data (its chat records
     rendered with the chat template, one text file), llama-quantize --imatrix;
  3. `lora2gguf merge --imatrix-data` on the same data (the matrix measured on the merged model by the
     PyTorch reference, the quantized file written in one step, no F32 file on disk).
  (0. `lora2gguf merge` without a matrix, for reference: what llama-quantize makes of our own f32 merge.)

Each served file is compared, by llama.cpp's logits, with the exact merged model (the reference: PEFT's math
in float64 on the F32 weights, layer by layer): mean KL over the answer positions of the demo's 24 held-out
prompts (each prompt followed by the exact model's greedy answer), and over a generic passage (verify's
built-in text); adherence: greedy answers from the served file that open with the trained marker. Wall time
of each pipeline, in rounds that alternate the pipelines (best and worst round). llama.cpp's tools are built
from the llama-cpp-python sdist against the same libllama the package uses (tests/llama_cpp_source.py), so
both sides run the same ggml.

    .venv/bin/python scripts/bench_imatrix.py [--base smollm2|gemma3] [--behaviour json|pirate]
        [--quants q4_k_m,q3_k_m,iq2_xs] [--rounds 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from lora2gguf.weights import real_models  # noqa: E402

BASES = {"gemma3": real_models.gemma3_f32_gguf, "smollm2": real_models.smollm2_f32_gguf}


def run(cmd: list, env=None) -> float:
    t = time.perf_counter()
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        sys.exit(f"{' '.join(map(str, cmd))} failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="smollm2", choices=sorted(BASES))
    ap.add_argument("--behaviour", default="json", choices=["json", "pirate"])
    ap.add_argument("--quants", default="q4_k_m,q3_k_m,iq2_xs")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--answer-tokens", type=int, default=24)
    ap.add_argument("--ctx", type=int, default=128, help="llama-imatrix's chunk size (-c) over the rendered records")
    a = ap.parse_args()

    import numpy as np

    from llama_cpp_source import llama_tool
    from lora2gguf.adapters.load import load_adapter
    from lora2gguf.commands.train import train
    from lora2gguf.commands.verify import DEFAULT_TEXT
    from lora2gguf.demo import BEHAVIOURS, DEMO_DATA, Recipe, chat_template_for
    from lora2gguf.llamacpp.runtime import LlamaRuntime
    from lora2gguf.llamacpp.tokenizer import Tokenizer
    from lora2gguf.parity.metrics import compare
    from lora2gguf.parity.reference import reference_logits
    from lora2gguf.training.config import TrainConfig
    from lora2gguf.training.data import read_jsonl
    from lora2gguf.weights.base_model import GGUFBase

    tools = {n: llama_tool(n) for n in ("export-lora", "imatrix", "quantize")}
    if None in tools.values():
        sys.exit("llama.cpp's tools could not be built (no source or no C++ compiler)")
    f32 = BASES[a.base]()
    behaviour = next(b for b in BEHAVIOURS if b.name == a.behaviour)
    data = DEMO_DATA / behaviour.data
    quants = a.quants.split(",")
    env = os.environ | {"OMP_NUM_THREADS": str(a.threads)}
    recipe = Recipe()
    with GGUFBase(f32) as b:
        template = chat_template_for(b)
        layers = recipe.layers(b.spec.n_layer)
    tok = Tokenizer(f32, template)
    prompts = [json.loads(line)["messages"] for line in (DEMO_DATA / "eval-prompts.jsonl").read_text().splitlines()
               if line.strip()]
    prompt_ids = [tok.encode(tok.render(m, add_generation_prompt=True)) for m in prompts]
    text_ids = tok.encode(DEFAULT_TEXT)[:256]
    records = "".join(tok.render(rec["messages"]) + "\n" for _, rec in read_jsonl(data))
    tok.close()

    with tempfile.TemporaryDirectory(prefix="bench-imatrix-") as tmpd:
        tmp = Path(tmpd)
        (tmp / "calibration.txt").write_text(records)
        peft = tmp / "adapter"
        t0 = time.perf_counter()
        res = train(TrainConfig(base=str(f32), data=str(data), out=str(peft), rank=recipe.rank, alpha=2 * recipe.rank,
                                lr=recipe.lr, steps=recipe.steps, batch_size=recipe.batch_size, seq_len=recipe.seq_len,
                                dropout=0.0, targets="all-linear", layers=layers, gguf=str(tmp / "lora.gguf"),
                                force=True, progress=False, seed=0, chat_template=template))
        print(f"trained {a.behaviour} on {f32.name} ({time.perf_counter() - t0:.0f} s, loss {res.losses[0]:.3f} → "
              f"{res.losses[-1]:.3f})", file=sys.stderr)
        lora = tmp / "lora.gguf"

        # the exact merged model's greedy answers (llama.cpp, F32 base + runtime LoRA: verify measures it at
        # ~1e-11 KL from the reference) and the reference's logits on every sequence
        with LlamaRuntime(f32, n_ctx=512) as rt:
            rt.set_adapters([(lora, 1.0)])
            answers = [rt.greedy(p, a.answer_tokens) for p in prompt_ids]
            exact_adherence = float(np.mean([behaviour.adheres(rt.detokenize(x)) for x in answers]))
        seqs = [p + x for p, x in zip(prompt_ids, answers)] + [text_ids]
        with GGUFBase(f32) as b:
            ref = reference_logits(b, [(load_adapter(peft, b.spec), 1.0)], seqs)

        def pipeline(name: str, quant: str) -> tuple[Path, float]:
            out = tmp / f"{name}-{quant}.gguf"
            out.unlink(missing_ok=True)
            merged, im = tmp / "merged-f32.gguf", tmp / "imatrix.gguf"
            th = str(a.threads)
            if name == "ours":
                cmd = [sys.executable, "-m", "lora2gguf.cli", "merge", "--base", f32, "--lora", peft, "--quant", quant,
                       "--imatrix-data", data, "--imatrix-out", im, "-o", out, "--force"]
                return out, run(cmd + (["--chat-template", template] if template else []), env)
            if name == "ours-plain":
                return out, run([sys.executable, "-m", "lora2gguf.cli", "merge", "--base", f32, "--lora", peft,
                                 "--quant", quant, "-o", out], env)
            t = run([tools["export-lora"], "-m", f32, "--lora", lora, "-o", merged, "-t", th])
            if name == "llama.cpp+imatrix":
                t += run([tools["imatrix"], "-m", merged, "-f", tmp / "calibration.txt", "-o", im, "-c", str(a.ctx),
                          "-t", th, "--no-ppl"])
                t += run([tools["quantize"], "--imatrix", im, merged, out, quant.upper(), th])
            else:
                t += run([tools["quantize"], merged, out, quant.upper(), th])
            merged.unlink()
            return out, t

        names = ["llama.cpp", "llama.cpp+imatrix", "ours", "ours-plain"]
        rows = []
        for quant in quants:
            times: dict[str, list[float]] = {n: [] for n in names}
            files = {}
            for r in range(a.rounds):
                for n in (names if r % 2 == 0 else names[::-1]):
                    if quant.startswith(("iq1", "iq2", "iq3_xxs")) or quant == "q2_k_s":
                        if n in ("llama.cpp", "ours-plain"):
                            continue  # llama.cpp refuses these without an importance matrix
                    files[n], t = pipeline(n, quant)
                    times[n].append(t)
            for n, path in files.items():
                with LlamaRuntime(path, n_ctx=512) as rt:
                    served = [rt.logits(s) for s in seqs]
                    adh = float(np.mean([behaviour.adheres(rt.detokenize(rt.greedy(p, a.answer_tokens)))
                                         for p in prompt_ids]))
                kl_ans = float(np.mean([compare(r[len(p) - 1:-1], s[len(p) - 1:-1])["mean_kl"]
                                        for r, s, p in zip(ref, served, prompt_ids)]))
                kl_all = float(np.mean([compare(r[:-1], s[:-1])["mean_kl"] for r, s in zip(ref[:-1], served[:-1])]))
                kl_text = compare(ref[-1][:-1], served[-1][:-1])["mean_kl"]
                rows.append((quant, n, kl_ans, kl_all, kl_text, adh, min(times[n]), max(times[n]),
                             path.stat().st_size))

    print(f"\n{a.base} F32, {a.behaviour} adapter (demo recipe: rank {recipe.rank}, layers {layers}, {recipe.steps} "
          f"steps); calibration = its {len(read_jsonl(data))} training records; {len(prompt_ids)} held-out prompts "
          f"+ the exact model's greedy answers ({a.answer_tokens} tokens), a {len(text_ids)}-token generic passage; "
          f"exact model's adherence {exact_adherence:.0%}; {a.threads} threads, {a.rounds} rounds\n")
    print("| quant | pipeline | KL, held-out answers | KL, held-out prompts + answers | KL, generic text | adherence "
          "| wall s (best–worst) | size MB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for quant, n, kl_ans, kl_all, kl_text, adh, best, worst, size in rows:
        print(f"| {quant} | {n} | {kl_ans:.4f} | {kl_all:.4f} | {kl_text:.4f} | {adh:.0%} | {best:.1f}–{worst:.1f} "
              f"| {size / 1e6:.0f} |")


if __name__ == "__main__":
    main()
