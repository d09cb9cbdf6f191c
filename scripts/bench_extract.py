#!/usr/bin/env python3
"""`lora2gguf extract` vs mergekit's `mergekit-extract-lora` on the same (base, fine-tune) pair of
SmolLM2-135M-Instruct, each a fresh process (wall, CPU time, peak RSS from os.wait4, runs interleaved).

The fine-tune: the F32 base with bench_space.py's two demo-recipe adapters (json-r4, pirate-r4) merged in
by `lora2gguf merge` (f32), so ΔW has rank ≤ 8 per projection of layers 20-29 (zero elsewhere) and every
number has a known answer: at --rank 8 both tools should reproduce the fine-tune. Both
tools read the same HF directories (base: tests/peft_helpers.hf_dir_from_base of the F32 GGUF; tuned: the
same of the merged GGUF); ours also straight from the two GGUF files. KL: llama.cpp with each extracted
adapter on the F32 base (mergekit's PEFT output converted by `lora2gguf convert`, which is exact) vs
llama.cpp running the fine-tune itself, on verify's default text.

mergekit is not a dependency: it is run from a throwaway venv given by --mergekit (see BENCHMARKS.md for
how it was made: `pip install --no-deps mergekit immutables`, everything else from this project's venv).

    .venv/bin/python scripts/bench_extract.py --mergekit /tmp/mkvenv/bin/mergekit-extract-lora [--runs 1]

Then the cost of what a LoRA cannot hold: the same fine-tune with its RMSNorm weights moved too, extracted
at rank 8 (exact for the projections), KL vs that fine-tune (`--norms-only` runs just this part).
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


def with_moved_norms(src: Path, dst: Path, amount: float) -> Path:
    """A copy of the F32 GGUF `src` whose RMSNorm weights are each multiplied by 1 + amount·N(0, 1): a
    fine-tune that also moved what no LoRA can hold."""
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFWriter

    from lora2gguf.fileio.gguf_read import GGUFFile
    from lora2gguf.fileio.gguf_write import PlannedTensor, copy_fields, write_streaming
    from lora2gguf.fileio.atomic import atomic_output

    rng = np.random.default_rng(0)

    def data(f, name):
        t = f.tensor(name)
        return (t * (1 + amount * rng.standard_normal(t.shape))).astype(np.float32) if name.endswith("norm.weight") else t

    with GGUFFile(src) as f, atomic_output(dst) as tmp:
        w = GGUFWriter(None, f.get("general.architecture"))
        copy_fields(f, w)
        plan = [PlannedTensor(t.name, t.shape, GGMLQuantizationType.F32, 4 * t.n_elements) for t in f.tensors.values()]
        write_streaming(tmp, w, plan, (data(f, t.name) for t in plan))
    return dst


def norms_cost(f32: Path, tuned: Path, tokens, rank: int) -> None:
    """What leaving the norms out costs: the fine-tune with its RMSNorms moved by 1% and 5%, extracted
    at the rank that holds its projections exactly; KL of base + LoRA vs that fine-tune."""
    from lora2gguf.commands.extract import extract
    from lora2gguf.parity.metrics import compare
    from lora2gguf.llamacpp.runtime import LlamaRuntime

    print("\n| RMSNorm weights moved by | share of ‖ΔW‖² left out | KL vs fine-tune | top-1 |\n|---:|---:|---:|---:|")
    for amount in (0.01, 0.05):
        moved = tuned if amount == 0 else with_moved_norms(tuned, WORK / f"tuned-norms-{amount}.gguf", amount)
        rep = extract(f32, moved, WORK / f"norms-{amount}.gguf", rank=rank, force=True)
        with LlamaRuntime(moved, n_ctx=512) as rt:
            truth = rt.logits(tokens)
        with LlamaRuntime(f32, n_ctx=512) as rt:
            rt.set_adapters([(WORK / f"norms-{amount}.gguf", 1.0)])
            m = compare(truth, rt.logits(tokens))
        print(f"| {amount:.0%} | {rep['left_out_share']:.2%} | {m['mean_kl']:.2e} | {m['top1']:.3f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mergekit", required=True, help="path of the mergekit-extract-lora executable")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--ranks", default="8")
    ap.add_argument("--norms-only", action="store_true", help="only the cost of leaving moved norms out")
    args = ap.parse_args()
    from bench_convert import run
    from lora2gguf.commands.convert import convert
    from lora2gguf.commands.merge import merge
    from lora2gguf.parity.metrics import compare
    from lora2gguf.llamacpp.runtime import LlamaRuntime
    from lora2gguf.weights.real_models import smollm2_f32_gguf
    from lora2gguf.commands.verify import DEFAULT_TEXT
    from peft_helpers import hf_dir_from_base

    WORK.mkdir(parents=True, exist_ok=True)
    f32 = smollm2_f32_gguf()
    base_hf = hf_dir_from_base(f32, f32.parent / "SmolLM2-135M-Instruct-hf")
    tuned = WORK / "tuned.gguf"
    if not tuned.is_file():
        merge(f32, [(SPACE / "json-r4", 1.0), (SPACE / "pirate-r4", 1.0)], tuned, quant="f32")
    tuned_hf = hf_dir_from_base(tuned, WORK / "tuned-hf")
    with LlamaRuntime(tuned, n_ctx=512) as rt:
        tokens = rt.tokenize(DEFAULT_TEXT)[:256]
        truth = rt.logits(tokens)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    if args.norms_only:
        return norms_cost(f32, tuned, tokens, 8)
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
                                      "--no-copy-tokenizer", "--quiet", "-e", "embed_tokens|lm_head",
                                      "--skip-undecomposable"],  # else it saves every norm in full
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
    norms_cost(f32, tuned, tokens, 8)


if __name__ == "__main__":
    main()
