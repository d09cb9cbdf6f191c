"""`lora2gguf verify`: the same tokens through three views of one model, and how far apart they are.

  reference — PyTorch on the base's dequantized weights, adapters folded in with PEFT's math (F32)
  runtime   — llama.cpp (llama-cpp-python): the base loaded once, the GGUF LoRA(s) applied at run time
  merged    — llama.cpp on a merged file (optional)

Every view is evaluated once over the whole text (logits for every position), and all of them are
compared as they are made, a block of positions at a time (parity.lockstep): none is held whole. Pass/fail
thresholds follow the floor measured on the base alone at each file's type (llama.cpp's arithmetic, plus
rounding for quantized types). A merged file must also show that it carries the adapter: a loose threshold for a
quantized file would pass the base alone when the adapter moves the model less than the rounding does.
Adapters a GGUF LoRA cannot express (DoRA, LoRA bias, modules_to_save) are checked on the merged file
only; the runtime view is then skipped, with the reason in the report.

On a mixture of experts every view also records, per layer, the top-k experts each token was routed to (the
reference from its MoE blocks, llama.cpp from its graph), and each pair is judged routing-aware
(parity.routing): a router near-tie flips an expert on a few tokens, whose KL would dominate the mean.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lora2gguf.adapters.gguf_lora import base_match
from lora2gguf.adapters.gguf_lora_write import gguf_from_peft, refuse_unsupported
from lora2gguf.adapters.load import load_adapter
from lora2gguf.adapters.peft import four_bit_base
from lora2gguf.allocator import release_free_memory
from lora2gguf.errors import Lora2GGUFError
from lora2gguf.fileio.gguf_read import GGUFFile
from lora2gguf.llamacpp.ggml import Importance
from lora2gguf.llamacpp.runtime import LlamaRuntime, LogitStream
from lora2gguf.llamacpp.tokenizer import ROLES, Tokenizer
from lora2gguf.parity import lockstep
from lora2gguf.parity.floors import FULL_PRECISION, base_alone_file, exact_merge_file, file_type, remembered_base_states
from lora2gguf.parity.lockstep import Tallies, block_rows, decode_rows
from lora2gguf.parity.metrics import CARRIED_RANGE, agreement, routed_summary, teacher_forced
from lora2gguf.parity.nf4 import NF4Base
from lora2gguf.parity.reference import Head, HeadBlocks, ReferenceWeights, reference_states
from lora2gguf.parity.routing import RULE, judge_pair, judged_kl, table
from lora2gguf.weights.base_model import GGUFBase

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


@dataclass
class Adapter:
    path: Path
    scale: float
    lora: object  # adapters.lora.PeftAdapter (HF layout, PEFT's or llama.cpp's scale)
    runtime_path: Path | None = None  # the GGUF file llama.cpp loads for the runtime view


def _check_merged(path: Path, gb) -> None:
    """Read the merged file's header before llama.cpp does (its refusals say little): a GGUF model of the
    base's architecture and shapes."""
    if not path.is_file():
        raise Lora2GGUFError(f"{path}: no such merged GGUF file (--merged)")
    with GGUFBase(path) as mb:
        got, want = mb.spec, gb.spec
        for what in ("arch", "n_layer", "n_embd", "n_vocab", "n_head", "n_head_kv"):
            if getattr(got, what) != getattr(want, what):
                raise Lora2GGUFError(f"{path}: not a merge of {gb.path}: {what} is {getattr(got, what)}, the base "
                                     f"has {getattr(want, what)}; give the merged file made from this base")


def _runtime_refusal(lora) -> str | None:
    """Why a PEFT adapter cannot become a GGUF LoRA (DoRA, LoRA bias, modules_to_save...), or None."""
    try:
        refuse_unsupported(lora)
    except Lora2GGUFError as e:
        return str(e)
    return None


