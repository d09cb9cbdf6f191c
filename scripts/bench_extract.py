#!/usr/bin/env python3
"""`lora2gguf extract` vs mergekit's `mergekit-extract-lora` on the same (base, fine-tune) pair of
SmolLM2-135M-Instruct, each a fresh process (wall, CPU time, peak RSS from os.wait4, runs interleaved).

The fine-tune: the F32 base with bench_space.py's json-r16 and pirate-r4 adapters merged in by
`lora2gguf merge` (f32), so ΔW has rank ≤ 20 per projection and every number has a known answer. Both
tools read the same HF directories (base: tests/peft_helpers.hf_dir_from_base of the F32 GGUF; tuned: the
same of the merged GGUF); ours also straight from the two GGUF files. KL: llama.cpp with each extracted
adapter on the F32 base (mergekit's PEFT output converted by `lora2gguf convert`, which is exact) vs
llama.cpp running the fine-tune itself, on verify's default text.

mergekit is not a dependency: it is run from a throwaway venv given by --mergekit (see BENCHMARKS.md for
how it was made: `pip install --no-deps mergekit immutables`, everything else from this project's venv).

    .venv/bin/python scripts/bench_extract.py --mergekit /tmp/mkvenv/bin/mergekit-extract-lora [--runs 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "scripts"))
WORK = Path.home() / ".cache" / "lora2gguf-bench" / "extract"
SPACE = Path.home() / ".cache" / "lora2gguf-bench" / "space"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mergekit", required=True, help="path of the mergekit-extract-lora executable")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--ranks", default="8,20")
    args = ap.parse_args()
    from bench_convert import run
    from lora2gguf.convert import convert
    from lora2gguf.merge import merge
    from lora2gguf.metrics import compare
    from lora2gguf.runtime import LlamaRuntime
    from lora2gguf.smollm2 import smollm2_f32_gguf
    from lora2gguf.verify import DEFAULT_TEXT
    from peft_helpers import hf_dir_from_base

    WORK.mkdir(parents=True, exist_ok=True)
    f32 = smollm2_f32_gguf()
    base_hf = hf_dir_from_base(f32, f32.parent / "SmolLM2-135M-Instruct-hf")
    tuned = WORK / "tuned.gguf"
    if not tuned.is_file():
        merge(f32, [(SPACE / "json-r16", 1.0), (SPACE / "pirate-r4", 1.0)], tuned, quant="f32")
    tuned_hf = hf_dir_from_base(tuned, WORK / "tuned-hf")
    with LlamaRuntime(tuned, n_ctx=512) as rt:
        tokens = rt.tokenize(DEFAULT_TEXT)[:256]
        truth = rt.logits(tokens)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print("\n| rank | tool | inputs | wall s | CPU s | peak RSS MB | KL vs fine-tune | top-1 |\n|---:|---|---|---:|---:|---:|---:|---:|")
    rt = LlamaRuntime(f32, n_ctx=512)
    for k in (int(x) for x in args.ranks.split(",")):
        cmds = {
            ("lora2gguf", "HF dirs"): [sys.executable, "-m", "lora2gguf.cli", "extract", "--base", str(base_hf),
                                       "--tuned", str(tuned_hf), "--rank", str(k), "-o", str(WORK / f"ours-hf-{k}.gguf"), "--force"],
            ("lora2gguf", "GGUF files"): [sys.executable, "-m", "lora2gguf.cli", "extract", "--base", str(f32),
                                          "--tuned", str(tuned), "--rank", str(k), "-o", str(WORK / f"ours-{k}.gguf"), "--force"],
            ("mergekit", "HF dirs"): [args.mergekit, "--model", str(tuned_hf), "--base-model", str(base_hf),
                                      "--out-path", str(WORK / f"mergekit-{k}"), "--max-rank", str(k),
                                      "--no-copy-tokenizer", "--quiet", "-e", "embed_tokens|lm_head"],
        }
        times: dict = {key: [] for key in cmds}
        for _ in range(args.runs):
            for key, cmd in cmds.items():
                if key[0] == "mergekit":
                    shutil.rmtree(WORK / f"mergekit-{k}", ignore_errors=True)
                times[key].append(run(cmd))
        files = {("lora2gguf", "HF dirs"): WORK / f"ours-hf-{k}.gguf", ("lora2gguf", "GGUF files"): WORK / f"ours-{k}.gguf",
                 ("mergekit", "HF dirs"): convert(WORK / f"mergekit-{k}", f32, WORK / f"mergekit-{k}.gguf", force=True)}
        for key, path in files.items():
            rt.set_adapters([(path, 1.0)])
            m = compare(truth, rt.logits(tokens))
            best = min(times[key], key=lambda r: r["wall"])
            print(f"| {k} | {key[0]} | {key[1]} | {best['wall']:.1f} | {best['cpu']:.1f} | {best['rss']:.0f} | "
                  f"{m['mean_kl']:.2e} | {m['top1']:.3f} |", flush=True)
    rt.set_adapters([])
    m = compare(truth, rt.logits(tokens))
    print(f"\nbase alone vs fine-tune: KL {m['mean_kl']:.3e}, top-1 {m['top1']:.3f}")
    rt.close()


if __name__ == "__main__":
    main()
