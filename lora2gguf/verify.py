"""`lora2gguf verify`: the same tokens through three views of one model, and how far apart they are.

  reference — PyTorch on the base's dequantized weights, adapters folded in with PEFT's math (F32)
  runtime   — llama.cpp (llama-cpp-python): the base loaded once, the GGUF LoRA(s) applied at run time
  merged    — llama.cpp on a merged file (optional)

Each view is evaluated once over the whole text (logits for every position). Pass/fail thresholds come
from the types involved: for quantized files, from the quantization floor measured on the base itself.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .adapter import four_bit_base
from .adapter_gguf import base_match
from .errors import Lora2GGUFError
from .metrics import compare, perplexity

DEFAULT_TEXT = (
    "The lighthouse keeper woke before dawn, as he had every morning for thirty years. He climbed the "
    "spiral stairs, one hundred and twelve of them, counting each step under his breath. At the top he "
    "trimmed the wick, polished the great lens until it shone, and looked out over the grey water. A "
    "fishing boat was already heading out past the rocks, its engine coughing in the cold air. He raised "
    "a hand, though he knew nobody aboard could see him. In the small kitchen below, the kettle began to "
    "whistle. He made tea the way his mother had taught him: the pot warmed first, the leaves measured "
    "with a silver spoon, four minutes exactly by the clock on the wall. While it steeped he wrote in the "
    "logbook: wind from the north-east, visibility good, sea moderate, one vessel departed at six. Later "
    "that morning the supply boat would bring bread, oil, letters and the newspaper, usually two days "
    "old. He liked old news. By the time it reached him, the arguments had cooled and the storms had "
    "passed, and what was left was simply the record of what had happened. In the afternoon he repaired "
    "a shutter that the winter gales had loosened, mixed a little paint for the railings, and walked the "
    "length of the island to check the rain gauge. Seabirds wheeled above the cliffs, crying to one "
    "another. When the light began to fail he climbed the stairs again, counted the steps, and lit the "
    "lamp. Its beam swept across the water, steady and patient, as it had for a hundred years."
)
FULL_PRECISION = {"ALL_F32", "MOSTLY_F16", "MOSTLY_BF16"}


@dataclass
class Adapter:
    path: Path
    scale: float
    lora: object  # adapter.PeftAdapter (HF layout, PEFT's or llama.cpp's scale)
    runtime_path: Path | None = None  # the GGUF file llama.cpp loads for the runtime view


def _load_adapter(path: Path, spec):
    from .adapter_any import load_adapter

    return load_adapter(path, spec)


def _check_merged(path: Path, gb) -> None:
    """Read the merged file's header before llama.cpp does (its refusals say little): a GGUF model of the
    base's architecture and shapes."""
    from .base import GGUFBase

    if not path.is_file():
        raise Lora2GGUFError(f"{path}: no such merged GGUF file (--merged)")
    with GGUFBase(path) as mb:
        got, want = mb.spec, gb.spec
        for what in ("arch", "n_layer", "n_embd", "n_vocab", "n_head", "n_head_kv"):
            if getattr(got, what) != getattr(want, what):
                raise Lora2GGUFError(f"{path}: not a merge of {gb.path}: {what} is {getattr(got, what)}, the base "
                                     f"has {getattr(want, what)}; give the merged file made from this base")


def _file_type(path: Path) -> str:
    from gguf import LlamaFileType

    from .gguf_file import GGUFFile

    with GGUFFile(path) as f:
        ft = f.get("general.file_type")
    try:
        return LlamaFileType(int(ft)).name if ft is not None else "ALL_F32"
    except ValueError:
        return str(ft)


def _teacher_forced(logits_of, prompts: list[list[int]], conts: list[list[int]]) -> list[list[int]]:
    """Each view's greedy choice at every step of llama.cpp's own greedy continuation, in one evaluation
    per prompt: a view that picks the same token at every step would have generated the same text."""
    preds = []
    for p, c in zip(prompts, conts):
        lg = logits_of(p + c)
        preds.append(lg[len(p) - 1: len(p) - 1 + len(c)].argmax(-1).tolist())
    return preds


