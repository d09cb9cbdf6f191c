#!/usr/bin/env python3
"""The machine's matmul floor: torch float32 GFLOP/s on the cores in use, for the shapes a 135M-270M model's
(and an 8B's, at 128 tokens) forward pass multiplies (tokens × n_embd by n_embd × n_ff, and by the vocabulary
head), best of 5. A verb's
floor is its FLOPs over this rate: a forward pass of T tokens through P weights costs 2·P·T FLOPs (verify
runs four: reference and llama.cpp, each with and without the adapter).

    .venv/bin/python scripts/bench_floor.py [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch

SHAPES = {"SmolLM2 MLP (256×576 @ 576×1536)": (256, 576, 1536), "SmolLM2 head (256×576 @ 576×49152)": (256, 576, 49152),
          "Gemma 3 MLP (256×640 @ 640×2048)": (256, 640, 2048), "Gemma 3 head (256×640 @ 640×262144)": (256, 640, 262144),
          "Llama 3.1 8B MLP (128×4096 @ 4096×14336)": (128, 4096, 14336)}


def gflops(m: int, k: int, n: int) -> float:
    a, b = torch.randn(m, k), torch.randn(k, n)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * m * k * n / best / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    torch.set_num_threads(ap.parse_args().threads)
    print(f"| shape | GFLOP/s ({torch.get_num_threads()} threads) |\n|---|---:|")
    for name, shape in SHAPES.items():
        print(f"| {name} | {gflops(*shape):.0f} |")


if __name__ == "__main__":
    main()
