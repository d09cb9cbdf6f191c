"""Benchmark `lora2gguf convert` against llama.cpp's convert_lora_to_gguf.py on SmolLM2-135M-Instruct.

Same adapter for both (made by the real peft library: r=16, alpha=32, all-linear), same output type
(f32), each tool a fresh process, runs interleaved so that machine load hits both alike. Wall time, CPU
time (user+sys) and peak RSS come from os.wait4 on each process. Then correctness: llama.cpp
(llama-cpp-python) runs each tool's file on the F32 base, compared with the PyTorch reference that
applies the adapter with PEFT's math (mean KL, top-1), for plain LoRA, rsLoRA and rank/alpha patterns.
Finally the extra KL of --outtype f16/bf16/q8_0 over our f32 file. The floor, run in the same rounds: a
python that only imports numpy, gguf and click, the libraries convert is built on.

    .venv/bin/python scripts/bench_convert.py [--runs 5]

llama.cpp's script is taken from the llama-cpp-python sdist (tests/llama_cpp_source.py) and run with
this venv's python (transformers installed), offline, with `--base` an HF directory of SmolLM2 made by
tests/peft_helpers.hf_dir_from_base. Outputs go to ~/.cache/lora2gguf-bench/convert.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
CACHE = Path.home() / ".cache" / "lora2gguf-bench" / "convert"
FLOOR = "floor: python -c 'import numpy, gguf, click'"


# A small launcher process starts each measured command: ru_maxrss survives fork and exec, so a child
# forked from this (torch-laden) script would report this script's RSS as its own peak.
LAUNCHER = """
import json, os, subprocess, sys, time
t0 = time.perf_counter()
p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
err = p.stderr.read()
_, status, ru = os.wait4(p.pid, 0)
print(json.dumps({"wall": time.perf_counter() - t0, "cpu": ru.ru_utime + ru.ru_stime, "rss": ru.ru_maxrss / 1024,
                  "rc": os.waitstatus_to_exitcode(status), "err": err.decode(errors="replace")[-2000:]}))
