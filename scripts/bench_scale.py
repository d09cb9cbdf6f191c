#!/usr/bin/env python3
"""Issue 17: `lora2gguf train`, `verify` and `merge --quant q4_k_m` on a large Q4_K_M base: peak memory
of the whole process tree (PSS, scripts/memwatch.py), wall time and extra disk, each command a child
process of this venv's `lora2gguf` CLI under a watchdog that kills its tree above the limit,
1.25 × the GGUF's size + 1.5 GB (GB = 1e9 bytes), or below --min-free-gb of free disk.

The base, its PEFT adapter (r=16, all seven projections) and a training JSONL come from
scripts/make_big_base.py (random weights; made once into the cache). Each command gets a fresh private
directory for its TMPDIR and outputs; extra disk is that directory's peak size (du), with the
filesystem's peak free-space drop as a cross-check (it also counts other users' writes). Prints a
Markdown table; writes JSON (with a PSS timeline) and each command's log, its lines stamped with time
and PSS, beside it.

    .venv/bin/python scripts/bench_scale.py [--shape 8b] [--only train,verify,merge] [--limit-gb G] [--steps 2]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

import make_big_base  # noqa: E402
import memwatch  # noqa: E402
from memwatch import GB  # noqa: E402

CLI = str(Path(sys.executable).parent / "lora2gguf")  # this venv's entry point


def commands(name: str, base: Path, adapter: Path, data: Path, out: Path, steps: int) -> list[str]:
    return {
        "train": [CLI, "train", "--base", str(base), "--data", str(data), "-o", str(out / "adapter"),
                  "--batch-size", "1", "--seq-len", "128", "--grad-checkpointing", "--steps", str(steps),
                  "--device", "cpu"],
        "verify": [CLI, "verify", "--base", str(base), "--lora", str(adapter), "--tokens", "128", "--json"],
        "merge": [CLI, "merge", "--base", str(base), "--lora", str(adapter), "--quant", "q4_k_m",
                  "-o", str(out / "merged-q4_k_m.gguf")],
    }[name]


def bench(name: str, cmd: list[str], work: Path, limit: float, min_free: float, results: Path) -> dict:
    (work / "tmp").mkdir(parents=True)
    env = dict(os.environ, TMPDIR=str(work / "tmp"), PYTHONUNBUFFERED="1")
    log = results.with_name(f"{results.stem}-{name}.log")
    print(f"{name}: {' '.join(cmd)}  (log: {log})", flush=True)
    r = memwatch.run(cmd, limit, (work,), min_free, env=env, log=log)
    ran = r.rc == 0 or (name == "verify" and r.rc == 1)  # verify exits 1 when a pair misses its threshold
    status = (f"killed: {r.killed}" if r.killed else f"failed (exit {r.rc})" if not ran else
              "pass" if r.peak_pss <= limit else "over the limit")
    top = r.watch.top()
    row = {"command": name, "argv": cmd, "rc": r.rc, "status": status, "limit_gb": limit / GB, "wall_s": r.wall_s,
           "peak_pss_gb": r.peak_pss / GB, "peak_at_s": top.t if top else None,
           "peak_pss_file_gb": top.pss_file / GB if top else None, "peak_pss_one_sample_gb": r.watch.peak("pss") / GB,
           "extra_disk_gb": r.peak_disk / GB, "free_drop_gb": r.peak_free_drop / GB,
           "max_processes": max((s.nproc for s in r.watch.samples), default=0),
           "sample_interval_s": r.wall_s / max(1, len(r.watch.samples)),
           "log_tail": log.read_text().splitlines()[-8:], "timeline_t_pss_file_disk": r.watch.timeline()}
    print(f"  {status}, exit {r.rc}, peak PSS {row['peak_pss_gb']:.2f} GB (file pages "
          f"{row['peak_pss_file_gb'] or 0:.2f}) at {row['peak_at_s'] or 0:.0f} s, "
          f"{r.wall_s:.0f} s, extra disk {row['extra_disk_gb']:.2f} GB (free-space drop "
          f"{row['free_drop_gb']:.2f} GB)", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=make_big_base.SHAPES, default="8b")
    ap.add_argument("--only", default="train,verify,merge", help="Comma-separated subset, run in this order.")
    ap.add_argument("--limit-gb", type=float, help="PSS limit (default: 1.25 × the GGUF's size + 1.5).")
    ap.add_argument("--min-free-gb", type=float, default=5.0, help="Kill a command when free disk falls below.")
    ap.add_argument("--steps", type=int, default=2, help="train's optimizer steps.")
    ap.add_argument("--cache", type=Path, default=make_big_base.default_dir())
    ap.add_argument("--json", type=Path, help="Results file (default: CACHE/bench-scale-SHAPE.json).")
    a = ap.parse_args()
    names = a.only.split(",")
    if unknown := set(names) - {"train", "verify", "merge"}:
        sys.exit(f"--only: unknown {', '.join(sorted(unknown))}")

    base, adapter = make_big_base.make(a.cache, shape=a.shape, quant="q4_k_m", log=print)
    data = a.cache / make_big_base.DATA_NAME
    if not data.is_file():
        make_big_base.write_data(data)
    size = base.stat().st_size
    limit = a.limit_gb * GB if a.limit_gb else 1.25 * size + 1.5 * GB
    results = a.json or a.cache / f"bench-scale-{a.shape}.json"
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    meta = {"shape": a.shape, "base": str(base), "base_gb": size / GB, "limit_gb": limit / GB,
            "commit": commit + ("+dirty" if dirty else ""), "date": datetime.date.today().isoformat(),
            "load_before": os.getloadavg()[0], "cpus": os.cpu_count()}
    print(f"{base.name}: {size / GB:.2f} GB, limit {limit / GB:.2f} GB; commit {meta['commit']}; "
          f"load average {meta['load_before']:.1f} on {meta['cpus']} cores", flush=True)
    rows = []
    for name in names:
        work = Path(tempfile.mkdtemp(prefix=f"scale-{a.shape}-{name}-", dir=a.cache))
        try:
            rows.append(bench(name, commands(name, base, adapter, data, work, a.steps), work,
                              limit, a.min_free_gb * GB, results))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        results.write_text(json.dumps(meta | {"load_after": os.getloadavg()[0], "rows": rows}, indent=1))

    print(f"\n{base.name} ({size / GB:.2f} GB), commit {meta['commit']}, {meta['date']}\n")
    print("| command | peak PSS GB | limit GB | result | exit | wall s | extra disk GB |")
    print("|---|---:|---:|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['command']} | {r['peak_pss_gb']:.2f} | {r['limit_gb']:.2f} | {r['status']} | {r['rc']} | "
              f"{r['wall_s']:.0f} | {r['extra_disk_gb']:.2f} |")
    print(f"\n{results}")


if __name__ == "__main__":
    main()