def verify(base: str | os.PathLike, loras: list[tuple[str, float]], merged: str | os.PathLike | None = None,
           runtime_lora: str | os.PathLike | None = None, text: str | None = None,
           prompts: list[list[dict]] | None = None, n_tokens: int = 256, max_kl: float | None = None,
           n_greedy: int = 16, verbose: bool = False, chat_template: str | None = None,
           imatrix: str | os.PathLike | None = None) -> dict:
    """Compare reference / runtime / merged on the same tokens; returns the report (see format_report).
    chat_template renders `prompts` where the base has none (llamacpp.tokenizer: chatml, gemma, a file).
    imatrix: the importance matrix the merged file was quantized with, where the one it records
    (quantize.imatrix.file) is not at that path: its floors are measured with the same matrix."""
    base_path = Path(base)
    check_request(base_path, loras, runtime_lora)
    report: dict = {"base": str(base_path), "adapters": [], "warnings": [], "views": {}, "pairs": {},
                    "skipped": {}}
    if imatrix is not None and not merged:
        raise Lora2GGUFError("--imatrix names the importance matrix of a merged file: give --merged too")
    importance = merged_importance(Path(merged), imatrix) if merged else None
    if importance is not None:
        report["merged_imatrix"] = importance.file
    with GGUFBase(base_path) as gb, tempfile.TemporaryDirectory(prefix="lora2gguf-verify-") as tmpd:
        tmp = Path(tmpd)
        adapters = prepare(gb, loras, runtime_lora, merged, tmp, report)
        views = evaluate(gb, adapters, Path(merged) if merged else None, "runtime" not in report["skipped"],
                         text, prompts, chat_template, n_tokens, n_greedy, verbose, tmp, report, importance)
        judge(views, report, max_kl)
    return report


def merged_importance(merged: Path, given: str | os.PathLike | None) -> Importance | None:
    """The importance matrix a merged file was quantized with (`quantize.imatrix.file`, as llama-quantize and
    merge record it; found at that path or beside the merged file), or `given` in its place; None for a
    file quantized without one."""
    if not merged.is_file():
        return None  # prepare() says what is wrong with it
    with GGUFFile(merged) as f:
        recorded = f.get("quantize.imatrix.file")
    if given is not None:
        if recorded is None:
            raise Lora2GGUFError(f"--imatrix {given}: {merged} was quantized without an importance matrix")
        return Importance.of(given)
    if recorded is None:
        return None
    for p in (Path(str(recorded)), merged.parent / Path(str(recorded)).name):
        if p.is_file():
            return Importance.of(p)
    raise Lora2GGUFError(f"{merged}: quantized with the importance matrix {recorded}, which is not there; pass "
                         "--imatrix FILE (the same matrix) so that its floor is measured the same way")


def check_request(base_path: Path, loras: list, runtime_lora) -> None:
    if base_path.is_dir():
        raise Lora2GGUFError(f"{base_path}: verify needs the GGUF base that llama.cpp serves")
    if not loras:
        raise Lora2GGUFError("verify needs at least one --lora ADAPTER")
    if runtime_lora and (len(loras) != 1 or not Path(loras[0][0]).is_dir()):
        raise Lora2GGUFError("--runtime-lora checks one GGUF LoRA against its PEFT source: give exactly one "
                             "--lora PEFT_DIR")


