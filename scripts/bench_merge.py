#!/usr/bin/env python3
"""Benchmark `lora2gguf merge --quant q4_k_m` against llama.cpp's own chain, llama-export-lora then
llama-quantize, side by side on the same files: wall time and peak RSS (GNU time), as ratios.

Bases: SmolLM2-135M-Instruct as F32 (540 MB, from the project's cache) and a generated ~1.5 GB F16
llama-shaped base (scripts/make_big_base.py). Adapters: plain LoRA, r=16 on all seven projections
(SmolLM2: made by the real peft library; big base: written in peft's format); llama-export-lora gets
the same adapter as a GGUF LoRA (lora2gguf convert, bit-identical to llama.cpp's converter for plain LoRA).
The two llama.cpp tools are built from the llama-cpp-python sdist's llama.cpp source into the cache
(build time is not timed). Each run starts with no output file; runs alternate ours / theirs after one
untimed warm-up of each, so both read from a warm page cache.

--quality adds, on SmolLM2 over 320 tokens of text, the KL of each q4_k_m route to the F32 reference
with the adapter (PEFT's math): (a) llama.cpp runtime LoRA on a q4_k_m base, (b) our merge from the F32
base, (c) our merge from the q4_k_m base, (d) llama-export-lora + llama-quantize.

    python scripts/bench_merge.py [--runs 3] [--only smollm2|big] [--quality] [--cache DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "scripts")]

LORA = dict(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                 "down_proj"])
PY = str(Path(sys.executable))


def build_tools(cache: Path) -> tuple[Path, Path]:
    """llama-export-lora and llama-quantize, built once (Release, native, no curl) into the cache."""
    build = cache / "llama.cpp-build"
    tools = build / "bin" / "llama-export-lora", build / "bin" / "llama-quantize"
    if all(t.is_file() for t in tools):
        return tools
    from llama_cpp_source import llama_cpp_source_or_exit

    src = llama_cpp_source_or_exit()
    subprocess.run(["cmake", "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
                    "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                    "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2), "--target",
                    "llama-export-lora", "llama-quantize"], check=True, stdout=subprocess.DEVNULL)
    return tools


def gguf_lora(adapter: Path, base: Path) -> Path:
    from lora2gguf.convert import convert

    out = adapter.with_suffix(".gguf")
    if not out.is_file():
        convert(adapter, base, out)
    return out


def smollm2_inputs(cache: Path) -> tuple[Path, Path]:
    from lora2gguf.real_models import smollm2_f32_gguf
    from peft_helpers import hf_dir_from_base, make_peft_adapter

    base = smollm2_f32_gguf()
    adapter = cache / "smollm2-lora"
    if not (adapter / "adapter_config.json").is_file():
        hf = hf_dir_from_base(base, base.parent / "SmolLM2-135M-Instruct-hf")
        make_peft_adapter(hf, adapter, seed=0, b_std=0.05, **LORA)
    return base, adapter


def big_inputs(cache: Path) -> tuple[Path, Path]:
    from make_big_base import make

    return make(cache)


def timed(cmd: list[str]) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds, peak RSS in MB) of one command, from GNU time."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as tf:
        r = subprocess.run(["/usr/bin/time", "-f", "%e %U %S %M", "-o", tf.name, *cmd], stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
        if r.returncode != 0:
            sys.exit(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr[-2000:]}")
        wall, user, sys_, rss = tf.read().split()[-4:]
    return float(wall), float(user) + float(sys_), int(rss) // 1024


def bench(name: str, base: Path, adapter: Path, tools: tuple[Path, Path], work: Path, runs: int) -> dict:
    export_lora, quantize = tools
    lora = gguf_lora(adapter, base)
    ours_out, mid, theirs_out = work / f"{name}-ours.gguf", work / f"{name}-export.gguf", work / f"{name}-theirs.gguf"

    def ours():
        ours_out.unlink(missing_ok=True)
        return [timed([str(ROOT / ".venv/bin/lora2gguf") if (ROOT / ".venv/bin/lora2gguf").exists() else "lora2gguf",
                       "merge", "--base", str(base), "--lora", str(adapter), "--quant", "q4_k_m", "-o", str(ours_out)])]

    def theirs():
        mid.unlink(missing_ok=True)
        theirs_out.unlink(missing_ok=True)
        return [timed([str(export_lora), "-m", str(base), "--lora", str(lora), "-o", str(mid)]),
                timed([str(quantize), str(mid), str(theirs_out), "Q4_K_M"])]

    ours(), theirs()  # warm-up: page cache, first-run costs
    res = {"ours": [], "export": [], "quantize": []}
    for _ in range(runs):
        res["ours"] += ours()
        e, q = theirs()
        res["export"].append(e)
        res["quantize"].append(q)
    med = lambda xs: statistics.median(xs)  # noqa: E731
    pair = [(e[0] + q[0], e[1] + q[1], max(e[2], q[2])) for e, q in zip(res["export"], res["quantize"])]
    row = {
        "base": name, "base_mb": base.stat().st_size // 2**20,
        "ours_s": med([r[0] for r in res["ours"]]), "ours_cpu": med([r[1] for r in res["ours"]]),
        "ours_mb": max(r[2] for r in res["ours"]),
        "export_s": med([r[0] for r in res["export"]]), "quantize_s": med([r[0] for r in res["quantize"]]),
        "pair_s": med([p[0] for p in pair]), "pair_cpu": med([p[1] for p in pair]), "pair_mb": max(p[2] for p in pair),
        "runs": res,
    }
    row["wall_ratio"], row["rss_ratio"] = row["ours_s"] / row["pair_s"], row["ours_mb"] / row["pair_mb"]
    row["cpu_ratio"] = row["ours_cpu"] / row["pair_cpu"]
    print(f"{name}: ours {row['ours_s']:.2f} s (CPU {row['ours_cpu']:.2f} s) {row['ours_mb']} MB | export-lora "
          f"{row['export_s']:.2f} s + quantize {row['quantize_s']:.2f} s = {row['pair_s']:.2f} s (CPU "
          f"{row['pair_cpu']:.2f} s), {row['pair_mb']} MB | wall x{row['wall_ratio']:.2f} CPU x{row['cpu_ratio']:.2f} "
          f"RSS x{row['rss_ratio']:.2f}  (all runs, (wall, CPU, MB): {res})", flush=True)
    return row


def quality(base: Path, adapter: Path, tools: tuple[Path, Path], work: Path) -> dict:
    """KL of each q4_k_m route to the F32 reference with the adapter, on 320 tokens of text."""
    from conftest import TEXT, reference_logits
    from lora2gguf.adapter import load_peft
    from lora2gguf.base import open_base
    from lora2gguf.merge import merge
    from lora2gguf.metrics import compare
    from lora2gguf.quantize import llama_quantize
    from lora2gguf.reference import reference_model
    from lora2gguf.runtime import LlamaRuntime
    from gguf import LlamaFileType

    lora = gguf_lora(adapter, base)
    q4 = work / "smollm2-base-q4_k_m.gguf"
    if not q4.is_file():
        llama_quantize(base, q4, LlamaFileType.MOSTLY_Q4_K_M)
    routes = {
        "(b) merge from F32": merge(base, [(adapter, 1.0)], work / "b.gguf", quant="q4_k_m", force=True),
        "(c) merge from q4_k_m": merge(q4, [(adapter, 1.0)], work / "c.gguf", quant="q4_k_m", force=True),
    }
    export_lora, quantize = tools
    subprocess.run([str(export_lora), "-m", str(base), "--lora", str(lora), "-o", str(work / "d-mid.gguf")],
                   check=True, capture_output=True)
    subprocess.run([str(quantize), str(work / "d-mid.gguf"), str(work / "d.gguf"), "Q4_K_M"], check=True,
                   capture_output=True)
    routes["(d) export-lora + quantize"] = work / "d.gguf"
    with LlamaRuntime(base, vocab_only=True) as rt:
        tokens = rt.tokenize(TEXT * 6)[:320]
    with open_base(base) as b:
        ref = reference_logits(reference_model(b, [(load_peft(adapter), 1.0)]), tokens)
    out = {}
    with LlamaRuntime(q4) as rt:
        out["(e) q4_k_m base, no adapter"] = compare(ref, rt.logits(tokens))
        rt.set_adapters([(lora, 1.0)])
        out["(a) runtime LoRA on q4_k_m"] = compare(ref, rt.logits(tokens))
    for label, path in routes.items():
        with LlamaRuntime(path) as rt:
            out[label] = compare(ref, rt.logits(tokens))
    with LlamaRuntime(base) as rt:
        out["(f) F32 base, no adapter"] = compare(ref, rt.logits(tokens))
    for label in sorted(out):
        m = out[label]
        print(f"{label:32s} mean KL {m['mean_kl']:.5f}  max KL {m['max_kl']:.4f}  top-1 {m['top1']:.3f}")
    b, d = out["(b) merge from F32"]["mean_kl"], out["(d) export-lora + quantize"]["mean_kl"]
    print(f"(b)/(d) = {b / d:.3f} (goal <= 1.05); {len(tokens)} tokens")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--only", choices=["smollm2", "big"])
    ap.add_argument("--quality", action="store_true", help="Also measure KL of the q4_k_m routes on SmolLM2.")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "lora2gguf-bench")
    a = ap.parse_args()
    a.cache.mkdir(parents=True, exist_ok=True)
    tools = build_tools(a.cache)
    work = Path(tempfile.mkdtemp(prefix="bench-merge-", dir=a.cache))
    try:
        rows = []
        if a.only in (None, "smollm2"):
            rows.append(bench("SmolLM2-135M F32", *smollm2_inputs(a.cache), tools, work, a.runs))
        if a.only in (None, "big"):
            rows.append(bench("big llama F16", *big_inputs(a.cache), tools, work, a.runs))
        print("\n| base | ours: wall (CPU), peak RSS | export-lora + quantize: wall (CPU), peak RSS | wall | CPU | RSS |")
        print("|---|---|---|---:|---:|---:|")
        for r in rows:
            print(f"| {r['base']} ({r['base_mb']} MB) | {r['ours_s']:.1f} s ({r['ours_cpu']:.1f} s), {r['ours_mb']} MB | "
                  f"{r['export_s']:.1f} + {r['quantize_s']:.1f} = {r['pair_s']:.1f} s ({r['pair_cpu']:.1f} s), "
                  f"{r['pair_mb']} MB | {r['wall_ratio']:.2f}× | {r['cpu_ratio']:.2f}× | {r['rss_ratio']:.2f}× |")
        if a.quality:
            quality(*smollm2_inputs(a.cache), tools, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
