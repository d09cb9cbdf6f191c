"""`lora2gguf demo`: the whole story on a real model in a few minutes of CPU.

One base (SmolLM2-135M-Instruct by default), two adapters that each teach a narrow behaviour a program
can check (answers as one JSON object; answers that open with "Ahoy matey!"), trained on our own
datasets shipped in the package (lora2gguf/demo_data/), then: converted to GGUF LoRA, hot-swapped on one loaded llama.cpp model,
merged into q4_k_m (with an importance matrix measured on the adapter's own data), scored on held-out
prompts, verified, and written out as Ollama Modelfiles (FROM the merged files).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from lora2gguf.allocator import release_free_memory
from lora2gguf.commands.merge import merge
from lora2gguf.commands.modelfile import write_modelfile
from lora2gguf.commands.train import train
from lora2gguf.commands.verify import verify
from lora2gguf.llamacpp.ggml import reuse_quantizations
from lora2gguf.llamacpp.runtime import LlamaRuntime
from lora2gguf.llamacpp.tokenizer import Tokenizer
from lora2gguf.training.config import TrainConfig
from lora2gguf.weights.base_model import open_base
from lora2gguf.weights.real_models import gemma3_gguf, smollm2_gguf

# The datasets ship inside the package (package data), so an installed wheel finds them; a pip-installed
# package is a directory, so its resource path is a real path that training can open.
DEMO_DATA = Path(str(files("lora2gguf") / "demo_data"))


@dataclass(frozen=True)
class Behaviour:
    name: str
    data: str  # training JSONL in DEMO_DATA
    marker: str  # an answer adheres when it starts with this

    def adheres(self, text: str) -> bool:
        return text.strip().startswith(self.marker)


BEHAVIOURS = (Behaviour("json", "json-train.jsonl", '{"answer": "'),
              Behaviour("pirate", "pirate-train.jsonl", "Ahoy matey!"))


def serve_commands(base: Path, loras: dict[str, Path]) -> list[str]:
    first = next(iter(loras.values()))
    lora_args = " ".join(f"--lora {p}" for p in loras.values())
    return [
        f"llama-cli -m {base} --lora {first} -p 'What is the capital of Peru?'",
        f"llama-server -m {base} {lora_args} --lora-init-without-apply",
        "curl -s localhost:8080/lora-adapters -d '[{\"id\": 0, \"scale\": 1.0}, {\"id\": 1, \"scale\": 0.0}]'"
        "   # hot-swap: pick the adapter per request or globally",
    ]


def _answers(rt, prompt_ids: list[list[int]], n_tokens: int) -> list[str]:
    """Greedy answers, only as long as needed to see whether they open with a marker, all prompts side by side."""
    return [rt.detokenize(ids) for ids in rt.greedy_many(prompt_ids, n_tokens)]


def _adherence(behaviour: Behaviour, answers: list[str]) -> float:
    return sum(behaviour.adheres(a) for a in answers) / len(answers)


@dataclass(frozen=True)
class Recipe:
    """How the demo trains. Small on purpose: a narrow behaviour needs few parameters, and adapting only
    the top third of the layers means the layers below get no backward pass (training ~3x cheaper), while
    the F16 file stays under 1% of a 4-bit base."""
    steps: int = 20
    lr: float = 4e-3
    rank: int = 4
    top_fraction: float = 1 / 3  # of the layers, counted from the output side
    seq_len: int = 96
    batch_size: int = 4

    def layers(self, n_layer: int) -> str:
        first = n_layer - max(1, round(n_layer * self.top_fraction))
        return f"{first}-{n_layer - 1}"


def chat_template_for(base) -> str | None:
    """The demo's conversations need a chat template: the base's own, else (a pretrained base, Gemma 3 270M)
    the format its family is served with."""
    if base.file.get("tokenizer.chat_template") is not None:
        return None
    return "gemma" if base.spec.arch.startswith("gemma") else "chatml"


def _score(base: Path, template, prompts: list, ggufs: dict[str, Path], merged: dict[str, Path]
           ) -> tuple[dict[str, dict[str, list[str]]], float, float]:
    """Greedy answers to the held-out prompts from the base, each adapter hot-swapped on one loaded model (no
    reload), and each merged file → (answers by behaviour and view, model load s, longest swap s)."""
    tok = Tokenizer(base, template)
    prompt_ids = [tok.encode(tok.render(m, add_generation_prompt=True)) for m in prompts]
    n_gen = max(len(tok.rt.tokenize(b.marker, add_bos=False)) for b in BEHAVIOURS) + 2
    tok.close()
    ctx = dict(n_ctx=sum(len(p) + n_gen for p in prompt_ids), n_seq=len(prompt_ids))
    t = time.perf_counter()
    rt = LlamaRuntime(base, **ctx)
    load_s = time.perf_counter() - t
    answers: dict[str, dict[str, list[str]]] = {b.name: {} for b in BEHAVIOURS}
    base_answers = _answers(rt, prompt_ids, n_gen)
    swap_s = []
    for b in BEHAVIOURS:
        answers[b.name]["base"] = base_answers
        ts = time.perf_counter()
        rt.set_adapters([(ggufs[b.name], 1.0)])
        swap_s.append(time.perf_counter() - ts)
        answers[b.name]["runtime"] = _answers(rt, prompt_ids, n_gen)
    rt.close()
    for b in BEHAVIOURS:
        with LlamaRuntime(merged[b.name], **ctx) as mrt:
            answers[b.name]["merged_q4_k_m"] = _answers(mrt, prompt_ids, n_gen)
    return answers, load_s, max(swap_s)


def _verify(base: Path, gguf: Path, merged: Path) -> dict:
    """`lora2gguf verify` of one adapter: runtime LoRA and the merged file against the reference."""
    rep = verify(base, [(str(gguf), 1.0)], merged=merged, n_tokens=128)
    return {"kl_base_to_reference": rep["adapter_effect"]["kl_base_to_reference"],
            "runtime_vs_reference": rep["pairs"]["runtime"]["mean_kl"],
            "merged_vs_reference": rep["pairs"]["merged"]["mean_kl"],
            "merged_floor": rep.get("merged_quantization_floor"), "pass": rep["pass"]}


def run_demo(workdir: str | os.PathLike, base: str | os.PathLike | None = None, recipe: Recipe = Recipe(),
             max_prompts: int | None = None, log=print) -> dict:
    """Train, convert, merge, score, verify and write Modelfiles for the two behaviours → the summary."""
    # each verify's floor (the base quantized with its merge's importance matrix) shares every tensor the
    # adapter leaves alone with that merge: those are quantized once (the same bytes either way)
    with reuse_quantizations():
        return _run(workdir, base, recipe, max_prompts, log)


def _run(workdir, base, recipe: Recipe, max_prompts: int | None, log) -> dict:
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    stages: dict[str, float] = {}
    t0 = time.perf_counter()
    named = {"smollm2": smollm2_gguf, "gemma3": gemma3_gguf}
    base = named[str(base or "smollm2")]() if str(base or "smollm2") in named else Path(base)
    stages["obtain base"] = time.perf_counter() - t0
    with open_base(base) as b:
        layers = recipe.layers(b.spec.n_layer)
        template = chat_template_for(b)
    log(f"base: {base} ({base.stat().st_size / 1e6:.0f} MB); training rank {recipe.rank}, all linear "
        f"projections of layers {layers}, {recipe.steps} steps per adapter")
    prompts = [json.loads(line)["messages"] for line in (DEMO_DATA / "eval-prompts.jsonl").read_text().splitlines()
               if line.strip()][:max_prompts]

    ggufs: dict[str, Path] = {}
    for b in BEHAVIOURS:
        t = time.perf_counter()
        res = train(TrainConfig(base=str(base), data=str(DEMO_DATA / b.data), out=str(work / f"{b.name}-peft"),
                                rank=recipe.rank, alpha=2 * recipe.rank, lr=recipe.lr, steps=recipe.steps,
                                batch_size=recipe.batch_size, seq_len=recipe.seq_len, dropout=0.0,
                                targets="all-linear", layers=layers, gguf=str(work / f"{b.name}.gguf"),
                                gguf_outtype="f16", force=True, progress=False, seed=0, chat_template=template))
        ggufs[b.name] = res.gguf
        stages[f"train+convert {b.name}"] = time.perf_counter() - t
        log(f"trained {b.name}: loss {res.losses[0]:.3f} → {res.losses[-1]:.3f} in {res.steps} steps; "
            f"{res.gguf.stat().st_size / 1e3:.0f} KB GGUF LoRA")
        del res  # it holds the trained model, base weights included
    release_free_memory()  # the CLI keeps freed memory for reuse (lora2gguf.allocator): the stages after
    # training allocate other sizes, so what training freed goes back

    merged: dict[str, Path] = {}
    for b in BEHAVIOURS:
        t = time.perf_counter()
        # the importance matrix measured on the merged model over the adapter's own training data: q4_k_m
        # then keeps more of what the adapter bought (BENCHMARKS.md, "Merges that keep the adapter")
        merged[b.name] = merge(base, [(ggufs[b.name], 1.0)], work / f"merged-{b.name}-q4_k_m.gguf",
                               quant="q4_k_m", force=True, progress=False, imatrix_data=DEMO_DATA / b.data,
                               chat_template=template)
        stages[f"merge {b.name} → q4_k_m (imatrix)"] = time.perf_counter() - t
    release_free_memory()

    t = time.perf_counter()
    answers, load_s, swap_s = _score(base, template, prompts, ggufs, merged)
    adherence = {b.name: {view: _adherence(b, a) for view, a in answers[b.name].items()} for b in BEHAVIOURS}
    samples = {b.name: {view: a[0] for view, a in answers[b.name].items()} for b in BEHAVIOURS}
    stages["score (greedy, held-out prompts)"] = time.perf_counter() - t

    kls = {}
    for b in BEHAVIOURS:
        t = time.perf_counter()
        kls[b.name] = _verify(base, ggufs[b.name], merged[b.name])
        stages[f"verify {b.name}"] = time.perf_counter() - t

    for b in BEHAVIOURS:
        write_modelfile(work / f"Modelfile.{b.name}", merged[b.name], force=True)
    summary = {
        "base": str(base), "base_mb": base.stat().st_size / 1e6, "held_out_prompts": len(prompts),
        "adapters": {b.name: {"adherence": adherence[b.name], "kl": kls[b.name],
                              "gguf_kb": ggufs[b.name].stat().st_size / 1e3,
                              "gguf_percent_of_base": 100 * ggufs[b.name].stat().st_size / base.stat().st_size,
                              "sample": samples[b.name]} for b in BEHAVIOURS},
        "model_load_s": load_s, "adapter_swap_s": swap_s, "stages_s": stages,
        "total_s": time.perf_counter() - t0, "workdir": str(work),
        "modelfiles": [str(work / f"Modelfile.{b.name}") for b in BEHAVIOURS],
        "commands": serve_commands(base, ggufs),
    }
    return summary


def format_summary(s: dict) -> str:
    lines = [f"base {s['base']} ({s['base_mb']:.0f} MB); {s['held_out_prompts']} held-out prompts per behaviour", ""]
    hdr = (f"{'adapter':<8}{'base':>7}{'runtime':>9}{'merged':>8}{'KL base→adapter':>17}{'KL runtime':>12}"
           f"{'KL merged':>11}{'floor':>9}{'size':>9}  verify")
    lines += [hdr, "-" * len(hdr)]
    for name, a in s["adapters"].items():
        ad, kl = a["adherence"], a["kl"]
        floor = f"{kl['merged_floor']:.2g}" if kl["merged_floor"] is not None else "-"
        lines.append(f"{name:<8}{ad['base']:>7.0%}{ad['runtime']:>9.0%}{ad['merged_q4_k_m']:>8.0%}"
                     f"{kl['kl_base_to_reference']:>17.3g}{kl['runtime_vs_reference']:>12.2g}"
                     f"{kl['merged_vs_reference']:>11.2g}{floor:>9}{a['gguf_kb']:>6.0f} KB  "
                     f"{'pass' if kl['pass'] else 'FAIL'}")
    lines.append("(adherence: greedy answers that open with the trained marker; merged = q4_k_m)")
    lines.append("")
    for name, a in s["adapters"].items():
        lines.append(f"{name}: first held-out answer — base: {a['sample']['base'].strip()[:60]!r}")
        lines.append(f"{'':<{len(name)}}  with adapter: {a['sample']['runtime'].strip()[:60]!r}")
    lines.append("")
    lines.append(f"model load {s['model_load_s']:.2f} s vs adapter hot-swap {s['adapter_swap_s'] * 1e3:.1f} ms")
    lines.append("stages: " + ", ".join(f"{k} {v:.1f} s" for k, v in s["stages_s"].items()))
    lines.append(f"total {s['total_s']:.0f} s; outputs in {s['workdir']}")
    lines.append("")
    lines.append("Serve them:")
    lines += [f"  ollama create demo-{Path(m).suffix[1:]} -f {m}" for m in s["modelfiles"]]
    lines += [f"  {c}" for c in s["commands"]]
    return "\n".join(lines)