def prepare(gb, loras: list[tuple[str, float]], runtime_lora, merged, tmp: Path, report: dict) -> list[Adapter]:
    """Check the inputs and make what llama.cpp will load: each adapter read against the base, a PEFT
    directory converted to a GGUF LoRA in `tmp` (or the --runtime-lora given for it), the base fingerprint
    each GGUF LoRA recorded compared with this base. An adapter no GGUF LoRA can express skips the runtime
    view (the reason goes in the report); then a merged file is needed."""
    spec, base_path = gb.spec, gb.path
    spec.arch_module.require("verify", base_path)
    adapters = []
    for i, (p, scale) in enumerate(loras):
        path = Path(p)
        if not path.exists():
            raise Lora2GGUFError(f"{path}: no such adapter file or directory")
        lora = load_adapter(path, spec)
        lora.check_base(spec, f"base {base_path}")
        report["warnings"] += lora.notes  # a 4-bit training base: the KL below is the gap it leaves
        a = Adapter(path, scale, lora)
        refusal = _runtime_refusal(lora) if path.is_dir() else None
        if runtime_lora:  # read it ourselves first: llama.cpp aborts the process on some broken files
            a.runtime_path = Path(runtime_lora)
            if not a.runtime_path.is_file():
                raise Lora2GGUFError(f"{a.runtime_path}: no such GGUF LoRA file (--runtime-lora)")
            load_adapter(a.runtime_path, spec).check_base(spec, f"base {base_path}")
        elif refusal:  # llama.cpp cannot apply it at run time; a merged file can still carry it
            report["skipped"]["runtime"] = refusal
        elif path.is_dir():
            a.runtime_path = gguf_from_peft(path, base_path, tmp / f"adapter-{i}.gguf")
        else:
            a.runtime_path = path
        entry = {"path": str(path), "scale": scale, "runtime_file": a.runtime_path and str(a.runtime_path),
                 "base_match": None, "base_verdict": "a PEFT directory records no base fingerprint"}
        if a.runtime_path:
            entry["base_match"], entry["base_verdict"] = base_match(a.runtime_path, gb)
        if entry["base_match"] is False:
            report["warnings"].append(f"{a.runtime_path} was made for a different base than {base_path}: "
                                      f"{entry['base_verdict']}")
        report["adapters"].append(entry)
        adapters.append(a)
    if "runtime" in report["skipped"] and not merged:
        raise Lora2GGUFError(f"{report['skipped']['runtime']} — so verify has no runtime LoRA to check: give "
                             "--merged MERGED.gguf (from lora2gguf merge) to verify the merge instead")
    if merged:
        _check_merged(Path(merged), gb)
    return adapters


@dataclass
class Views:
    """What evaluate measured: the tallies over the text (each view's perplexity, the pairs judge reads, the
    carried fraction; parity.lockstep), the greedy choices of the views compared on llama.cpp's own greedy
    continuations (conts), and the merged file's type."""
    tallies: Tallies
    greedy: dict
    conts: list[list[int]]
    merged_type: str | None
    routing: dict | None = None  # a mixture of experts: view → layer → (tokens, n_expert_used) chosen experts

    @property
    def names(self) -> set[str]:
        return set(self.tallies.perplexity)

    def measure(self, p: str, q: str) -> dict:
        """compare()'s measures of a pair, and on a mixture of experts its routing (parity.metrics.routed_summary)."""
        pair = self.tallies.pair(p, q)
        return pair.summary() if self.routing is None else routed_summary(pair, self.routing[p], self.routing[q])


def pairs_judged(names: set[str]) -> list[tuple[str, str]]:
    """The pairs judge() measures, given the views evaluate makes."""
    out = [("base_reference", "reference"), ("base_reference", "base_runtime")]
    if "runtime" in names:
        out.append(("reference", "runtime"))
    if "merged" in names:
        out += [("reference", "merged"), ("reference", "base_alone_as_merged"),
                ("reference", "exact_merge_quantized") if "exact_merge_quantized" in names
                else ("base_reference", "base_alone_as_merged")]
        if "runtime" in names:
            out.append(("runtime", "merged"))
    if "nf4_reference" in names:
        out += [("nf4_reference", "reference"), ("nf4_base_reference", "base_reference")]
    return list(dict.fromkeys(out))