def _agreement(a: list[list[int]], b: list[list[int]], conts: list[list[int]]) -> dict:
    """Greedy agreement of two views from their teacher-forced choices on the same continuations: the
    common prefix ends where they choose differently, or after the first step where both left the
    continuation (past it the teacher-forced context is no longer what either would have generated)."""
    prefixes = []
    for x, y, c in zip(a, b, conts):
        n = 0
        for px, py, pc in zip(x, y, c):
            if px != py:
                break
            n += 1
            if px != pc:
                break
        prefixes.append(n)
    return {"identical": float(np.mean([n == len(c) for n, c in zip(prefixes, conts)])),
            "mean_common_prefix": float(np.mean(prefixes))}


_FLOORS: dict[tuple, float] = {}  # one process verifying several adapters on one base measures it once


def _quantization_floor(base_path: Path, ftype_name: str, tokens, base_ref_logits, tmp: Path, n_ctx) -> float:
    """KL(reference ‖ llama.cpp) of the base alone quantized to ftype_name by llama.cpp: what that
    quantization costs without any adapter."""
    st = base_path.stat()
    key = (str(base_path.resolve()), st.st_size, st.st_mtime_ns, ftype_name, tuple(tokens), n_ctx)
    if key not in _FLOORS:
        _FLOORS[key] = _measure_floor(base_path, ftype_name, tokens, base_ref_logits, tmp, n_ctx)
    return _FLOORS[key]


def _measure_floor(base_path: Path, ftype_name: str, tokens, base_ref_logits, tmp: Path, n_ctx) -> float:
    from gguf import LlamaFileType

    from .gguf_write import dequantize_file
    from .quantize import llama_quantize
    from .runtime import LlamaRuntime

    src = base_path
    if _file_type(base_path) not in FULL_PRECISION:
        src = tmp / "base-f32.gguf"
        dequantize_file(base_path, src)
    dst = tmp / f"base-{ftype_name}.gguf"
    llama_quantize(src, dst, LlamaFileType[ftype_name])
    with LlamaRuntime(dst, n_ctx=n_ctx) as rt:
        return compare(base_ref_logits, rt.logits(tokens))["mean_kl"]


