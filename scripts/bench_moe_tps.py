#!/usr/bin/env python3
"""llama.cpp's speed with a runtime expert LoRA against the merged file, on the Qwen3-30B-A3B-shaped base of
scripts/make_big_base.py (`--shape qwen3moe-30b-a3b`, Q4_K_M, 2 of its 48 layers): the adapter (attention
and expert LoRA, r=16) converted by `lora2gguf convert`, merged by `lora2gguf merge --quant q4_k_m`, then
each file loaded as llama.cpp serves it (its repacked CPU kernels, 2 threads), alternating for --rounds:
prompt processing (a 256-token prompt, tokens/s) and generation (64 greedy tokens, tokens/s). Best and worst
round of each, as Markdown.

    .venv/bin/python scripts/bench_moe_tps.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

import make_big_base  # noqa: E402

from lora2gguf.commands.convert import convert  # noqa: E402
from lora2gguf.commands.merge import merge  # noqa: E402
from lora2gguf.llamacpp.runtime import LlamaRuntime  # noqa: E402

SHAPE = "qwen3moe-30b-a3b"


def speeds(path: Path, adapters: list, prompt: list[int], n_gen: int) -> tuple[float, float]:
    """(prompt tokens/s, generated tokens/s) for one load of `path` with these runtime adapters."""
    with LlamaRuntime(path, n_ctx=512, n_threads=2) as rt:
        rt.set_adapters(adapters)
        t = time.perf_counter()
        rt.logits(prompt)
        pp = len(prompt) / (time.perf_counter() - t)
        t = time.perf_counter()
        out = rt.greedy(prompt[:8], n_gen)
        tg = len(out) / (time.perf_counter() - t)
    return pp, tg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cache", type=Path, default=make_big_base.default_dir())
    a = ap.parse_args()
    base, adapter = make_big_base.make(a.cache, shape=SHAPE, quant="q4_k_m", log=print)
    lora = a.cache / f"{adapter.name}.gguf"
    merged = a.cache / f"{base.stem}-merged-q4_k_m.gguf"
    if not lora.is_file():
        convert(adapter, base, lora)
    if not merged.is_file():
        merge(base, [(lora, 1.0)], merged, quant="q4_k_m", progress=False)
    prompt = [1] + [300 + (7 * i) % 5000 for i in range(255)]
    rows: dict[str, list] = {"runtime LoRA (base + expert LoRA GGUF)": [], "merged q4_k_m": []}
    for _ in range(a.rounds):
        rows["runtime LoRA (base + expert LoRA GGUF)"].append(speeds(base, [(lora, 1.0)], prompt, 64))
        rows["merged q4_k_m"].append(speeds(merged, [], prompt, 64))
    print(f"{base.name} ({base.stat().st_size / 1e9:.2f} GB), LoRA {lora.stat().st_size / 1e6:.0f} MB, "
          f"{a.rounds} rounds, 2 threads\n")
    print("| file | prompt tokens/s (256) best–worst | generation tokens/s (64) best–worst |\n|---|---:|---:|")
    for name, r in rows.items():
        pp, tg = [x[0] for x in r], [x[1] for x in r]
        print(f"| {name} | {max(pp):.1f}–{min(pp):.1f} | {max(tg):.2f}–{min(tg):.2f} |")
    base_tg = max(x[1] for x in rows["runtime LoRA (base + expert LoRA GGUF)"])
    print(f"\nmerged / runtime generation speed: {max(x[1] for x in rows['merged q4_k_m']) / base_tg:.2f}×")


if __name__ == "__main__":
    main()