"""


def run(cmd: list[str]) -> dict:
    """Run cmd to completion; wall seconds, CPU seconds (user+sys) and peak RSS (MB) of that process."""
    # bytecode written as users' installs write it: without it every run recompiles lora2gguf (~0.06 s)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    r = json.loads(subprocess.run([sys.executable, "-c", LAUNCHER, *cmd], capture_output=True, text=True, env=env,
                                  check=True).stdout)
    if r["rc"] != 0:
        raise SystemExit(f"{cmd[:3]}... failed ({r['rc']}):\n{r['err']}")
    return r


def ours_cmd(adapter: Path, base: Path, out: Path, outtype: str = "f32") -> list[str]:
    return [sys.executable, "-m", "lora2gguf.cli", "convert", str(adapter), "--base", str(base), "-o", str(out),
            "--outtype", outtype, "--force"]


def theirs_cmd(adapter: Path, hf_dir: Path, out: Path) -> list[str]:
    from llama_cpp_source import llama_cpp_source_or_exit

    src = llama_cpp_source_or_exit()
    return [sys.executable, str(src / "convert_lora_to_gguf.py"), "--base", str(hf_dir), "--outtype", "f32",
            "--outfile", str(out), str(adapter)]


def adapters(hf_dir: Path) -> dict[str, Path]:
    from peft_helpers import make_peft_adapter

    CACHE.mkdir(parents=True, exist_ok=True)
    plain = CACHE / "plain"
    if not (plain / "adapter_config.json").is_file():
        make_peft_adapter(hf_dir, plain, seed=0, b_std=0.02, r=16, lora_alpha=32, target_modules="all-linear")
    rs = CACHE / "rslora"
    if not (rs / "adapter_config.json").is_file():  # same tensors; rsLoRA only changes PEFT's scale
        shutil.copytree(plain, rs, dirs_exist_ok=True)
        cfg = json.loads((rs / "adapter_config.json").read_text())
        cfg["use_rslora"] = True
        (rs / "adapter_config.json").write_text(json.dumps(cfg))
    pat = CACHE / "patterns"
    if not (pat / "adapter_config.json").is_file():
        make_peft_adapter(hf_dir, pat, seed=1, b_std=0.02, r=16, lora_alpha=32, target_modules="all-linear",
                          rank_pattern={"v_proj": 8, "down_proj": 32}, alpha_pattern={"o_proj": 8, "up_proj": 64})
    return {"plain": plain, "rslora": rs, "patterns": pat}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()

    import numpy as np

    from conftest import TEXT, reference_logits
    from lora2gguf.adapters.peft import load_peft
    from lora2gguf.weights.base_model import open_base
    from lora2gguf.parity.metrics import compare
    from lora2gguf.parity.reference import reference_model
    from lora2gguf.llamacpp.runtime import LlamaRuntime
    from lora2gguf.weights.real_models import smollm2_f32_gguf, smollm2_gguf
    from peft_helpers import hf_dir_from_base

    q4, f32 = smollm2_gguf(), smollm2_f32_gguf()
    hf_dir = hf_dir_from_base(f32, f32.parent / "SmolLM2-135M-Instruct-hf")
    ads = adapters(hf_dir)
    out = CACHE / "out"
    out.mkdir(exist_ok=True)

    # -- speed and memory ------------------------------------------------------------------------
    tools = {
        "lora2gguf convert, --base GGUF (Q4_1)": lambda: ours_cmd(ads["plain"], q4, out / "ours.gguf"),
        "lora2gguf convert, --base HF dir": lambda: ours_cmd(ads["plain"], hf_dir, out / "ours-hf.gguf"),
        # what any convert on the libraries we must use pays before it reads a byte (the import floor)
        FLOOR: lambda: [sys.executable, "-c", "import numpy, gguf, click"],
        "llama.cpp convert_lora_to_gguf.py, --base HF dir": lambda: theirs_cmd(ads["plain"], hf_dir, out / "theirs.gguf"),
    }
    results: dict[str, list[dict]] = {k: [] for k in tools}
    run(tools[next(iter(tools))]())  # warm the page cache for both tools' inputs
    run(list(tools.values())[-1]())
    for _ in range(args.runs):
        for name, cmd in tools.items():
            results[name].append(run(cmd()))
    peer = list(tools)[-1]
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("wall", "cpu", "rss")} for k, v in results.items()}
    print(f"\nSmolLM2-135M-Instruct, PEFT adapter r=16 alpha=32 all-linear (210 modules), f32 output, "
          f"median of {args.runs} runs, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end\n")
    print("| tool | wall s | CPU s | peak RSS MB | wall vs llama.cpp | RSS vs llama.cpp |")
    print("|---|---:|---:|---:|---:|---:|")
    for k, m in med.items():
        speed = "1×" if k == peer else f"{med[peer]['wall'] / m['wall']:.1f}× faster"
        mem = "1×" if k == peer else f"{m['rss'] / med[peer]['rss']:.2f}×"
        print(f"| {k} | {m['wall']:.2f} | {m['cpu']:.2f} | {m['rss']:.0f} | {speed} | {mem} |")
    for k, v in results.items():
        print(f"- {k}: wall {min(r['wall'] for r in v):.2f}–{max(r['wall'] for r in v):.2f} s over {len(v)} runs")
    floor = med[FLOOR]["wall"]
    for k in list(tools)[:2]:
        print(f"- {k}: {med[k]['wall'] / floor:.2f}× the import floor, {med[k]['wall'] - floor:.2f} s above it")

    # -- correctness ------------------------------------------------------------------------------
    print("\n| adapter | tool | mean KL vs PEFT reference | max KL | top-1 |")
    print("|---|---|---:|---:|---:|")
    with LlamaRuntime(f32) as rt:
        tokens = rt.tokenize(TEXT)
        base_logits = rt.logits(tokens)
        for kind, adapter in ads.items():
            files = {"lora2gguf": out / f"ours-{kind}.gguf", "llama.cpp": out / f"theirs-{kind}.gguf"}
            run(ours_cmd(adapter, q4, files["lora2gguf"]))
            run(theirs_cmd(adapter, hf_dir, files["llama.cpp"]))
            with open_base(f32) as b:
                ref = reference_logits(reference_model(b, [(load_peft(adapter), 1.0)]), tokens)
            moved = compare(base_logits, ref)["mean_kl"]
            for tool, path in files.items():
                rt.set_adapters([(path, 1.0)])
                m = compare(ref, rt.logits(tokens))
                print(f"| {kind} (adapter moves the base by KL {moved:.3f}) | {tool} | {m['mean_kl']:.2e} | "
                      f"{m['max_kl']:.2e} | {m['top1']:.1%} |")
        rt.set_adapters([])

        # -- output types -------------------------------------------------------------------------
        print("\n| --outtype | file KB | extra mean KL over f32 | max KL | top-1 vs f32 |")
        print("|---|---:|---:|---:|---:|")
        rt.set_adapters([(out / "ours-plain.gguf", 1.0)])
        f32_logits = rt.logits(tokens)
        for outtype in ("f32", "f16", "bf16", "q8_0"):
            path = out / f"ours-plain-{outtype}.gguf"
            run(ours_cmd(ads["plain"], q4, path, outtype))
            rt.set_adapters([(path, 1.0)])
            m = compare(f32_logits, rt.logits(tokens))
            print(f"| {outtype} | {path.stat().st_size / 1024:.0f} | {m['mean_kl']:.1e} | {m['max_kl']:.1e} | {m['top1']:.1%} |")
        rt.set_adapters([])
    print(f"\n{len(tokens)} tokens of tests/conftest.py TEXT; numpy {np.__version__}")


if __name__ == "__main__":
    main()