def verify(base: str | os.PathLike, loras: list[tuple[str, float]], merged: str | os.PathLike | None = None,
           runtime_lora: str | os.PathLike | None = None, text: str | None = None,
           prompts: list[list[dict]] | None = None, n_tokens: int = 256, max_kl: float | None = None,
           n_greedy: int = 16, verbose: bool = False) -> dict:
    """Compare reference / runtime / merged on the same tokens; returns the report (see format_report)."""
    from .base import GGUFBase
    from .reference import reference_model
    from .runtime import LlamaRuntime

    base_path = Path(base)
    if base_path.is_dir():
        raise Lora2GGUFError(f"{base_path}: verify needs the GGUF base that llama.cpp serves")
    if not loras:
        raise Lora2GGUFError("verify needs at least one --lora ADAPTER")
    if runtime_lora and (len(loras) != 1 or not Path(loras[0][0]).is_dir()):
        raise Lora2GGUFError("--runtime-lora checks one GGUF LoRA against its PEFT source: give exactly one "
                             "--lora PEFT_DIR")
    report: dict = {"base": str(base_path), "adapters": [], "warnings": [], "views": {}, "pairs": {}}
    with GGUFBase(base_path) as gb, tempfile.TemporaryDirectory(prefix="lora2gguf-verify-") as tmpd, \
            contextlib.ExitStack() as stack:
        tmp = Path(tmpd)
        spec = gb.spec
        adapters = []
        for i, (p, scale) in enumerate(loras):
            path = Path(p)
            if not path.exists():
                raise Lora2GGUFError(f"{path}: no such adapter file or directory")
            lora = _load_adapter(path, spec)
            lora.check_base(spec, f"base {base_path}")
            report["warnings"] += lora.notes  # a 4-bit training base: the KL below is the gap it leaves
            a = Adapter(path, scale, lora)
            if runtime_lora:  # read it ourselves first: llama.cpp aborts the process on some broken files
                a.runtime_path = Path(runtime_lora)
                if not a.runtime_path.is_file():
                    raise Lora2GGUFError(f"{a.runtime_path}: no such GGUF LoRA file (--runtime-lora)")
                _load_adapter(a.runtime_path, spec).check_base(spec, f"base {base_path}")
            elif path.is_dir():
                from .adapter_gguf_write import gguf_from_peft

                a.runtime_path = gguf_from_peft(path, base_path, tmp / f"adapter-{i}.gguf")
            else:
                a.runtime_path = path
            match, verdict = base_match(a.runtime_path, gb)
            entry = {"path": str(path), "scale": scale, "runtime_file": str(a.runtime_path),
                     "base_match": match, "base_verdict": verdict}
            if match is False:
                report["warnings"].append(f"{a.runtime_path} was made for a different base than {base_path}: "
                                          f"{verdict}")
            report["adapters"].append(entry)
            adapters.append(a)

        if merged:
            _check_merged(Path(merged), gb)
        n_ctx = max(64, n_tokens + 8, 256)
        rt = stack.enter_context(LlamaRuntime(base_path, n_ctx=n_ctx, verbose=verbose))
        tokens = rt.tokenize(text or DEFAULT_TEXT)[:n_tokens]
        if len(tokens) < 16:
            raise Lora2GGUFError(f"the text gives only {len(tokens)} tokens; give at least 16 (--text)")
        report["tokens"] = len(tokens)
        prompt_tokens = _prompts(rt, gb, prompts, tokens)

        base_ref = reference_model(gb)
        logits = {"base_reference": _ref_logits(base_ref, tokens)}
        logits["base_runtime"] = rt.logits(tokens)
        del base_ref
        rt.set_adapters([(a.runtime_path, a.scale) for a in adapters])
        logits["runtime"] = rt.logits(tokens)
        conts = [rt.greedy(p, n_greedy) for p in prompt_tokens]  # llama.cpp's greedy text, runtime LoRA
        rt.set_adapters([])
        greedy = {"runtime": conts}
        ref = reference_model(gb, [(a.lora, a.scale) for a in adapters])
        logits["reference"] = _ref_logits(ref, tokens)
        greedy["reference"] = _teacher_forced(lambda seq: _ref_logits(ref, seq), prompt_tokens, conts)
        del ref
        if any(four_bit_base(a.lora.config) for a in adapters):
            report["four_bit_gap"] = _four_bit_gap(gb, adapters, tokens, logits)
        if merged:
            with LlamaRuntime(merged, n_ctx=n_ctx, verbose=verbose) as mrt:
                logits["merged"] = mrt.logits(tokens)
                greedy["merged"] = _teacher_forced(mrt.logits, prompt_tokens, conts)

        base_type = _file_type(base_path)
        report["views"] = {k: {"perplexity": perplexity(v, np.array(tokens))} for k, v in logits.items()}
        moved = compare(logits["base_reference"], logits["reference"])
        report["adapter_effect"] = {"kl_base_to_reference": moved["mean_kl"], "top1_changed": 1 - moved["top1"]}
        floor_base = compare(logits["base_reference"], logits["base_runtime"])["mean_kl"]
        checks = {"runtime": ("reference", "runtime",
                              1e-4 if base_type in FULL_PRECISION else 1.5 * floor_base + 1e-4)}
        if merged:
            mtype = _file_type(Path(merged))
            if mtype == "ALL_F32":
                thr = 1e-4
            elif mtype in FULL_PRECISION:
                thr = 1e-3
            elif mtype == "MOSTLY_Q8_0":
                thr = 1e-2
            else:
                floor = _quantization_floor(base_path, mtype, tokens, logits["base_reference"], tmp, n_ctx)
                report["merged_quantization_floor"] = floor
                thr = 1.5 * floor + 1e-3
            checks["merged"] = ("reference", "merged", thr)
            checks["merged_vs_runtime"] = ("runtime", "merged", None)
        report["base_quantization_floor"] = floor_base
        ok = True
        for name, (p, q, thr) in checks.items():
            m = compare(logits[p], logits[q])
            m["greedy"] = _agreement(greedy[p], greedy[q], conts)
            if thr is not None:
                m["max_kl_allowed"] = max_kl if max_kl is not None else thr
                m["pass"] = m["mean_kl"] <= m["max_kl_allowed"]
                ok &= m["pass"]
            report["pairs"][name] = m
        if moved["mean_kl"] < 1e-6:
            report["warnings"].append("the adapters barely change the base (KL base→reference < 1e-6): "
                                      "a no-op adapter proves nothing")
            ok = False
        if any(e["base_match"] is False for e in report["adapters"]):
            ok = False
        report["pass"] = bool(ok)
    return report


