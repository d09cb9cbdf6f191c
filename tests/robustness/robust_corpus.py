"""The robustness corpus: valid inputs made from the fixtures, and malformed inputs made from them at test
time (nothing binary is committed), plus the way every verb that reads an input is invoked on it.

Valid PEFT adapters are written directly in PEFT's on-disk format (adapter_config.json as PEFT 0.21 writes
it, `base_model.model.<module>.lora_A.weight` / `lora_B.weight` in safetensors) rather than through the
`peft` library: importing transformers + peft costs ~8 s of this suite's time budget on a 2-core machine,
and these files only need to be a valid starting point that our loaders accept (checked by
test_valid_inputs_are_accepted; tests/commands/test_convert.py checks the real PEFT format).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from conftest import FIXTURES, ROOT, fixture

BASE = fixture("llama")  # llama: q/k rows permuted, untied head — the strictest of the three fixtures
HF = fixture("llama", "hf")
DATA = FIXTURES / "train" / "text.jsonl"
N_LAYER, N_EMBD, N_FF, N_Q, N_KV = 2, 64, 256, 64, 32
SHAPES = {"self_attn.q_proj": (N_Q, N_EMBD), "self_attn.k_proj": (N_KV, N_EMBD), "self_attn.v_proj": (N_KV, N_EMBD),
          "self_attn.o_proj": (N_EMBD, N_Q), "mlp.gate_proj": (N_FF, N_EMBD), "mlp.up_proj": (N_FF, N_EMBD),
          "mlp.down_proj": (N_EMBD, N_FF)}
TARGETS = ("q_proj", "v_proj", "down_proj")
PREFIX = "base_model.model."


# -- valid inputs ---------------------------------------------------------------------------------
def peft_config(r=4, alpha=8, targets=TARGETS, cls="LlamaForCausalLM", **extra) -> dict:
    """adapter_config.json as peft 0.21's save_pretrained writes it (the keys that matter here)."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(HF),
            "auto_mapping": {"base_model_class": cls, "parent_library": "transformers.models.llama.modeling_llama"},
            "r": r, "lora_alpha": alpha, "target_modules": list(targets), "lora_dropout": 0.0, "bias": "none",
            "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "rank_pattern": {}, "alpha_pattern": {},
            "modules_to_save": None, "layers_to_transform": None, "init_lora_weights": False,
            "inference_mode": True, **extra}


def peft_tensors(r=4, targets=TARGETS, seed=0, shapes=SHAPES) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(N_LAYER):
        for mod, (n_out, n_in) in shapes.items():
            if mod.split(".")[-1] in targets:
                key = f"{PREFIX}model.layers.{i}.{mod}"
                out[f"{key}.lora_A.weight"] = (rng.standard_normal((r, n_in)) / np.sqrt(n_in)).astype(np.float32)
                out[f"{key}.lora_B.weight"] = (rng.standard_normal((n_out, r)) * 0.05).astype(np.float32)
    return out