def evaluate(gb, adapters: list[Adapter], merged: Path | None, run_runtime: bool, text, prompts, chat_template,
             n_tokens: int, n_greedy: int, verbose: bool, tmp: Path, report: dict,
             imatrix: Importance | None = None) -> Views:
    """Greedy continuations of the prompts (llama.cpp with the runtime LoRA, or the merged file; the other
    views teacher-forced on them), then every view over the text in lockstep, a block of positions at a time
    (parity.lockstep): llama.cpp's views from a context each, the reference's from its final hidden states,
    computed first. No view is ever held whole."""
    base_path = gb.path
    moe = bool(gb.spec.arch_module.expert_proj)  # keep each view's expert choices over the text
    routing: dict | None = {} if moe else None

    def into(view: str) -> dict | None:
        return routing.setdefault(view, {}) if moe else None

    chat = _chat_prompts(gb, prompts, chat_template) if prompts else None
    # the context holds the text, or the prompts with their greedy continuations decoded side by side
    n_seq = min(len(chat or [0] * 4), 16)
    longest = sorted((len(p) for p in chat or []), reverse=True)[:n_seq] or [13] * 4  # _text_prompts: ≤ 13 tokens
    n_ctx = max(256, n_tokens + 8, sum(n + n_greedy for n in longest))
    # the file as it is, not repacked by llama.cpp for its CPU kernels: the base once in memory, not twice
    rt_args = dict(n_ctx=n_ctx, verbose=verbose, repack=False, n_seq=n_seq, moe_routing=moe)
    rows, decoded = block_rows(gb.spec.n_vocab), decode_rows(gb.spec.n_vocab)
    pairs = [(a.lora, a.scale) for a in adapters]
    streams: dict = {}
    aliases: dict[str, str] = {}
    greedy: dict = {}
    with contextlib.ExitStack() as stack:
        def load(path: Path) -> LlamaRuntime:  # a model llama.cpp evaluates until the views are compared
            return stack.enter_context(LlamaRuntime(path, **rt_args))

        def stream(view: str, rt: LlamaRuntime, loras=()) -> None:
            streams[view] = stack.enter_context(rt.stream(tokens, loras, rows, decoded))

        rt = load(base_path)
        tokens = rt.tokenize(text or DEFAULT_TEXT)[:n_tokens]
        if len(tokens) < 16:
            raise Lora2GGUFError(f"the text gives only {len(tokens)} tokens; give at least 16 (--text)")
        report["tokens"] = len(tokens)
        prompt_tokens = chat or _text_prompts(tokens)
        stream("base_runtime", rt)
        conts = None  # llama.cpp's greedy text: with the runtime LoRA, else from the merged file
        if run_runtime:
            runtime = [(a.runtime_path, a.scale) for a in adapters]
            rt.set_adapters(runtime)
            conts = greedy["runtime"] = rt.greedy_many(prompt_tokens, n_greedy)
            rt.set_adapters([])
            stream("runtime", rt, runtime)
        mtype = None
        if merged:
            mtype = file_type(merged)
            mrt = load(merged)
            if conts is None:
                conts = mrt.greedy_many(prompt_tokens, n_greedy)
            greedy["merged"] = teacher_forced(mrt.logits, prompt_tokens, conts)
            stream("merged", mrt)
            if mtype == file_type(base_path):  # the base is of the merged type (merge keeps untouched tensors' bytes)
                aliases["base_alone_as_merged"] = "base_runtime"
                if mtype not in FULL_PRECISION:
                    exact = exact_merge_file(gb, ReferenceWeights(gb, pairs), mtype, tmp, imatrix)
                    if exact is not None:
                        stream("exact_merge_quantized", load(exact))
            else:
                stream("base_alone_as_merged", load(base_alone_file(base_path, mtype, tmp, imatrix)))
        # the reference layer by layer over every sequence (one layer's weights in memory at a time), kept as
        # its final hidden states; its logits are made a block at a time as the views are compared
        def base_reference() -> tuple:
            got = {} if moe else None
            return reference_states(gb, [], [tokens], got)[1][0], got

        base_states, base_routing = remembered_base_states(base_path, tokens, base_reference)
        if moe:
            routing["base_reference"] = base_routing
        head, states = reference_states(gb, pairs, [tokens] + [p + c for p, c in zip(prompt_tokens, conts)],
                                        into("reference"))
        greedy["reference"] = teacher_forced(None, prompt_tokens, conts, [head(x) for x in states[1:]])
        ref_views = {"base_reference": (Head(gb, ReferenceWeights(gb, [])), base_states), "reference": (head, states[0])}
        measured = [*streams, *aliases, *ref_views]
        if any(four_bit_base(a.lora.config) for a in adapters):  # informative: no perplexity, no threshold
            nf4 = NF4Base(gb)
            for view, on in (("nf4_reference", pairs), ("nf4_base_reference", [])):
                h, xs = reference_states(nf4, on, [tokens])
                ref_views[view] = (h, xs[0])
        made = HeadBlocks(ref_views, rows)
        streams |= {view: made.stream(view) for view in ref_views}
        names = set(streams) | set(aliases)
        carried = ("base_reference", "reference", "base_alone_as_merged", "merged") if merged else None
        tallies = Tallies(measured, tokens, pairs_judged(names), carried, aliases)
        release_free_memory()  # the reference's layer temporaries: the views' blocks are other sizes
        lockstep.run(streams, tallies, len(tokens))
        if moe:
            routing |= {view: s.routing for view, s in streams.items() if isinstance(s, LogitStream)}
            routing |= {alias: routing[view] for alias, view in aliases.items()}
    if "nf4_reference" in names:
        report["four_bit_gap"] = {"kl_nf4_to_reference": tallies.pair("nf4_reference", "reference").summary()["mean_kl"],
                                  "kl_nf4_base_to_base": tallies.pair("nf4_base_reference", "base_reference")
                                  .summary()["mean_kl"]}
    report["views"] = {k: {"perplexity": t.value()} for k, t in tallies.perplexity.items()}
    return Views(tallies, greedy, conts, mtype, routing)


