"""Benchmark: LoRA training steps on SmolLM2-135M, `lora2gguf train` (the command users run) vs
transformers + PEFT.

Same weights (the Q4_1 GGUF users have, and a transformers copy of its dequantized weights), same token
ids, batch, sequence length, rank, alpha, dropout and targets (all-linear), fp32 on CPU, AdamW with
clipping. Ours is the CLI in a subprocess (tokens/s per step from the train_log.jsonl it writes, after
the warmup steps); PEFT's is the loop a user writes (`model(input_ids, labels=...)`, backward, step), in
its own subprocess. `--base-weights quantized` adds a third side: the frozen base kept as Q4_1 blocks.

    .venv/bin/python scripts/bench_train.py [--seq-len 128,256,1024 --batch 4 --rank 16 --steps 8 --warmup 3]
        [--base gemma3] [--base-weights] [--no-peft]
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
    """`lora2gguf train` as a user runs it; its log has each step's tokens/s."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [str(Path(sys.executable).parent / "lora2gguf"), "train", "--base", a.gguf, "--data", a.data, "-o", out,
               "--rank", str(a.rank), "--alpha", str(2 * a.rank), "--dropout", str(a.dropout), "--lr", "1e-4",
               "--steps", str(a.warmup + a.steps), "--batch-size", str(a.batch), "--seq-len", str(a.seq_len),
               "--device", "cpu", "--dtype", "fp32", "--base-weights", a.side.removeprefix("ours-") if "-" in a.side
               else "auto", "--force"]
        subprocess.run(cmd, check=True, capture_output=True)
        log = [json.loads(line) for line in (Path(out) / "train_log.jsonl").read_text().splitlines()]
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in log[a.warmup:]), "peak_rss_mb": rss}


def run_peft(a) -> dict:
    import peft
    import torch
    import transformers

    ids = torch.load(a.ids)
    model = transformers.AutoModelForCausalLM.from_pretrained(a.hf, dtype=torch.float32)
    model = peft.get_peft_model(model, peft.LoraConfig(r=a.rank, lora_alpha=2 * a.rank, lora_dropout=a.dropout,
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

    from lora2gguf.llamacpp.tokenizer import Tokenizer
    from lora2gguf.training.data import load_dataset
    from lora2gguf.weights.real_models import gemma3_f32_gguf, gemma3_gguf, smollm2_f32_gguf, smollm2_gguf
    from peft_helpers import hf_dir_from_base

    # the quantized file's weights, dequantized: transformers reads them from there
    gguf, f32, hf = ((smollm2_gguf, smollm2_f32_gguf, "SmolLM2-135M-Instruct-hf") if a.base == "smollm2" else
                     (gemma3_gguf, gemma3_f32_gguf, "gemma-3-270m-hf"))
    f32 = str(f32())
    a.gguf = str(gguf())
    a.hf = str(hf_dir_from_base(f32, Path(f32).parent / hf))
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
                                                        if k not in ("side", "rounds", "base_weights", "no_peft") and v is not None]
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{side} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", default="128,256,1024", help="one or a comma list")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--steps", type=int, default=8, help="measured steps (median tokens/s)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2, help="alternate the sides this many times; best of each")
    p.add_argument("--base-weights", action="store_true", help="also time --base-weights quantized")
    p.add_argument("--side", choices=["ours", "ours-quantized", "peft"])
    p.add_argument("--base", choices=["smollm2", "gemma3"], default="smollm2",
                   help="SmolLM2-135M-Instruct (Q4_1) or Gemma 3 270M (Q4_K_M)")
    p.add_argument("--no-peft", action="store_true", help="only lora2gguf (with --base-weights: the two paths)")
    for k in ("gguf", "hf", "data", "ids"):
        p.add_argument(f"--{k}")
    a = p.parse_args()
    if a.side:
        a.seq_len = int(a.seq_len)
        load0 = os.getloadavg()[0]
        res = run_peft(a) if a.side == "peft" else run_ours(a)
        res.setdefault("peak_rss_mb", peak_rss_mb())
        print(json.dumps(res | {"load": [load0, os.getloadavg()[0]]}))
        return
    import torch

    sides = ["ours"] + ([] if a.no_peft else ["peft"]) + (["ours-quantized"] if a.base_weights else [])
    name = "SmolLM2-135M-Instruct (Q4_1" if a.base == "smollm2" else "Gemma 3 270M (Q4_K_M"
    print(f"{name} GGUF; PEFT on its dequantized weights), fp32 CPU "
          f"({torch.get_num_threads()} threads), batch {a.batch}, rank {a.rank}, all-linear, dropout {a.dropout}, "
          f"median step of {a.steps} after {a.warmup}, best of {a.rounds} rounds\n")
    print("| seq len | lora2gguf train (tok/s) | transformers + PEFT (tok/s) | ratio |"
          + (" quantized base (tok/s) | quantized / resident |" if a.base_weights else "")
          + " peak RSS ours / PEFT (MB) | load avg |")
    print("|---:|---:|---:|---:|" + ("---:|---:|" if a.base_weights else "") + "---|---|")
    for seq_len in [int(x) for x in str(a.seq_len).split(",")]:
        b = argparse.Namespace(**vars(a))
        b.seq_len = seq_len
        with tempfile.TemporaryDirectory() as work:
            prepare(b, Path(work))
            results = {s: [] for s in sides}
            for _ in range(a.rounds):
                for side in results:
                    results[side].append(child(side, b))
                    print(seq_len, side, results[side][-1], file=sys.stderr)
        loads = [x for rs in results.values() for r in rs for x in r.pop("load")]
        best = {s: {k: (min if k == "peak_rss_mb" else max)(r[k] for r in rs) for k in rs[0]} for s, rs in results.items()}
        o, q = best["ours"], best.get("peft")
        row = (f"| {seq_len} | {o['tokens_per_s']:.0f} | " + ("– | – |" if q is None else
               f"{q['tokens_per_s']:.0f} | {o['tokens_per_s'] / q['tokens_per_s']:.2f}x |"))
        if a.base_weights:
            z = best["ours-quantized"]
            row += f" {z['tokens_per_s']:.0f} | {z['tokens_per_s'] / o['tokens_per_s']:.2f}x |"
        peft_rss = "–" if q is None else f"{q['peak_rss_mb']:.0f}"
        print(row + f" {o['peak_rss_mb']:.0f} / {peft_rss} | {min(loads):.1f}-{max(loads):.1f} |", flush=True)


if __name__ == "__main__":
    main()