def write_peft(d: Path, tensors: dict | None = None, config: dict | None = None) -> Path:
    from safetensors.numpy import save_file

    d.mkdir(parents=True, exist_ok=True)
    save_file(peft_tensors() if tensors is None else tensors, str(d / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    (d / "adapter_config.json").write_text(json.dumps(peft_config() if config is None else config, indent=2))
    return d


def other_base(dst: Path) -> Path:
    """A llama base with the fixture's exact names, shapes and metadata but other weights (another seed of
    the fixture generator): only the fingerprint recorded in a GGUF LoRA can tell it from the fixture."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import make_fixtures as mf

    saved = dict(mf.SEED)
    try:
        mf.SEED["llama"] = 4321
        mf.write_gguf(dst, "llama", mf.hf_weights("llama", len(mf.vocab()[0])), "f32")
    finally:
        mf.SEED.update(saved)
    return dst


@dataclass
class Valid:
    root: Path
    peft: Path  # PEFT adapter directory for the llama fixture
    gguf: Path  # the same adapter converted by us (records the fixture's fingerprint)
    other: Path  # a base of the same shapes with other weights
    other_gguf: Path  # the adapter converted for `other`
    prompts: Path  # verify --prompts
    base: Path = BASE
    hf: Path = HF
    data: Path = DATA


def build_valid(root: Path) -> Valid:
    from lora2gguf.commands.convert import convert

    peft = write_peft(root / "peft")
    other = other_base(root / "other-llama.gguf")
    prompts = root / "prompts.jsonl"  # one short greedy check instead of verify's four: its slowest part
    prompts.write_text(json.dumps({"messages": [{"role": "user", "content": "the cat"}]}) + "\n")
    return Valid(root, peft, convert(peft, BASE, root / "adapter.gguf"), other,
                 convert(peft, other, root / "adapter-for-other.gguf"), prompts)


# -- GGUF surgery ---------------------------------------------------------------------------------
def gguf_layout(path: Path) -> dict:
    """Byte positions in a GGUF file, found by gguf-py's own reader: the end of the KV section, each tensor
    info's name/type/offset fields, the data section."""
    import gguf

    r = gguf.GGUFReader(path)
    infos = []
    for t in r.tensors:
        pos, n = t.field.offset, len(t.name.encode())
        n_dims = len(t.shape)
        infos.append({"name": t.name, "name_at": pos + 8, "name_len": n, "ndims_at": pos + 8 + n,
                      "dims_at": pos + 12 + n, "type_at": pos + 12 + n + 8 * n_dims,
                      "offset_at": pos + 16 + n + 8 * n_dims})
    kv = [f for f in r.fields.values() if not f.name.startswith("GGUF.")]
    return {"kv_start": kv[0].offset, "kv_end": infos[0]["name_at"] - 8, "infos": infos,
            "data": r.data_offset, "size": path.stat().st_size}


def patched(src: Path, dst: Path, edits: list[tuple[int, bytes]] = (), cut: int | None = None) -> Path:
    data = bytearray(src.read_bytes())
    for at, b in edits:
        data[at:at + len(b)] = b
    dst.write_bytes(bytes(data[:cut] if cut is not None else data))
    return dst


def u32(v: int) -> bytes:
    return struct.pack("<I", v)


def u64(v: int) -> bytes:
    return struct.pack("<Q", v)


def gguf_byte_cases(kind: str) -> dict[str, tuple[Callable[[Path, Path], Path], str]]:
    """Malformations of a GGUF file's bytes: name → (make(src, dst), regex the error must match)."""
    def lay(src):
        return gguf_layout(src)

    def dup(src, dst):  # give a tensor the name of another tensor of the same name length
        infos = lay(src)["infos"]
        a, b = next((a, b) for a in infos for b in infos if a is not b and a["name_len"] == b["name_len"])
        return patched(src, dst, [(b["name_at"], a["name"].encode())])

    return {
        "empty": (lambda s, d: patched(s, d, cut=0), r"not a GGUF file \(0 bytes"),
        "truncated-in-header": (lambda s, d: patched(s, d, cut=20), r"too short for a GGUF header"),
        "truncated-in-kv": (lambda s, d: patched(s, d, cut=(lay(s)["kv_start"] + lay(s)["kv_end"]) // 2),
                            r"truncated GGUF .*metadata|truncated GGUF"),
        "truncated-in-tensor-infos": (lambda s, d: patched(s, d, cut=lay(s)["infos"][len(lay(s)["infos"]) // 2]["type_at"]),
                                      r"truncated GGUF"),
        "truncated-in-tensor-data": (lambda s, d: patched(s, d, cut=(lay(s)["data"] + lay(s)["size"]) // 2),
                                     r"past the end of the file .*truncated"),
        "wrong-magic": (lambda s, d: patched(s, d, [(0, b"GGML")]), r"not a GGUF file \(magic b'GGML'"),
        "wrong-version": (lambda s, d: patched(s, d, [(4, u32(7))]), r"unsupported GGUF version 7"),
        "offset-past-eof": (lambda s, d: patched(s, d, [(lay(s)["infos"][-1]["offset_at"], u64(1 << 40))]),
                            r"tensor \S+ data ends at byte \d+, past the end of the file"),
        "duplicate-tensor-name": (dup, r"tensor \S+ appears twice"),
        "absurd-tensor-count": (lambda s, d: patched(s, d, [(8, u64(1 << 62))]), r"corrupt GGUF header"),
        "unknown-tensor-type": (lambda s, d: patched(s, d, [(lay(s)["infos"][0]["type_at"], u32(9999))]),
                                r"unknown GGML type 9999"),
        "unknown-value-type": (lambda s, d: patched(s, d, [(lay(s)["kv_start"] + 8 + len(b"general.architecture"),
                                                            u32(77))]), r"unknown GGUF value type 77"),
        "string-length-overflow": (lambda s, d: patched(s, d, [(lay(s)["kv_start"], u64((1 << 64) - 1))]),
                                   r"truncated GGUF"),
        # a dimension of 2^64-1: numpy's int64 product of the shape wraps to -1 (a negative byte size)
        "shape-overflow": (lambda s, d: patched(s, d, [(lay(s)["infos"][0]["dims_at"] + 8, u64((1 << 64) - 1))]),
                           r"tensor \S+ data ends at byte \d+, past the end of the file"),
    }


def rewrite_adapter(src: Path, dst: Path, tensors: Callable[[dict], dict] | None = None, arch: str | None = None,
                    fields: dict | None = None) -> Path:
    """A copy of a GGUF LoRA with its tensors transformed (dict name → float32 array, in and out), its
    architecture and/or some metadata replaced (fields: key → (value, GGUFValueType) or None to drop)."""
    import gguf

    from lora2gguf.fileio.gguf_read import GGUFFile
    from lora2gguf.fileio.gguf_write import copy_fields

    fields = fields or {}
    with GGUFFile(src) as f:
        arrays = {n: f.tensor(n) for n in f.tensors}
        w = gguf.GGUFWriter(str(dst), arch or f.get("general.architecture"))
        copy_fields(f, w, skip=lambda k: k in fields)
    for k, v in fields.items():
        if v is not None:
            w.add_key_value(k, v[0], v[1])
    for n, a in (tensors(arrays) if tensors else arrays).items():
        w.add_tensor(n, np.ascontiguousarray(a, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def _poison(value):
    def fn(t):
        k = sorted(t)[3]
        t[k] = t[k].copy()
        t[k].flat[5] = value
        return t
    return fn


def _drop_b(t):
    return {k: v for k, v in t.items() if k != "blk.1.ffn_down.weight.lora_b"}


def _rank_mismatch(t):
    return {k: (v[:, :3] if k == "blk.0.attn_v.weight.lora_b" else v) for k, v in t.items()}


def _narrow(t):  # made for a llama of half the width: lora_a (r, 32), lora_b (32 or 16, r); ffn_down's input stays 256
    out = {}
    for k, v in t.items():
        if k.endswith("lora_a"):
            out[k] = v if "ffn_down" in k else v[:, :32]
        else:
            out[k] = v[:v.shape[0] // 2]
    return out


# -- PEFT directory surgery -----------------------------------------------------------------------
def copy_peft(v: Valid, dst: Path) -> Path:
    shutil.copytree(v.peft, dst)
    return dst


def with_config(edit: Callable[[dict], object] | str | None):
    """A PEFT dir whose adapter_config.json is edited (dict in place), replaced by raw text, or removed."""
    def make(v, dst):
        copy_peft(v, dst)
        p = dst / "adapter_config.json"
        if edit is None:
            p.unlink()
        elif isinstance(edit, str):
            p.write_text(edit)
        else:
            cfg = json.loads(p.read_text())
            edit(cfg)
            p.write_text(json.dumps(cfg))
        return dst
    return make


def with_tensors(edit: Callable[[dict], dict], config: dict | None = None):
    def make(v, dst):
        copy_peft(v, dst)
        from lora2gguf.fileio.tensors import read_safetensors_f32

        write_peft(dst, edit(read_safetensors_f32(dst / "adapter_model.safetensors")), config)
        return dst
    return make


def with_st_bytes(edit: Callable[[bytes], bytes], name="adapter_model.safetensors"):
    """A PEFT dir (or HF dir, by name) whose safetensors file's bytes are edited."""
    def make(v, dst):
        if name == "model.safetensors":
            shutil.copytree(v.hf, dst)
        else:
            copy_peft(v, dst)
        p = dst / name
        p.write_bytes(edit(p.read_bytes()))
        return dst
    return make


def st_header(data: bytes) -> tuple[dict, int]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), 8 + n


def st_with_header(data: bytes, edit: Callable[[dict], None]) -> bytes:
    """Re-encode a safetensors header after editing it (padded to 8 bytes as the format asks)."""
    header, start = st_header(data)
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return u64(len(raw)) + raw + data[start:]


def _first_tensor(h):
    return next(k for k in sorted(h) if k != "__metadata__")


def st_dtype_i32(data: bytes) -> bytes:
    def edit(h):  # I32 has F32's size: a well-formed file whose first tensor holds integers
        h[_first_tensor(h)]["dtype"] = "I32"
    return st_with_header(data, edit)


def st_offsets_overlap(data: bytes) -> bytes:
    def edit(h):
        names = sorted(k for k in h if k != "__metadata__")
        h[names[1]]["data_offsets"] = h[names[0]]["data_offsets"]
    return st_with_header(data, edit)


class _Evil:
    """A pickle that runs a shell command when loaded (what torch.load(weights_only=False) would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def evil_bin(v, dst):
    copy_peft(v, dst)
    (dst / "adapter_model.safetensors").unlink()
    with open(dst / "adapter_model.bin", "wb") as fh:
        pickle.dump({f"{PREFIX}model.layers.0.self_attn.q_proj.lora_A.weight": _Evil(dst.parent / "PWNED")}, fh)
    return dst


def torch_bin(obj_fn):
    def make(v, dst):
        import torch

        copy_peft(v, dst)
        (dst / "adapter_model.safetensors").unlink()
        torch.save(obj_fn(), dst / "adapter_model.bin")
        return dst
    return make


def garbage_bin(v, dst):
    copy_peft(v, dst)
    (dst / "adapter_model.safetensors").unlink()
    (dst / "adapter_model.bin").write_bytes(b"PK\x03\x04 this is not a torch file" * 10)
    return dst


# -- the cases --------------------------------------------------------------------------------------
@dataclass
class Case:
    name: str
    role: str  # which input it breaks: gguf-adapter, gguf-base, peft, hf-base, jsonl
    make: Callable  # (valid, dst) → the bad path
    expect: str  # regex the one error line must match (beside naming the bad path)
    verbs: tuple[str, ...] | None = None  # default: the verbs that read this role (test_robust_corpus.DEFAULT)
    also: tuple[str, ...] = ()  # verbs run on top of the default ones
    expect_for: dict = field(default_factory=dict)  # verb → regex, where that verb words it differently
    result: dict = field(default_factory=dict)  # verb → what it does instead of an error (a report, exit 1)


def gguf_cases() -> list[Case]:
    out = []
    # verify reads a --runtime-lora's header before any work (its fingerprint): broken files go through it too
    also = {"gguf-adapter": ("verify-runtime",), "gguf-base": ()}
    for role, src in (("gguf-adapter", lambda v: v.gguf), ("gguf-base", lambda v: v.base)):
        for name, (fn, expect) in gguf_byte_cases(role).items():
            out.append(Case(f"{role}:{name}", role, (lambda fn, src: lambda v, d: fn(src(v), d.with_suffix(".gguf")))(fn, src),
                            expect, also=also[role]))
    a = lambda fn: lambda v, d: fn(v, d.with_suffix(".gguf"))  # noqa: E731
    ga = "gguf-adapter"
    out += [
        Case("gguf-adapter:lora_a-without-lora_b", ga, a(lambda v, d: rewrite_adapter(v.gguf, d, _drop_b)),
             r"blk\.1\.ffn_down\.weight has lora_a without its pair"),
        Case("gguf-adapter:rank-mismatch", ga, a(lambda v, d: rewrite_adapter(v.gguf, d, _rank_mismatch)),
             r"blk\.0\.attn_v\.weight\.lora_a .* and blk\.0\.attn_v\.weight\.lora_b .* do not multiply"),
        Case("gguf-adapter:nan", ga, a(lambda v, d: rewrite_adapter(v.gguf, d, _poison(np.nan))),
             r"tensor blk\.\S+\.lora_[ab] contains NaN or Inf"),
        Case("gguf-adapter:inf", ga, a(lambda v, d: rewrite_adapter(v.gguf, d, _poison(np.inf))),
             r"tensor blk\.\S+\.lora_[ab] contains NaN or Inf"),
        Case("gguf-adapter:arch-qwen2-on-llama-base", ga, a(lambda v, d: rewrite_adapter(v.gguf, d, arch="qwen2")),
             r"adapter is for arch qwen2, the base is llama", verbs=("export", "merge", "verify", "inspect-base"),
             result={"inspect-base": r"arch mismatch: adapter qwen2, base llama"}),
        Case("gguf-adapter:wrong-shapes", ga, a(lambda v, d: rewrite_adapter(v.gguf, d, _narrow)),
             r"changes a \d+x\d+ weight but the base has \d+x\d+", verbs=("export", "merge", "verify", "inspect-base"),
             result={"inspect-base": r"does not fit the base: .*changes a"}),
        Case("gguf-adapter:made-for-another-base", ga, a(lambda v, d: shutil.copy(v.other_gguf, d) and d),
             r"converted for another base .*different weights", verbs=("export", "merge", "verify", "inspect-base"),
             result={"inspect-base": r"different weights \(same shapes",
                     "verify": "rc1:was made for a different base"}),
        Case("gguf-adapter:a-base-model-as-adapter", ga, a(lambda v, d: shutil.copy(v.base, d) and d),
             r"general\.type is None, not 'adapter'", verbs=("export", "merge", "verify")),
        Case("gguf-adapter:unknown-tensor-suffix", ga,
             a(lambda v, d: rewrite_adapter(v.gguf, d, lambda t: {k.replace("attn_q.weight.lora_a", "attn_q.weight.lora_c"): x
                                                                  for k, x in t.items()})),
             r"tensor blk\.\d\.attn_q\.weight\.lora_c is neither \.lora_a nor \.lora_b"),
        Case("gguf-adapter:alpha-is-a-string", ga,
             a(lambda v, d: rewrite_adapter(v.gguf, d, fields={"adapter.lora.alpha": ("eight", _vt("STRING"))})),
             r"adapter\.lora\.alpha is .*not a number"),
        Case("gguf-adapter:fingerprint-metadata-corrupt", ga,
             a(lambda v, d: rewrite_adapter(v.gguf, d, fields={"lora2gguf.base.sample": ("x", _vt("STRING"))})),
             r"its base fingerprint metadata .* is corrupt", verbs=("export", "merge", "verify", "inspect-base")),
        Case("gguf-adapter:lora-on-a-missing-layer", ga,
             a(lambda v, d: rewrite_adapter(v.gguf, d, lambda t: {k.replace("blk.1.", "blk.7."): x for k, x in t.items()})),
             r"LoRA on blk\.7\.\S+, which is not a projection or embedding of a 2-layer llama model",
             verbs=("export", "merge", "verify")),
        Case("gguf-base:adapter-as-base", "gguf-base", a(lambda v, d: shutil.copy(v.gguf, d) and d),
             r"this is a LoRA adapter, not a base model", verbs=("convert", "merge", "export", "verify", "train")),
        Case("gguf-base:metadata-disagrees-with-tensors", "gguf-base",
             a(lambda v, d: rewrite_adapter(v.base, d, fields={"llama.feed_forward_length": (128, _vt("UINT32"))})),
             r"tensor blk\.0\.ffn_\w+\.weight has shape \(\d+, \d+\), the model's metadata implies"),
        Case("gguf-base:block-count-is-a-string", "gguf-base",
             a(lambda v, d: rewrite_adapter(v.base, d, fields={"llama.block_count": ("two", _vt("STRING"))})),
             r"metadata llama\.block_count is a string, not a number"),
        Case("gguf-base:zero-heads", "gguf-base",
             a(lambda v, d: rewrite_adapter(v.base, d, fields={"llama.attention.head_count": (0, _vt("UINT32"))})),
             r"llama\.attention\.head_count is 0; it must be positive"),
    ]
    return out


def _vt(name):
    import gguf

    return getattr(gguf.GGUFValueType, name)


def peft_cases() -> list[Case]:
    P = "peft"
    st = lambda edit: with_st_bytes(edit)  # noqa: E731
    return [
        Case("peft:adapter_config-missing", P, with_config(None), r"no adapter_config\.json"),
        Case("peft:adapter_config-invalid-json", P, with_config('{"r": 4, "lora_alpha": 8,'), r"invalid JSON"),
        Case("peft:adapter_config-not-an-object", P, with_config("[4, 8]"), r"expected a JSON object"),
        Case("peft:adapter_config-missing-r", P, with_config(lambda c: c.pop("r")), r"'r' is missing or not a number"),
        Case("peft:adapter_config-missing-lora_alpha", P, with_config(lambda c: c.pop("lora_alpha")),
             r"'lora_alpha' is missing or not a number"),
        Case("peft:adapter_config-r-is-a-string", P, with_config(lambda c: c.update(r="4")), r"'r' is missing or not a number"),
        Case("peft:adapter_config-r-zero", P, with_config(lambda c: c.update(r=0)), r"'r' must be a positive integer, got 0"),
        Case("peft:adapter_config-alpha-nan", P, with_config(lambda c: c.update(lora_alpha=float("nan"))),
             r"'lora_alpha' must be a finite number"),
        Case("peft:adapter_config-unknown-target_modules", P, with_config(lambda c: c.update(target_modules=["c_attn"])),
             r"target_modules \['c_attn'\] in adapter_config\.json does not cover model\.layers\.\d\.\S+, which has LoRA"),
        Case("peft:unknown-target-module-tensors", P,
             with_tensors(lambda t: {k.replace("self_attn.q_proj", "self_attn.fc_in"): x for k, x in t.items()},
                          peft_config(targets=("fc_in", "v_proj", "down_proj"))),
             r"target module model\.layers\.\d\.self_attn\.fc_in has no GGUF tensor"),
        Case("peft:peft_type-not-lora", P, with_config(lambda c: c.update(peft_type="PREFIX_TUNING")), r"is not LoRA"),
        Case("peft:no-weights-file", P, lambda v, d: (copy_peft(v, d), (d / "adapter_model.safetensors").unlink(), d)[2],
             r"no adapter_model\.safetensors or adapter_model\.bin"),
        Case("peft:not-a-directory", P, lambda v, d: (d.write_text("{}"), d)[1], r"not a directory|not a GGUF file",
             verbs=("convert", "merge", "verify")),
        Case("peft:no-lora-tensors", P, with_tensors(lambda t: {}), r"holds no LoRA tensors"),
        Case("peft:lora_A-without-lora_B", P,
             with_tensors(lambda t: {k: x for k, x in t.items() if k != f"{PREFIX}model.layers.1.mlp.down_proj.lora_B.weight"}),
             r"model\.layers\.1\.mlp\.down_proj\.lora_A has no matching lora_B"),
        Case("peft:rank-mismatch-A-B", P,
             with_tensors(lambda t: {k: (x[:, :3] if k.endswith("layers.0.self_attn.v_proj.lora_B.weight") else x)
                                     for k, x in t.items()}),
             r"model\.layers\.0\.self_attn\.v_proj: lora_A \(4, 64\) and lora_B \(32, 3\) do not multiply"),
        Case("peft:rank-differs-from-config", P, with_config(lambda c: c.update(r=8)),
             r"has rank 4 but adapter_config\.json says r=8"),
        Case("peft:nan", P, with_tensors(_poison(np.nan)), r"tensor \S+lora_[AB]\.weight contains NaN or Inf"),
        Case("peft:inf", P, with_tensors(_poison(-np.inf)), r"tensor \S+lora_[AB]\.weight contains NaN or Inf"),
        Case("peft:three-dim-tensor", P,
             with_tensors(lambda t: {k: (x[None] if k.endswith("layers.0.self_attn.q_proj.lora_A.weight") else x)
                                     for k, x in t.items()}),
             r"do not multiply|not matrices"),
        Case("peft:arch-qwen2-on-llama-base", P,
             with_config(lambda c: c["auto_mapping"].update(base_model_class="Qwen2ForCausalLM")),
             r"made on a Qwen2ForCausalLM \(qwen2\) but \S+ is a llama model", verbs=("convert", "merge", "verify")),
        Case("peft:wrong-shapes", P,
             with_tensors(lambda t: {k: (x[:, :32] if "lora_A" in k and "down_proj" not in k else x) for k, x in t.items()}),
             r"changes a \d+x32 weight but base \S+ has \d+x64", verbs=("convert", "merge", "verify")),
        Case("peft:dora-magnitude-wrong-shape", P,
             with_tensors(lambda t: t | {f"{PREFIX}model.layers.0.self_attn.q_proj.lora_magnitude_vector":
                                         np.ones(10, np.float32)}, peft_config(use_dora=True)),
             r"model\.layers\.0\.self_attn\.q_proj\.lora_magnitude_vector has shape \(10,\), expected \(64,\)"),
        Case("peft:modules_to_save-wrong-shape", P,
             with_tensors(lambda t: t | {f"{PREFIX}model.norm.modules_to_save.default.weight": np.ones(32, np.float32)},
                          peft_config(modules_to_save=["model.norm"])),
             r"the adapter's model\.norm\.weight has shape \(32,\), \S+ has \(64,\)", verbs=("merge", "convert", "verify"),
             expect_for={"convert": r"full weights from modules_to_save .*cannot hold",
                         "verify": r"full weights from modules_to_save .*cannot hold"}),
        Case("peft:layer-beyond-base", P,
             with_tensors(lambda t: {k.replace("layers.1.", "layers.5."): x for k, x in t.items()}),
             r"model\.layers\.5\.\S+ is beyond the 2 layers", verbs=("convert", "merge", "verify")),
        # safetensors
        Case("peft:safetensors-header-length-huge", P, st(lambda b: u64(1 << 62) + b[8:]),
             r"adapter_model\.safetensors: not a readable safetensors file \(.*header"),
        Case("peft:safetensors-header-length-past-eof", P, st(lambda b: u64(len(b) + 100) + b[8:]),
             r"adapter_model\.safetensors: not a readable safetensors file \(.*header"),
        Case("peft:safetensors-bad-json-header", P, st(lambda b: b[:8] + b"#" + b[9:]),
             r"adapter_model\.safetensors: not a readable safetensors file"),
        Case("peft:safetensors-header-not-an-object", P, st(lambda b: u64(8) + b"[1,2,3] " + b[8 + st_header(b)[1] - 8:]),
             r"adapter_model\.safetensors: not a readable safetensors file"),
        Case("peft:safetensors-wrong-dtype", P, st(st_dtype_i32),
             r"tensor \S+ has dtype I32; expected a floating-point type"),
        Case("peft:safetensors-data-shorter-than-declared", P, st(lambda b: b[:-100]),
             r"adapter_model\.safetensors: not a readable safetensors file"),
        Case("peft:safetensors-overlapping-offsets", P, st(st_offsets_overlap),
             r"adapter_model\.safetensors: not a readable safetensors file"),
        Case("peft:safetensors-empty-file", P, st(lambda b: b""),
             r"adapter_model\.safetensors: not a readable safetensors file"),
        # pickles
        Case("peft:bin-pickle-that-runs-code", P, evil_bin, r"adapter_model\.bin: refused to load"),
        Case("peft:bin-torch-zip-that-runs-code", P,  # torch.save's own zip format, the pickle inside runs code
             lambda v, d: torch_bin(lambda: {f"{PREFIX}model.layers.0.self_attn.q_proj.lora_A.weight":
                                             _Evil(d.parent / "PWNED")})(v, d),
             r"adapter_model\.bin: refused to load \(it holds more than tensors: .*GLOBAL posix\.system"),
        Case("peft:bin-not-a-torch-file", P, garbage_bin, r"adapter_model\.bin: refused to load"),
        Case("peft:bin-dict-of-non-tensors", P,
             torch_bin(lambda: {f"{PREFIX}model.layers.0.self_attn.q_proj.lora_A.weight": [1, 2, 3]}),
             r"adapter_model\.bin: expected a dict of tensors"),
    ]


def hf_cases() -> list[Case]:
    H, st = "hf-base", lambda e: with_st_bytes(e, "model.safetensors")  # noqa: E731

    def cfg(edit):
        def make(v, d):
            shutil.copytree(v.hf, d)
            c = json.loads((d / "config.json").read_text())
            edit(c)
            (d / "config.json").write_text(json.dumps(c))
            return d
        return make

    def drop_tensor(b):  # a well-formed file that lacks one of the model's tensors
        from safetensors.numpy import load, save

        t = load(b)
        t.pop("model.layers.1.mlp.up_proj.weight")
        return save(t)

    return [
        Case("hf-base:safetensors-header-length-huge", H, st(lambda b: u64(1 << 62) + b[8:]),
             r"model\.safetensors: not a readable safetensors file"),
        Case("hf-base:safetensors-bad-json-header", H, st(lambda b: b[:8] + b"#" + b[9:]),
             r"model\.safetensors: not a readable safetensors file"),
        Case("hf-base:safetensors-wrong-dtype", H, st(st_dtype_i32), r"has dtype I32; expected a floating-point type"),
        Case("hf-base:safetensors-data-shorter-than-declared", H, st(lambda b: b[:-1000]),
             r"model\.safetensors: not a readable safetensors file"),
        Case("hf-base:safetensors-missing-tensor", H, st(drop_tensor),
             r"tensor model\.layers\.1\.mlp\.up_proj\.weight is missing"),
        Case("hf-base:config-invalid-json", H, lambda v, d: (shutil.copytree(v.hf, d), (d / "config.json").write_text("{"), d)[2],
             r"config\.json: invalid JSON"),
        Case("hf-base:config-missing-hidden_size", H, cfg(lambda c: c.pop("hidden_size")), r"key hidden_size is missing"),
        Case("hf-base:config-shapes-disagree", H, cfg(lambda c: c.update(intermediate_size=128)),
             r"tensor model\.layers\.0\.mlp\.\w+\.weight has shape \(\d+, \d+\), config\.json implies \(\d+, \d+\)"),
    ]


def jsonl_cases() -> list[Case]:
    J = "jsonl"

    def text(s: str | bytes):
        def make(v, d):
            p = d.with_suffix(".jsonl")
            p.write_bytes(s if isinstance(s, bytes) else s.encode())
            return p
        return make

    good = '{"text": "the cat sat on the mat"}\n'
    return [
        Case("jsonl:malformed-json", J, text(good + '{"text": "the dog"\n'), r":2: malformed JSON"),
        Case("jsonl:empty-file", J, text(""), r"no records \(the file is empty\)"),
        Case("jsonl:blank-lines-only", J, text("\n  \n\n"), r"no records"),
        Case("jsonl:unknown-role", J,
             text('{"messages": [{"role": "user", "content": "hi"}, {"role": "wizard", "content": "the cat"}]}\n'),
             r":1: messages\[1\] has unknown role 'wizard'"),
        Case("jsonl:not-an-object", J, text(good + '["the", "cat"]\n'), r":2: expected a JSON object, got list"),
        Case("jsonl:no-known-field", J, text('{"input": "the cat"}\n'), r":1: expected a \"text\", \"prompt\"\+\"completion\""),
        Case("jsonl:text-not-a-string", J, text('{"text": 42}\n'), r":1: field 'text' must be a string"),
        Case("jsonl:not-utf8", J, text(b'{"text": "the \xff\xfe cat"}\n'), r"not UTF-8 text"),
        Case("jsonl:is-a-directory", J, lambda v, d: (d.with_suffix(".jsonl").mkdir(), d.with_suffix(".jsonl"))[1],
             r"cannot read it \(Is a directory\); expected a JSONL file"),
        Case("jsonl:messages-without-assistant", J, text('{"messages": [{"role": "user", "content": "hi"}]}\n'),
             r":1: no assistant message"),
    ]


CASES: list[Case] = gguf_cases() + peft_cases() + hf_cases() + jsonl_cases()
