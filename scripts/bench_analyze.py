#!/usr/bin/env python3
"""`lora2gguf analyze` on SmolLM2-135M-Instruct with an r=16 all-linear adapter (made by the real peft
library, 210 modules): the target is ≤ 1 s. Measured in-process after imports (best of --runs), beside
the naive peer on the same machine at the same time: numpy's SVD of each dense ΔW = s·B·A (both on one
BLAS thread, which is faster for either on a loaded 2-core machine). Also the
whole `lora2gguf analyze` command as a fresh process (imports included), PEFT directory and GGUF LoRA.

    .venv/bin/python scripts/bench_analyze.py [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
CACHE = Path.home() / ".cache" / "lora2gguf-bench" / "analyze"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    from lora2gguf.adapters.gguf_lora_write import gguf_from_peft
    from lora2gguf.adapters.load import load_for_base
    from lora2gguf.commands.analyze import analyze
    from lora2gguf.adapters.lowrank import small_matrix_threads
    from lora2gguf.weights.real_models import smollm2_f32_gguf
    from peft_helpers import hf_dir_from_base, make_peft_adapter

    f32 = smollm2_f32_gguf()
    hf = hf_dir_from_base(f32, f32.parent / "SmolLM2-135M-Instruct-hf")
    CACHE.mkdir(parents=True, exist_ok=True)
    adapter = CACHE / "r16-all-linear"
    if not (adapter / "adapter_config.json").is_file():
        make_peft_adapter(hf, adapter, seed=0, r=16, lora_alpha=32, target_modules="all-linear")
    gguf = CACHE / "r16-all-linear.gguf"
    if not gguf.is_file():
        gguf_from_peft(adapter, f32, gguf)

    ours, peer = [], []
    for _ in range(args.runs):
        t = time.perf_counter()
        report = analyze(adapter)
        ours.append(time.perf_counter() - t)
        t = time.perf_counter()
        a = load_for_base(adapter)
        with small_matrix_threads():  # on a loaded machine more BLAS threads only slow it down
            for m in a.modules.values():
                np.linalg.svd(m.delta().astype(np.float64), compute_uv=False)
        peer.append(time.perf_counter() - t)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; {len(report['modules'])} modules, "
          f"rank {report['ranks']}")
    print(f"analyze (in-process, PEFT dir): best {min(ours):.3f} s of {args.runs} ({', '.join(f'{x:.3f}' for x in ours)})")
    print(f"dense numpy SVD of every ΔW (peer): best {min(peer):.3f} s; ratio {min(peer) / min(ours):.1f}x")
    for label, path in (("PEFT dir", adapter), ("GGUF LoRA", gguf)):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "lora2gguf.cli", "analyze", str(path)], check=True,
                       stdout=subprocess.DEVNULL)
        print(f"`lora2gguf analyze` process, {label}: {time.perf_counter() - t:.2f} s wall (imports included)")
    print(report["verdict"])


if __name__ == "__main__":
    main()
