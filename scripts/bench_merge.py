#!/usr/bin/env python3
"""Benchmark `lora2gguf merge --quant q4_k_m` against llama.cpp's own chain, llama-export-lora then
llama-quantize, side by side on the same files: wall time and peak RSS (GNU time), as ratios; and for every
command, sampled every 50 ms while it runs, the peak extra disk (bytes allocated in the output directory
beyond the final output: intermediate and temp files) and the peak PSS of its process tree (a quantizer
child process included).

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
                                  [--code DIR] [--no-llama-cpp] [--big-type f16|q8_0]

--code DIR runs "ours" from another checkout of lora2gguf (e.g. `git archive COMMIT | tar -x -C DIR`), for
before/after numbers on the same inputs; --no-llama-cpp skips llama.cpp's chain (and building it).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
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
    from lora2gguf.commands.convert import convert

    out = adapter.with_suffix(".gguf")
    if not out.is_file():
        convert(adapter, base, out)
    return out


def smollm2_inputs(cache: Path) -> tuple[Path, Path]:
    from lora2gguf.weights.real_models import smollm2_f32_gguf
    from peft_helpers import hf_dir_from_base, make_peft_adapter

    base = smollm2_f32_gguf()
    adapter = cache / "smollm2-lora"
    if not (adapter / "adapter_config.json").is_file():
        hf = hf_dir_from_base(base, base.parent / "SmolLM2-135M-Instruct-hf")
        make_peft_adapter(hf, adapter, seed=0, b_std=0.05, **LORA)
    return base, adapter


def big_inputs(cache: Path, kind: str = "f16") -> tuple[Path, Path]:
    """The generated F16 base and its adapter; kind q8_0: that base quantized by llama.cpp (a quantized base,
    where the previous path's intermediate held the merged tensors in F32), cached beside it."""
    from make_big_base import make

    base, adapter = make(cache)
    if kind != "f16":
        from gguf import LlamaFileType

        from lora2gguf.llamacpp.quantize import llama_quantize

        q = base.with_name(base.name.replace("f16", kind))
        if not q.is_file():
            llama_quantize(base, q, LlamaFileType[f"MOSTLY_{kind.upper()}"])
        base = q
    return base, adapter


def _tree(root: int) -> list[int]:
    """root and its descendants (from /proc)."""
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += kids.get(p, [])
    return out


def _pss_kb(pids: list[int]) -> int:
    total = 0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except (OSError, ValueError):
            pass
    return total


def _disk_bytes(d: Path) -> int:
    """Bytes allocated on disk by the files in d (sparse-aware)."""
    total = 0
    for p in d.iterdir():
        try:
            total += p.stat().st_blocks * 512
        except FileNotFoundError:
            pass
    return total


class Sampler(threading.Thread):
    """Peak extra bytes on disk in `watch` (above what it held at the start) and peak PSS (kB) of a process
    tree, every `every` seconds until stopped."""

    def __init__(self, pid: int, watch: Path, every: float = 0.05):
        super().__init__(daemon=True)
        self.pid, self.watch, self.every = pid, watch, every
        self.start_bytes = _disk_bytes(watch)
        self.peak_disk = self.peak_pss = 0
        self.done = threading.Event()

    def run(self) -> None:
        n = 0
        while not self.done.is_set():
            self.peak_disk = max(self.peak_disk, _disk_bytes(self.watch) - self.start_bytes)
            if n % 4 == 0:  # the process tree walk costs more: every 4th sample
                self.peak_pss = max(self.peak_pss, _pss_kb(_tree(self.pid)))
            n += 1
            self.done.wait(self.every)


def timed(cmd: list[str], watch: Path | None = None, out: Path | None = None, env: dict | None = None,
          cwd: Path | None = None) -> dict:
    """One command under GNU time: wall and CPU seconds, peak RSS (MB); sampled while it runs, peak PSS of its
    process tree (MB) and peak extra disk in `watch` beyond the final size of `out` (MB)."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as tf:
        proc = subprocess.Popen(["/usr/bin/time", "-f", "%e %U %S %M", "-o", tf.name, *cmd], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)
        sampler = Sampler(proc.pid, watch or Path(tempfile.gettempdir()))
        sampler.start()
        _, err = proc.communicate()
        sampler.done.set()
        sampler.join()
        if proc.returncode != 0:
            sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{err[-2000:]}")
        wall, user, sys_, rss = tf.read().split()[-4:]
    final = out.stat().st_blocks * 512 if out is not None and out.exists() else 0
    return {"wall": float(wall), "cpu": float(user) + float(sys_), "rss": int(rss) // 1024,
            "pss": sampler.peak_pss // 1024, "extra_disk": max(0, sampler.peak_disk - final) // 2**20}


def ours_cmd(code: Path | None) -> tuple[list[str], dict | None]:
    """How to run our CLI: this checkout's, or another checkout's (--code) on this venv's packages (run from
    that directory: `python -m` puts the working directory first on sys.path)."""
    if code is not None:
        return [PY, "-m", "lora2gguf.cli"], os.environ | {"PYTHONPATH": str(code)}
    exe = ROOT / ".venv/bin/lora2gguf"
    return [str(exe) if exe.exists() else "lora2gguf"], None


def bench(name: str, base: Path, adapter: Path, tools: tuple[Path, Path] | None, work: Path, runs: int,
          code: Path | None = None) -> dict:
    ours_out, mid, theirs_out = work / f"{name}-ours.gguf", work / f"{name}-export.gguf", work / f"{name}-theirs.gguf"
    cli, env = ours_cmd(code)

    def ours():
        ours_out.unlink(missing_ok=True)
        return [timed([*cli, "merge", "--base", str(base), "--lora", str(adapter), "--quant", "q4_k_m", "-o",
                       str(ours_out)], work, ours_out, env, code)]

    def theirs():
        export_lora, quantize = tools
        lora = gguf_lora(adapter, base)
        mid.unlink(missing_ok=True)
        theirs_out.unlink(missing_ok=True)
        e = timed([str(export_lora), "-m", str(base), "--lora", str(lora), "-o", str(mid)], work, None)
        q = timed([str(quantize), str(mid), str(theirs_out), "Q4_K_M"], work, theirs_out)
        e["extra_disk"] = q["extra_disk"] = (mid.stat().st_blocks * 512 + 2**20 - 1) // 2**20  # mid + output at once
        mid.unlink()
        return [e, q]

    ours()  # warm-up: page cache, first-run costs
    if tools:
        theirs()
    res = {"ours": [], "export": [], "quantize": []}
    for _ in range(runs):
        res["ours"] += ours()
        if tools:
            e, q = theirs()
            res["export"].append(e)
            res["quantize"].append(q)
    med = lambda xs: statistics.median(xs)  # noqa: E731
    o = res["ours"]
    row = {"base": name, "base_mb": base.stat().st_size // 2**20, "out_mb": ours_out.stat().st_size // 2**20,
           "ours_s": med([r["wall"] for r in o]), "ours_cpu": med([r["cpu"] for r in o]),
           "ours_mb": max(r["rss"] for r in o), "ours_pss": max(r["pss"] for r in o),
           "ours_disk": max(r["extra_disk"] for r in o), "runs": res}
    line = (f"{name}: ours {row['ours_s']:.2f} s (CPU {row['ours_cpu']:.2f} s), peak RSS {row['ours_mb']} MB, peak "
            f"PSS {row['ours_pss']} MB, peak extra disk {row['ours_disk']} MB (output {row['out_mb']} MB)")
    if tools:
        pair = [(e["wall"] + q["wall"], e["cpu"] + q["cpu"], max(e["rss"], q["rss"]), max(e["pss"], q["pss"]))
                for e, q in zip(res["export"], res["quantize"])]
        row.update({"export_s": med([r["wall"] for r in res["export"]]),
                    "quantize_s": med([r["wall"] for r in res["quantize"]]),
                    "pair_s": med([p[0] for p in pair]), "pair_cpu": med([p[1] for p in pair]),
                    "pair_mb": max(p[2] for p in pair), "pair_pss": max(p[3] for p in pair),
                    "pair_disk": max(r["extra_disk"] for r in res["quantize"])})
        row["wall_ratio"], row["rss_ratio"] = row["ours_s"] / row["pair_s"], row["ours_mb"] / row["pair_mb"]
        row["cpu_ratio"] = row["ours_cpu"] / row["pair_cpu"]
        line += (f" | export-lora {row['export_s']:.2f} s + quantize {row['quantize_s']:.2f} s = {row['pair_s']:.2f} s "
                 f"(CPU {row['pair_cpu']:.2f} s), {row['pair_mb']} MB, PSS {row['pair_pss']} MB, extra disk "
                 f"{row['pair_disk']} MB | wall x{row['wall_ratio']:.2f} CPU x{row['cpu_ratio']:.2f} "
                 f"RSS x{row['rss_ratio']:.2f}")
    print(f"{line}  (all runs: {res})", flush=True)
    return row


def quality(base: Path, adapter: Path, tools: tuple[Path, Path], work: Path) -> dict:
    """KL of each q4_k_m route to the F32 reference with the adapter, on 320 tokens of text."""
    from conftest import TEXT, reference_logits
    from lora2gguf.adapters.peft import load_peft
    from lora2gguf.weights.base_model import open_base
    from lora2gguf.commands.merge import merge
    from lora2gguf.parity.metrics import compare
    from lora2gguf.llamacpp.quantize import llama_quantize
    from lora2gguf.parity.reference import reference_model
    from lora2gguf.llamacpp.runtime import LlamaRuntime
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
    ap.add_argument("--code", type=Path, help="Run 'ours' from this checkout of lora2gguf (before/after).")
    ap.add_argument("--no-llama-cpp", action="store_true", help="Skip llama.cpp's export-lora + quantize chain.")
    ap.add_argument("--big-type", choices=["f16", "q8_0"], default="f16", help="The big base's type.")
    a = ap.parse_args()
    a.cache.mkdir(parents=True, exist_ok=True)
    tools = None if a.no_llama_cpp else build_tools(a.cache)
    work = Path(tempfile.mkdtemp(prefix="bench-merge-", dir=a.cache))
    try:
        rows = []
        if a.only in (None, "smollm2"):
            rows.append(bench("SmolLM2-135M F32", *smollm2_inputs(a.cache), tools, work, a.runs, a.code))
        if a.only in (None, "big"):
            rows.append(bench(f"big llama {a.big_type.upper()}", *big_inputs(a.cache, a.big_type), tools, work, a.runs,
                              a.code))
        print("\n| base | ours: wall (CPU), peak RSS / PSS, peak extra disk |" +
              (" export-lora + quantize: wall (CPU), peak RSS / PSS, peak extra disk | wall | CPU | RSS |" if tools else ""))
        print("|---|---|" + ("---|---:|---:|---:|" if tools else ""))
        for r in rows:
            line = (f"| {r['base']} ({r['base_mb']} MB) | {r['ours_s']:.1f} s ({r['ours_cpu']:.1f} s), {r['ours_mb']} / "
                    f"{r['ours_pss']} MB, {r['ours_disk']} MB |")
            if tools:
                line += (f" {r['export_s']:.1f} + {r['quantize_s']:.1f} = {r['pair_s']:.1f} s ({r['pair_cpu']:.1f} s), "
                         f"{r['pair_mb']} / {r['pair_pss']} MB, {r['pair_disk']} MB | {r['wall_ratio']:.2f}× | "
                         f"{r['cpu_ratio']:.2f}× | {r['rss_ratio']:.2f}× |")
            print(line)
        if a.quality:
            if tools is None:
                sys.exit("--quality needs llama.cpp's tools (drop --no-llama-cpp)")
            quality(*smollm2_inputs(a.cache), tools, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
