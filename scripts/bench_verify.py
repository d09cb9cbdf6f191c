#!/usr/bin/env python3
"""End-to-end `lora2gguf verify` on SmolLM2-135M: F32 base + a PEFT adapter (converted on the fly) +
a merged q4_k_m file, 256 tokens. Wall time and peak RSS of the verify command in its own process.

    .venv/bin/python scripts/bench_verify.py [--runs 3]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def timed(cmd: list[str]) -> tuple[float, float, int, str]:
    t = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t
    out = p.stdout.read()
    return wall, ru.ru_maxrss / 1024, os.waitstatus_to_exitcode(status), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    from lora2gguf.commands.convert import convert
    from lora2gguf.commands.merge import merge
    from lora2gguf.weights.real_models import smollm2_f32_gguf
    from peft_helpers import hf_dir_from_base, make_peft_adapter

    base = smollm2_f32_gguf()
    hf = hf_dir_from_base(base, base.parent / "SmolLM2-135M-Instruct-hf")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        peft_dir = make_peft_adapter(hf, tmp / "adapter", seed=0, b_std=0.05, r=16, lora_alpha=32,
                                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                     "up_proj", "down_proj"])
        gguf = convert(peft_dir, base, tmp / "adapter.gguf")
        merged = merge(base, [(gguf, 1.0)], tmp / "merged-q4_k_m.gguf", quant="q4_k_m", progress=False)
        cmd = [sys.executable, "-m", "lora2gguf.cli", "verify", "--base", str(base), "--lora", str(peft_dir),
               "--merged", str(merged), "--tokens", "256", "--json"]
        runs = [timed(cmd) for _ in range(args.runs)]
    walls, rss = [r[0] for r in runs], [r[1] for r in runs]
    rep = json.loads(runs[-1][3])
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print("| runs | median wall s | min–max s | peak RSS MB | exit | runtime KL | merged KL | merged floor |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {len(runs)} | {statistics.median(walls):.1f} | {min(walls):.1f}–{max(walls):.1f} | {max(rss):.0f} | "
          f"{runs[-1][2]} | {rep['pairs']['runtime']['mean_kl']:.2g} | {rep['pairs']['merged']['mean_kl']:.3g} | "
          f"{rep.get('merged_quantization_floor', float('nan')):.3g} |")


if __name__ == "__main__":
    main()