def _four_bit_gap(gb, adapters, tokens, logits) -> dict:
    """A QLoRA adapter was fitted to NF4-rounded weights: the reference on an NF4-rounded copy of this base,
    with and without the adapters, against the reference on this base (informative, no threshold)."""
    from .nf4 import NF4Base
    from .reference import reference_model

    nb = NF4Base(gb)
    with_adapters = _ref_logits(reference_model(nb, [(a.lora, a.scale) for a in adapters]), tokens)
    alone = _ref_logits(reference_model(nb), tokens)
    return {"kl_nf4_to_reference": compare(with_adapters, logits["reference"])["mean_kl"],
            "kl_nf4_base_to_base": compare(alone, logits["base_reference"])["mean_kl"]}


def _ref_logits(model, tokens) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([tokens]))[0].numpy()


def _prompts(rt, gb, prompts, tokens) -> list[list[int]]:
    """Prompts for the greedy check: chat prompts rendered with the base's template, else slices of the text."""
    if prompts:
        from .data import Tokenizer

        tok = Tokenizer(gb.path)
        try:
            return [tok.encode(tok.render(msgs, add_generation_prompt=True)) for msgs in prompts]
        finally:
            tok.close()
    starts = [0, len(tokens) // 4, len(tokens) // 2, 3 * len(tokens) // 4]
    return [tokens[: s + 12] if s == 0 else [tokens[0]] + tokens[s: s + 12] for s in starts]


def format_report(r: dict) -> str:
    lines = [f"base: {r['base']}  ({r['tokens']} tokens)"]
    for a in r["adapters"]:
        m = {True: "matches", False: "MISMATCH", None: "not recorded"}[a["base_match"]]
        lines.append(f"adapter: {a['path']}  scale {a['scale']}  base fingerprint: {m}")
    eff = r["adapter_effect"]
    lines.append(f"adapter effect: KL(base→reference) {eff['kl_base_to_reference']:.3g}, "
                 f"top-1 changed at {eff['top1_changed']:.0%} of positions")
    lines.append(f"base quantization floor (llama.cpp base vs reference base): {r['base_quantization_floor']:.3g}")
    if "four_bit_gap" in r:
        g = r["four_bit_gap"]
        lines.append(f"4-bit training base: KL(adapters on the NF4-rounded base → on this base) "
                     f"{g['kl_nf4_to_reference']:.3g} (the base alone: {g['kl_nf4_base_to_base']:.3g})")
    if "merged_quantization_floor" in r:
        lines.append(f"merged-type quantization floor: {r['merged_quantization_floor']:.3g}")
    hdr = f"{'pair':<20}{'mean KL':>11}{'max KL':>11}{'top-1':>8}{'max|Δ|':>9}{'greedy':>8}{'limit':>10}  result"
    lines += ["", hdr, "-" * len(hdr)]
    for name, m in r["pairs"].items():
        lim = f"{m['max_kl_allowed']:.2g}" if "max_kl_allowed" in m else "-"
        res = ("pass" if m["pass"] else "FAIL") if "pass" in m else "info"
        lines.append(f"{name:<20}{m['mean_kl']:>11.3g}{m['max_kl']:>11.3g}{m['top1']:>8.1%}"
                     f"{m['max_abs_dlogit']:>9.3g}{m['greedy']['identical']:>8.0%}{lim:>10}  {res}")
    lines.append("")
    lines.append("perplexity: " + ", ".join(f"{k} {v['perplexity']:.3f}" for k, v in r["views"].items()))
    for w in r["warnings"]:
        lines.append(f"warning: {w}")
    lines.append("PASS" if r["pass"] else "FAIL")
    return "\n".join(lines)


def read_text(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise Lora2GGUFError(f"{path}: cannot read the text ({e})") from None


def read_prompts(path: str) -> list[list[dict]]:
    """JSONL, one conversation per line: {"messages": [{"role": ..., "content": ...}, ...]} or a bare list."""
    import json

    from .data import ROLES

    out = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise Lora2GGUFError(f"{path}: cannot read the prompts ({e})") from None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise Lora2GGUFError(f"{path}:{i}: invalid JSON ({e.msg})") from None
        msgs = obj.get("messages") if isinstance(obj, dict) else obj
        if not isinstance(msgs, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs):
            raise Lora2GGUFError(f"{path}:{i}: expected {{\"messages\": [{{\"role\": ..., \"content\": ...}}]}}")
        bad = [m["role"] for m in msgs if m["role"] not in ROLES]
        if bad:
            raise Lora2GGUFError(f"{path}:{i}: unknown role {bad[0]!r}; expected one of {', '.join(ROLES)}")
        out.append(msgs)
    if not out:
        raise Lora2GGUFError(f"{path}: no prompts")
    return out