def judge(views: Views, report: dict, max_kl: float | None) -> None:
    """Pass or fail, into the report. Thresholds follow the floor measured for each file type: what llama.cpp
    at that type costs on the base alone (its arithmetic at F32/F16/BF16, that plus the rounding for
    quantized types); a merged file must also carry the adapter's effect (CARRIED_RANGE). On a mixture of
    experts each pair is also measured routing-aware (parity.routing)."""
    names, greedy, mtype, routing = views.names, views.greedy, views.merged_type, views.routing
    measure = views.measure
    moved = measure("base_reference", "reference")
    report["adapter_effect"] = {"kl_base_to_reference": moved["mean_kl"], "top1_changed": 1 - moved["top1"]}
    floor_base = measure("base_reference", "base_runtime")
    report["base_quantization_floor"] = judged_kl(floor_base)
    if routing is not None:
        report["routing_aware"] = {"rule": " ".join(RULE),
                                   "base_expert_set_mismatch": floor_base["expert_set_mismatch"]}
    checks = {}
    if "runtime" in names:
        checks["runtime"] = ("reference", "runtime", floor_base, 1e-4)
    if "merged" in names:
        if "exact_merge_quantized" in names:  # a same-type merge re-rounds exactly the tensors it changes
            floor = measure("reference", "exact_merge_quantized")
            report["merged_floor_source"] = "the reference's merged weights quantized by llama.cpp at the merged type"
        else:
            floor = measure("base_reference", "base_alone_as_merged")
        report["merged_quantization_floor"] = judged_kl(floor)
        if routing is not None:
            report["routing_aware"]["merged_floor_expert_set_mismatch"] = floor["expert_set_mismatch"]
        checks["merged"] = ("reference", "merged", floor, 1e-4 if mtype == "ALL_F32" else 1e-3)
        if "runtime" in names:
            checks["merged_vs_runtime"] = ("runtime", "merged", None, None)
    ok = True
    for name, (p, q, floor, slack) in checks.items():
        m = measure(p, q)
        m["greedy"] = agreement(greedy[p], greedy[q], views.conts)
        if floor is not None:
            ok &= judge_pair(m, floor, slack, max_kl)
        report["pairs"][name] = m
    if "merged" in names:
        c = _carries(views)
        report["merged_carries_adapter"] = c
        ok &= c["pass"]
    if moved["mean_kl"] < 1e-6:
        report["warnings"].append("the adapters barely change the base (KL base→reference < 1e-6): "
                                  "a no-op adapter proves nothing")
        ok = False
    if any(e["base_match"] is False for e in report["adapters"]):
        ok = False
    report["pass"] = bool(ok)


