#!/usr/bin/env python3
"""How much of the weight space do the demo's behaviours need? On SmolLM2-135M-Instruct:

1. trains the demo's two adapters with the demo's recipe (rank 4, all linear projections of layers 20-29,
   20 steps; `lora2gguf demo` trains the same) and one at rank 16 on the json data, same recipe otherwise;
2. `analyze`s each;
3. `resize`s the rank-16 one to K = 1, 2, 4, 8, 16 and to --energy 0.9 / 0.99, and the demo's adapters to the
   ranks 1, 2 and --energy 0.9, as f16 GGUF LoRAs; for each, the size and the KL cost as `lora2gguf verify
   --base F32 --lora ORIGINAL_PEFT_DIR --runtime-lora RESIZED.gguf` measures it (its runtime pair: llama.cpp
   running the resized file on the F32 copy of the base vs the PyTorch reference with the original adapter;
   see KLCost). --verify-rows N also runs verify itself on the first N rows, as a cross-check.

Prints Markdown tables for BENCHMARKS.md / README. Outputs in ~/.cache/lora2gguf-bench/space.

    .venv/bin/python scripts/bench_space.py [--verify-rows N]
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WORK = Path.home() / ".cache" / "lora2gguf-bench" / "space"


def train_adapter(base: Path, behaviour, rank: int, name: str) -> Path:
    from lora2gguf.demo import DEMO_DATA, Recipe
    from lora2gguf.training.config import TrainConfig
    from lora2gguf.commands.train import train

    out = WORK / name
    if (out / "adapter_config.json").is_file():
        return out
    r = Recipe()
    with __import__("lora2gguf.weights.base_model", fromlist=["open_base"]).open_base(base) as b:
        layers = r.layers(b.spec.n_layer)
    t = time.perf_counter()
    res = train(TrainConfig(base=str(base), data=str(DEMO_DATA / behaviour.data), out=str(out), rank=rank,
                            alpha=2 * rank, lr=r.lr, steps=r.steps, batch_size=r.batch_size, seq_len=r.seq_len,
                            dropout=0.0, targets="all-linear", layers=layers, force=True, progress=False, seed=0))
    print(f"trained {name}: rank {rank}, layers {layers}, loss {res.losses[0]:.3f} → {res.losses[-1]:.3f} "
          f"({time.perf_counter() - t:.0f} s)")
    return out


class KLCost:
    """What `lora2gguf verify --base F32 --lora ORIGINAL --runtime-lora RESIZED.gguf` reports as its runtime
    pair (mean KL of llama.cpp running the resized file vs the PyTorch reference with the original adapter,
    on verify's default text), computed with verify's own parts but with the reference logits once per
    adapter and one llama.cpp model for all files: verify's greedy checks take minutes on a loaded machine."""

    def __init__(self, f32: Path):
        from lora2gguf.commands.verify import DEFAULT_TEXT
        from lora2gguf.llamacpp.runtime import LlamaRuntime
        from lora2gguf.parity.reference import reference_logits
        from lora2gguf.weights.base_model import open_base

        self.rt = LlamaRuntime(f32, n_ctx=512)
        self.tokens = self.rt.tokenize(DEFAULT_TEXT)[:256]
        self.base = open_base(f32)
        self.ref, self.cache = (lambda adapters: reference_logits(self.base, adapters, [self.tokens])[0]), {}
        self.base_logits = self.ref([])

    def __call__(self, original: Path, resized: Path) -> dict:
        from lora2gguf.adapters.load import load_adapter
        from lora2gguf.parity.metrics import compare

        if original not in self.cache:
            self.cache[original] = self.ref([(load_adapter(original, self.base.spec), 1.0)])
        want = self.cache[original]
        self.rt.set_adapters([(resized, 1.0)])
        m = compare(want, self.rt.logits(self.tokens))
        return {"kl": m["mean_kl"], "top1": m["top1"], "effect": compare(self.base_logits, want)["mean_kl"]}


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--verify-rows", type=int, default=0)
    args = ap.parse_args()
    from lora2gguf.commands.analyze import analyze
    from lora2gguf.demo import BEHAVIOURS
    from lora2gguf.commands.resize import resize
    from lora2gguf.weights.real_models import smollm2_f32_gguf, smollm2_gguf

    WORK.mkdir(parents=True, exist_ok=True)
    base, f32 = smollm2_gguf(), smollm2_f32_gguf()
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; base {base.name}, KL on {f32.name}")
    adapters = {b.name: train_adapter(base, b, 4, f"{b.name}-r4") for b in BEHAVIOURS}  # the demo's recipe
    adapters["json-r16"] = train_adapter(base, BEHAVIOURS[0], 16, "json-r16")

    print("\n| adapter | r | modules | rank for 99% (uniform) | per-module rank for 99% | stable rank (mean) "
          "| entropy rank (mean) | verdict |\n|---|---:|---:|---:|---|---:|---:|---|")
    reports = {}
    for name, d in adapters.items():
        t = time.perf_counter()
        rep = reports[name] = analyze(d, f32)
        el = time.perf_counter() - t
        p = rep["per_module_rank_99"]
        mean = lambda k: sum(m[k] for m in rep["modules"]) / len(rep["modules"])  # noqa: E731
        print(f"| {name} | {rep['ranks'][-1]} | {len(rep['modules'])} | {rep['uniform_rank_99']} "
              f"({rep['uniform_energy_99']:.2%}) | {p['min']}-{p['max']} (mean {p['mean']:.1f}) | "
              f"{mean('stable_rank'):.2f} | {mean('entropy_rank'):.2f} | {rep['verdict']} ({el:.2f} s) |")

    rows = [("json-r16", {"rank": k}) for k in (1, 2, 4, 8, 16)] + \
           [("json-r16", {"energy": e}) for e in (0.9, 0.99)] + \
           [(n, t) for n in ("json", "pirate") for t in ({"rank": 1}, {"rank": 2}, {"energy": 0.9}, {"rank": 4})]
    print("\n| adapter | resize to | ranks | energy kept | f16 GGUF bytes | KL vs original (verify) | top-1 "
          "| KL base→adapter |\n|---|---|---|---:|---:|---:|---:|---:|")
    kl_cost = KLCost(f32)
    for name, target in rows:
        tag = f"rank{target['rank']}" if "rank" in target else f"energy{target['energy']}"
        out = WORK / f"{name}-{tag}.gguf"
        rep = resize(adapters[name], out, base=f32, outtype="f16", force=True, **target)
        ranks = sorted({x["new_rank"] for x in rep["modules"].values()})
        k = kl_cost(adapters[name], out)
        label = f"--rank {target['rank']}" if "rank" in target else f"--energy {target['energy']}"
        print(f"| {name} | {label} | {ranks[0]}-{ranks[-1]} | {rep['energy_kept']:.2%} | {rep['bytes']:,} | "
              f"{k['kl']:.2e} | {k['top1']:.3f} | {k['effect']:.4f} |", flush=True)
        if args.verify_rows > 0:
            from lora2gguf.commands.verify import verify

            args.verify_rows -= 1
            v = verify(f32, [(str(adapters[name]), 1.0)], runtime_lora=str(out))
            print(f"|  | (`lora2gguf verify` itself) | | | | {v['pairs']['runtime']['mean_kl']:.2e} | "
                  f"{v['pairs']['runtime']['top1']:.3f} | {v['adapter_effect']['kl_base_to_reference']:.4f} |", flush=True)


if __name__ == "__main__":
    main()
