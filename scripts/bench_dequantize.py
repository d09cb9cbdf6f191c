#!/usr/bin/env python3
"""Benchmark lora2gguf.weights.dequantize (torch) against gguf-py's numpy dequantizer, per type, on CPU with torch's
default thread count: a 4096×4096 matrix for every supported type, 14336×4096 (an 8B model's MLP) for Q4_K
and Q6_K. Prints a Markdown table: best-of-N wall time, GB/s of float32 output, and the speed-up.

The blocks are random bytes with realistic f16 scales (the work does not depend on the values); each result
is checked bit-identical to gguf-py's before it is timed.

On Linux, most of our time for a float32 result can be the page faults of the freshly allocated output
(torch maps 4 KiB pages; numpy asks for transparent huge pages): run with THP_MEM_ALLOC_ENABLE=1 in the
environment (read by torch at start-up) to see the dequantization itself. The header line says which.

    python scripts/bench_dequantize.py [--runs 5] [--types Q4_K,Q6_K] [--dtype bfloat16] [--threads N]
    python scripts/bench_dequantize.py --gguf FILE.gguf ...   # real files, per type: decode vs gguf-py
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q
from gguf.quants import dequantize as gguf_dequantize

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lora2gguf.weights.dequantize import SUPPORTED, dequantize  # noqa: E402

F16_FIELDS = {Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2), Q.Q8_0: (0,), Q.Q2_K: (80, 82),
              Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}
FLOATS = {Q.F32: np.float32, Q.F16: np.float16, Q.BF16: None}


def make_rows(qtype, rows: int, cols: int, rng) -> np.ndarray:
    block, type_size = GGML_QUANT_SIZES[qtype]
    if qtype == Q.BF16:  # the top half of float32 values
        return (rng.standard_normal((rows, cols), np.float32).view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    if qtype in FLOATS:
        return rng.standard_normal((rows, cols), np.float32).astype(FLOATS[qtype]).view(np.uint8)
    raw = rng.integers(0, 256, size=(rows * cols // block, type_size), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        raw[:, off:off + 2] = (rng.standard_normal(len(raw)) * 1e-3).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, -1)


def best(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5, help="timed runs of ours (best is kept); gguf-py gets 3")
    ap.add_argument("--types", help="comma-separated subset, e.g. Q4_K,Q6_K")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="our output dtype (gguf-py is always float32)")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    ap.add_argument("--gguf", nargs="+", help="instead: every quantized tensor of these files, per type, decoded as "
                    "the commands decode a base (fileio.gguf_read.decode: ggml's to_float) vs gguf-py")
    args = ap.parse_args()
    if args.gguf:
        return files(args.gguf)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    types = [Q[n.strip().upper()] for n in args.types.split(",")] if args.types else sorted(SUPPORTED)
    cases = [(t, 4096, 4096) for t in types] + [(t, 14336, 4096) for t in types if t in (Q.Q4_K, Q.Q6_K)]
    rng = np.random.default_rng(0)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, THP_MEM_ALLOC_ENABLE="
          f"{os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset')}; numpy {np.__version__}; output {args.dtype}; "
          f"best of {args.runs} (ours) / 3 (gguf-py)\n")
    print("| type | shape | ours ms | ours into a reused buffer ms | gguf-py ms | ours GB/s | gguf-py GB/s | speed-up |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for qtype, rows, cols in cases:
        raw = make_rows(qtype, rows, cols, rng)
        t = torch.from_numpy(raw)
        ref = gguf_dequantize(raw, qtype)
        ours = dequantize(t, qtype, cols)
        if not np.array_equal(ours.numpy().view(np.int32), np.ascontiguousarray(ref).view(np.int32)):
            sys.exit(f"{qtype.name}: not bit-identical to gguf-py")
        del ours, ref
        dequantize(t, qtype, cols, dtype)  # warm-up
        ms_ours = 1e3 * best(lambda: dequantize(t, qtype, cols, dtype), args.runs)
        buf = torch.empty(rows * cols, dtype=dtype)  # what weights.quantized's row blocks reuse
        ms_reused = 1e3 * best(lambda: dequantize(t, qtype, cols, dtype, out=buf), args.runs)
        ms_ref = 1e3 * best(lambda: gguf_dequantize(raw, qtype), 3)
        gb = rows * cols * dtype.itemsize / 1e9
        name = qtype.name + (" (gguf-py returns a view, ours a copy)" if qtype == Q.F32 else "")
        print(f"| {name} | {rows}×{cols} | {ms_ours:.1f} | {ms_reused:.1f} | {ms_ref:.1f} | {gb / ms_ours * 1e3:.2f} | "
              f"{rows * cols * 4 / 1e9 / ms_ref * 1e3:.2f} | {ms_ref / ms_ours:.1f}× |", flush=True)


def files(paths: list[str]) -> None:
    """Per file and type: seconds to decode all its tensors (each timed once, after one untimed pass that
    brings the file into the page cache), ours (decode, ggml's to_float) vs gguf-py, bit-identity checked."""
    from lora2gguf.fileio.gguf_read import GGUFFile, decode

    print("| file | type | tensors | values (M) | decode (ggml) s | gguf-py s | speed-up |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for path in paths:
        per: dict[str, list] = {}
        with GGUFFile(path) as f:
            for t in f.tensors.values():
                if t.type in (Q.F32, Q.F16):
                    continue
                raw = f.raw(t.name)
                raw.sum()  # page cache
                t0 = time.perf_counter()
                ours = decode(raw, t.type, t.shape)
                t1 = time.perf_counter()
                ref = gguf_dequantize(raw.reshape(1, -1), t.type).reshape(t.shape)
                t2 = time.perf_counter()
                if not np.array_equal(ours.view(np.int32), np.ascontiguousarray(ref, np.float32).view(np.int32)):
                    sys.exit(f"{path} {t.name}: not bit-identical to gguf-py")
                row = per.setdefault(t.type.name, [0, 0, 0.0, 0.0])
                row[0] += 1
                row[1] += t.n_elements
                row[2] += t1 - t0
                row[3] += t2 - t1
        for name, (n, values, ours_s, ref_s) in per.items():
            print(f"| {Path(path).name} | {name} | {n} | {values / 1e6:.0f} | {ours_s:.3f} | {ref_s:.2f} | "
                  f"{ref_s / ours_s:.0f}× |", flush=True)


if __name__ == "__main__":
    main()
