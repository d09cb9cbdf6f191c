"""Benchmark: one LoRA training step on SmolLM2-135M, `lora2gguf train` vs transformers + PEFT.

Same model weights (the F32 GGUF and a transformers copy of it), same token ids, batch, sequence length,
rank, alpha, dropout and targets (all-linear), fp32 on CPU, AdamW with clipping. Each side runs in its own
subprocess so that its peak RSS is its own. Ours is the real trainer (`lora2gguf.train.train`, tokens/s
from its log); PEFT's is the loop a user writes (`model(input_ids, labels=...)`, backward, step).

    .venv/bin/python scripts/bench_train.py [--batch 4 --seq-len 256 --rank 16 --steps 8 --warmup 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class StepClock:
    """Wall and CPU seconds of each step (CPU time is the steadier number on a shared machine)."""

    def __init__(self):
        self.marks = [(time.perf_counter(), time.process_time())]

    def __call__(self, *_):
        self.marks.append((time.perf_counter(), time.process_time()))

    def summary(self, tokens_per_step: int, skip: int) -> dict:
        steps = list(zip(self.marks, self.marks[1:]))[skip:]
        wall = statistics.median(b[0] - a[0] for a, b in steps)
        cpu = statistics.median(b[1] - a[1] for a, b in steps)
        return {"tokens_per_s": tokens_per_step / wall, "tokens_per_cpu_s": tokens_per_step / cpu}


def run_ours(a) -> dict:
    from lora2gguf.train import TrainConfig, train

    clock = StepClock()
    with tempfile.TemporaryDirectory() as out:
        train(TrainConfig(base=a.gguf, data=a.data, out=out, rank=a.rank, alpha=2 * a.rank, dropout=0.05,
                          lr=1e-4, steps=a.warmup + a.steps, batch_size=a.batch, seq_len=a.seq_len, device="cpu",
                          dtype="fp32", progress=False, force=True),
              on_step=clock)
    # the first mark is taken before setup (loading): skip it with the warmup steps
    return clock.summary(a.batch * a.seq_len, a.warmup)


def run_peft(a) -> dict:
    import peft
    import torch
    import transformers

    ids = torch.load(a.ids)
    model = transformers.AutoModelForCausalLM.from_pretrained(a.hf, dtype=torch.float32)
    model = peft.get_peft_model(model, peft.LoraConfig(r=a.rank, lora_alpha=2 * a.rank, lora_dropout=0.05,
                                                       target_modules=TARGETS, task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    clock = StepClock()
    for step in range(a.warmup + a.steps):
        batch = ids[(step * a.batch) % len(ids):][: a.batch]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        clock()
    return clock.summary(a.batch * a.seq_len, a.warmup)


def prepare(a, work: Path) -> None:
    """A JSONL of texts longer than seq_len, and the exact ids our trainer will see, for the PEFT side."""
    import random

    import torch

    from lora2gguf.data import Tokenizer, load_dataset
    from lora2gguf.real_models import smollm2_f32_gguf
    from peft_helpers import hf_dir_from_base

    a.gguf = str(smollm2_f32_gguf())
    a.hf = str(hf_dir_from_base(a.gguf, Path(a.gguf).parent / "SmolLM2-135M-Instruct-hf"))
    words = "the a of and to in is it that was for on with as at by cat dog sat mat sun moon tree fish".split()
    rng = random.Random(0)
    a.data = str(work / "data.jsonl")
    with open(a.data, "w") as f:
        for _ in range(4 * a.batch):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(2 * a.seq_len))}) + "\n")
    tok = Tokenizer(a.gguf)
    try:
        exs = load_dataset(a.data, tok, a.seq_len, warn=lambda m: None)
    finally:
        tok.close()
    assert all(len(e.ids) == a.seq_len for e in exs), "every sequence is exactly seq_len tokens: no padding"
    a.ids = str(work / "ids.pt")
    torch.save(torch.tensor([e.ids for e in exs]), a.ids)


def child(side: str, a) -> dict:
    argv = [sys.executable, __file__, "--side", side] + [f"--{k.replace('_', '-')}={v}" for k, v in vars(a).items()
                                                        if k not in ("side", "rounds") and v is not None]
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{side} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=8, help="measured steps (median tokens/s)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2, help="alternate ours/peft this many times; best of each")
    p.add_argument("--side", choices=["ours", "peft"])
    for k in ("gguf", "hf", "data", "ids"):
        p.add_argument(f"--{k}")
    a = p.parse_args()
    if a.side:
        load0 = os.getloadavg()[0]
        res = run_ours(a) if a.side == "ours" else run_peft(a)
        print(json.dumps(res | {"peak_rss_mb": peak_rss_mb(), "load": [load0, os.getloadavg()[0]]}))
        return
    import torch

    with tempfile.TemporaryDirectory() as work:
        prepare(a, Path(work))
        results = {"ours": [], "peft": []}
        for _ in range(a.rounds):
            for side in results:
                results[side].append(child(side, a))
                print(side, results[side][-1], file=sys.stderr)
    loads = [x for rs in results.values() for r in rs for x in r.pop("load")]
    best = {s: {k: (min if k == "peak_rss_mb" else max)(r[k] for r in rs) for k in rs[0]} for s, rs in results.items()}
    o, q = best["ours"], best["peft"]
    print(f"SmolLM2-135M, fp32 CPU ({torch.get_num_threads()} threads), batch {a.batch} x seq {a.seq_len}, rank {a.rank}, "
          f"all-linear, dropout 0.05, median step of {a.steps} after {a.warmup}, best of {a.rounds} rounds; 1-minute "
          f"load average {min(loads):.1f}-{max(loads):.1f} at the start and end of each run\n")
    print("| | tokens/s (wall) | tokens per CPU-second | peak RSS (MB) |\n|---|---:|---:|---:|")
    for name, r in (("lora2gguf train", o), ("transformers + PEFT", q)):
        print(f"| {name} | {r['tokens_per_s']:.0f} | {r['tokens_per_cpu_s']:.0f} | {r['peak_rss_mb']:.0f} |")
    print(f"| ratio (ours / PEFT) | {o['tokens_per_s'] / q['tokens_per_s']:.2f}x | "
          f"{o['tokens_per_cpu_s'] / q['tokens_per_cpu_s']:.2f}x | {o['peak_rss_mb'] / q['peak_rss_mb']:.2f}x |")


if __name__ == "__main__":
    main()