def _carries(views: Views) -> dict:
    """Does the merged file carry the adapter, rather than pass on a loose quantization threshold alone?
    The fraction of the adapter's effect it carries (parity.metrics.CarriedTally) must lie in CARRIED_RANGE;
    the KL margin over the base alone at the same type is reported beside it."""
    frac, err = views.tallies.carried.value()
    kl_merged = views.tallies.pair("reference", "merged").summary()["mean_kl"]
    kl_alone = views.tallies.pair("reference", "base_alone_as_merged").summary()["mean_kl"]
    return {"fraction": frac, "fraction_stderr": err, "allowed": list(CARRIED_RANGE), "kl_reference_to_merged": kl_merged,
            "kl_reference_to_base_alone": kl_alone, "kl_margin": kl_alone - kl_merged,
            "pass": bool(CARRIED_RANGE[0] <= frac <= CARRIED_RANGE[1])}


def _chat_prompts(gb, prompts, template: str | None) -> list[list[int]]:
    """Chat prompts for the greedy check, rendered with `template` or else the base's own."""
    tok = Tokenizer(gb.path, template)
    try:
        return [tok.encode(tok.render(msgs, add_generation_prompt=True)) for msgs in prompts]
    finally:
        tok.close()


def _text_prompts(tokens) -> list[list[int]]:
    """Without chat prompts: four slices of the text."""
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
        source = r.get("merged_floor_source", "base alone at the merged type vs reference base")
        if "merged_imatrix" in r:
            source += f", with the merged file's importance matrix {r['merged_imatrix']}"
        lines.append(f"merged-type quantization floor ({source}): {r['merged_quantization_floor']:.3g}")
    for view, why in r.get("skipped", {}).items():
        lines.append(f"{view} view skipped: {why}")
    if "routing_aware" in r:
        ra = r["routing_aware"]
        merged_floor = ra.get("merged_floor_expert_set_mismatch")
        lines.append("tokens whose top-k expert set flips between reference and llama.cpp: base "
                     f"{ra['base_expert_set_mismatch']:.1%}"
                     + (f", merged floor {merged_floor:.1%}" if merged_floor is not None else ""))
    lines += ["", *(table(r["pairs"]) if "routing_aware" in r else _dense_table(r["pairs"]))]
    c = r.get("merged_carries_adapter")
    if c:
        lines.append("")
        lines.append(f"merged carries the adapter: {c['fraction']:.3f} of its effect (allowed {c['allowed'][0]}-"
                     f"{c['allowed'][1]})  {'pass' if c['pass'] else 'FAIL'}")
        lines.append(f"  KL to reference: merged {c['kl_reference_to_merged']:.3g}, base alone at the merged type "
                     f"{c['kl_reference_to_base_alone']:.3g} (margin {c['kl_margin']:.3g})")
    lines.append("")
    lines.append("perplexity: " + ", ".join(f"{k} {v['perplexity']:.3f}" for k, v in r["views"].items()))
    for w in r["warnings"]:
        lines.append(f"warning: {w}")
    lines.append("PASS" if r["pass"] else "FAIL")
    return "\n".join(lines)


def _dense_table(pairs: dict) -> list[str]:
    """The pairs' lines on a dense model (a mixture of experts' table, with routing: parity.routing.table)."""
    hdr = f"{'pair':<20}{'mean KL':>11}{'max KL':>11}{'top-1':>8}{'max|Δ|':>9}{'greedy':>8}{'limit':>10}  result"
    lines = [hdr, "-" * len(hdr)]
    for name, m in pairs.items():
        lim = f"{m['max_kl_allowed']:.2g}" if "max_kl_allowed" in m else "-"
        res = ("pass" if m["pass"] else "FAIL") if "pass" in m else "info"
        lines.append(f"{name:<20}{m['mean_kl']:>11.3g}{m['max_kl']:>11.3g}{m['top1']:>8.1%}"
                     f"{m['max_abs_dlogit']:>9.3g}{m['greedy']['identical']:>8.0%}{lim:>10}  {res}")
    return lines


def read_text(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise Lora2GGUFError(f"{path}: cannot read the text ({e})") from None


def read_prompts(path: str) -> list[list[dict]]:
    """JSONL, one conversation per line: {"messages": [{"role": ..., "content": ...}, ...]} or a bare list."""
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
