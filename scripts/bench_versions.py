#!/usr/bin/env python3
"""Before and after: the same lora2gguf commands from two checkouts (a git revision, worktree'd into
~/.cache/lora2gguf-bench/versions/REV, and this one), alternating round by round, each command a fresh
process; wall time and peak RSS (os.wait4) of every run, best and worst round per side, as Markdown.

    .venv/bin/python scripts/bench_versions.py --before 4126c66 [--rounds 2] [--only verify-smollm2,demo]

Cases (inputs are made once, outside the timing, and shared by both sides):
  verify-smollm2   verify --base SmolLM2 F32 --lora PEFT_DIR (r=16 all-linear), runtime view, 256 tokens
  verify-gemma3    verify --base Gemma 3 270M F32 --lora PEFT_DIR, 700 tokens of text (the default text x3)
  demo             lora2gguf demo (SmolLM2 Q4_1, the default recipe)
  convert          convert PEFT_DIR --base SmolLM2 F32 (f32 output)
  verify-gemma3-q4 verify --base Gemma 3 270M Q4_K_M --lora PEFT_DIR --merged MERGED (its q4_k_m merge, made once by
                   this checkout): the same-type floor, 128 tokens
  demo-gemma3      lora2gguf demo --base gemma3

Python writes bytecode as users' installs do (PYTHONDONTWRITEBYTECODE is removed from the environment:
without .pyc files every run recompiles lora2gguf, ~0.06 s of a 0.3 s convert).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
CACHE = Path.home() / ".cache" / "lora2gguf-bench" / "versions"


def checkout(rev: str) -> Path:
    sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", rev], capture_output=True, text=True,
                         check=True).stdout.strip()
    tree = CACHE / sha
    if not tree.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), sha], check=True,
                       capture_output=True)
    return tree


def inputs(work: Path) -> dict:
    from peft_helpers import hf_dir_from_base, make_peft_adapter

    from lora2gguf.commands.verify import DEFAULT_TEXT
    from lora2gguf.weights.real_models import gemma3_f32_gguf, gemma3_gguf, smollm2_f32_gguf, smollm2_gguf

    work.mkdir(parents=True, exist_ok=True)
    proj = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    smol, gemma = smollm2_f32_gguf(), gemma3_f32_gguf()
    smollm2_gguf()
    out = {"smol": smol, "gemma": gemma, "text": work / "long.txt"}
    out["text"].write_text((DEFAULT_TEXT + " ") * 3)
    for name, base, hf in (("smol_peft", smol, smol.parent / "SmolLM2-135M-Instruct-hf"),
                           ("gemma_peft", gemma, gemma.parent / "gemma-3-270m-hf")):
        d = work / name
        if not d.exists():
            make_peft_adapter(hf if hf.exists() else hf_dir_from_base(base, hf), d, seed=0, b_std=0.05, r=16,
                              lora_alpha=32, target_modules=proj)
        out[name] = d
    out["gemma_q4"], out["gemma_merged"] = gemma3_gguf(), work / "gemma-merged-q4_k_m.gguf"
    if not out["gemma_merged"].exists():
        subprocess.run([sys.executable, "-m", "lora2gguf.cli", "merge", "--base", str(out["gemma_q4"]), "--lora",
                        str(out["gemma_peft"]), "--quant", "q4_k_m", "-o", str(out["gemma_merged"])], check=True,
                       cwd=ROOT, capture_output=True)
    return out


def cases(i: dict, work: Path) -> dict[str, list[str]]:
    return {
        "verify-smollm2": ["verify", "--base", str(i["smol"]), "--lora", str(i["smol_peft"]), "--tokens", "256"],
        "verify-gemma3": ["verify", "--base", str(i["gemma"]), "--lora", str(i["gemma_peft"]), "--tokens", "700",
                          "--text", str(i["text"])],
        "demo": ["demo", "--workdir", str(work / "demo")],
        "convert": ["convert", str(i["smol_peft"]), "--base", str(i["smol"]), "-o", str(work / "c.gguf"),
                    "--force"],
        "verify-gemma3-q4": ["verify", "--base", str(i["gemma_q4"]), "--lora", str(i["gemma_peft"]), "--merged",
                             str(i["gemma_merged"]), "--tokens", "128"],
        "demo-gemma3": ["demo", "--base", "gemma3", "--workdir", str(work / "demo-gemma3")],
    }


# A small launcher process starts each measured command: ru_maxrss survives fork and exec, so a child forked
# from this (torch-laden) script would report this script's RSS as its own peak.
LAUNCHER = """
import json, os, subprocess, sys, time
t0 = time.perf_counter()
p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
err = p.stderr.read()
_, status, ru = os.wait4(p.pid, 0)
print(json.dumps({"wall": time.perf_counter() - t0, "rss": ru.ru_maxrss / 1024, "rc": os.waitstatus_to_exitcode(status),
                  "err": err.decode(errors="replace")[-1500:]}))
"""


def run(tree: Path, args: list[str]) -> tuple[float, float]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPATH"] = str(tree)
    r = json.loads(subprocess.run([sys.executable, "-c", LAUNCHER, sys.executable, "-m", "lora2gguf.cli", *args],
                                  capture_output=True, text=True, env=env, cwd=tree, check=True).stdout)
    if r["rc"] not in (0, 1):  # verify exits 1 on a FAIL: still a timed run
        raise SystemExit(f"{tree}: {args[0]} failed: {r['err']}")
    return r["wall"], r["rss"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True, help="git revision to compare this checkout with")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--only", default="", help="comma-separated case names")
    args = ap.parse_args()
    work = CACHE / "inputs"
    trees = {"before": checkout(args.before), "after": ROOT}
    todo = cases(inputs(work), work)
    if args.only:
        todo = {k: v for k, v in todo.items() if k in args.only.split(",")}
    for tree in trees.values():  # warm-up: bytecode written, files in the page cache
        run(tree, todo.get("convert", cases(inputs(work), work)["convert"]))
    print(f"before = {args.before}, after = the working tree; load average {os.getloadavg()[0]:.1f} at the start")
    print("\n| case | before: wall s best–worst | RSS MB | after: wall s best–worst | RSS MB | after/before (best) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, cmd in todo.items():
        res: dict[str, list] = {"before": [], "after": []}
        for _ in range(args.rounds):
            for side, tree in trees.items():
                res[side].append(run(tree, cmd))
        b, a = res["before"], res["after"]
        fmt = lambda r: f"{min(x[0] for x in r):.2f}–{max(x[0] for x in r):.2f} | {max(x[1] for x in r):.0f}"  # noqa: E731
        print(f"| {name} | {fmt(b)} | {fmt(a)} | {min(x[0] for x in a) / min(x[0] for x in b):.2f}× |", flush=True)
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end, {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
