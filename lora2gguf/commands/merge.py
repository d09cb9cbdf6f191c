"""`lora2gguf merge`: bake LoRA adapters into a GGUF base, writing any llama.cpp type.

Math: W + Σ u·s·B·A with PEFT's scale s per module (rsLoRA, rank/alpha patterns) and the user's u. Plain
LoRA is summed in float32 as PEFT's own merge does, straight in GGUF layout (B's q/k rows permuted like
the base's); DoRA goes through adapters.lora.merged_weight (float64, in HF layout); biases through merged_bias.
modules_to_save and trained biases replace their tensor. On a tied base, LoRA on lm_head or embed_tokens
unties them: a new output.weight starts from the base embedding, as in PEFT's forward, where the head
keeps the original shared weight plus only lm_head's own LoRA (PEFT's merge_and_unload, and
reference_model, instead let an embed_tokens update leak into the tied head).

Streaming: the plan (names, shapes, types) is fixed from the base's header, then tensors are read into
fresh memory (not through a memory map, whose pages would stay resident) and merged on a thread pool,
plain LoRA in row blocks (n blocks of ≤ 1 MB at a time), DoRA/biases/replacements whole, one tensor at
a time.

Types: f32/f16/bf16 are written directly. Quantized types are written by llama.cpp's own quantizer run in
this process on the merge's row blocks (llamacpp.ggml): the model it quantizes is what used to be an
intermediate file (merged tensors F16 for an F16 base as llama-export-lora writes them, F32 otherwise;
untouched tensors byte-for-byte as in the base) but never exists on disk. llama.cpp chooses every tensor's
type (its dry run), copies each tensor already of its target type and quantizes the rest with
ggml_quantize_chunk. So from an F16 (F32) base the result is byte-identical to `llama-quantize` of our f16
(f32) output, from any base it is byte-identical to the previous intermediate-file path (intermediate=True,
kept and tested against), and from a quantized base the tensors no adapter touches keep their exact bytes
wherever their type is what the output uses.

Disk: a quantized merge writes only its output's temp file beside `out` (renamed at the end) and, for a
moment before the first tensor, a probe of a few KB: extra disk ≤ the output's size. The intermediate path
also wrote the intermediate (F32 merged tensors: ~29 GB for an all-linear adapter on an 8B model). Memory
of a quantized merge: the base's header, the adapters, a touched tensor's row blocks being merged (n blocks
of ≤ 1 MB for plain LoRA; the whole float32 tensor for DoRA, biases and replacements), the quantizer's chunks
in flight (≤ 2n + 1 of ≤ 1 MB of floats) and 16 MB slabs of an untouched tensor. f32/f16/bf16 outputs hold
whole tensors, two at a time (the next one computed while this one is written).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from lora2gguf.adapters.load import adapter_files, load_for_base, say_notes
from lora2gguf.adapters.lora import ModuleLoRA, PeftAdapter, merged_bias, merged_weight
from lora2gguf.adapters.rules import check_not_activated
from lora2gguf.allocator import release_free_memory
from lora2gguf.errors import Lora2GGUFError
from lora2gguf.fileio.atomic import atomic_output, check_output, part_prefix
from lora2gguf.fileio.gguf_read import TensorInfo, decode, file_identity, pread
from lora2gguf.fileio.gguf_write import MetadataWriter, PlannedTensor, copy_fields, encode, nbytes_of, write_streaming
from lora2gguf.fileio.imatrix import write_imatrix
from lora2gguf.llamacpp.ggml import Importance, Tensor, ggml_rows, stored_slabs, write_quantized
from lora2gguf.llamacpp.quantize import OutputType, llama_quantize, output_type, takes_file_type
from lora2gguf.llamacpp.tokenizer import Tokenizer
from lora2gguf.training.runlog import read_train_data
from lora2gguf.weights.base_model import GGUFBase

F32 = GGMLQuantizationType.F32
KEY_ADAPTERS, KEY_SCALES, KEY_SHA256 = "lora2gguf.merge.adapters", "lora2gguf.merge.scales", "lora2gguf.merge.sha256"
ROW_BLOCK = 1 << 18  # elements per block of the merge math (1 MB of float32)
ADAPTER_DATA = "adapter"  # --imatrix-data with no file: the data each adapter was trained on

# Bias tensors llama.cpp loads when present (optional slots), by HF module suffix: q/k/v for every arch
# (create_tensor_qkv in llama-model.cpp), o/gate/up/down only for llama (src/models/llama.cpp).


def _sha256(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


def load_adapter(path: str | os.PathLike, base: GGUFBase) -> tuple[PeftAdapter, str]:
    """An adapter (any format) checked against the base (adapters.load.load_for_base), refused when it is an
    activated LoRA; and its sha256 (adapter_config.json then the weights for a directory, the file for
    GGUF), recorded in the merged file."""
    a = load_for_base(path, base)
    check_not_activated(a, "a merged model")
    say_notes(a)
    return a, _sha256(adapter_files(Path(path)))


@dataclass
class Job:
    """One output tensor: where its data comes from and what changes it."""

    info: PlannedTensor  # name, shape (GGUF layout, numpy order), type written
    source: TensorInfo | None  # base tensor read (token_embd for a new untied output); None: new bias
    hf: str | None = None  # HF name of the output tensor (None: not a model tensor, copied as is)
    loras: list[tuple[ModuleLoRA, float]] = dataclasses.field(default_factory=list)
    replacement: np.ndarray | None = None  # modules_to_save / trained bias, HF layout

    @property
    def touched(self) -> bool:
        return bool(self.loras) or self.replacement is not None


def _plan(base: GGUFBase, adapters: list[tuple[PeftAdapter, float]]) -> list[Job]:
    """Every output tensor in base order (new biases after their weight, a new output.weight last), with
    its LoRA terms, checked against what llama.cpp can load. Types are set later."""
    spec, tensors = base.spec, base.file.tensors
    by_module: dict[str, list[tuple[ModuleLoRA, float]]] = {}
    full: dict[str, np.ndarray] = {}
    for a, u in adapters:
        for name, m in a.modules.items():
            by_module.setdefault(name, []).append((m, u))
        full.update(a.full_weights)  # the last adapter wins, as in parity.reference.reference_model
    hf_of = {base.gguf_name(h): h for h in base.hf_names()}
    if spec.tied_embeddings:
        hf_of["output.weight"] = "lm_head.weight"
    wanted: dict[str, str] = {}  # gguf name → hf name of tensors the adapters change
    for module, mods in by_module.items():
        wanted[base.gguf_name(module + ".weight")] = module + ".weight"
        if any(m.bias is not None for m, _ in mods):
            wanted[base.gguf_name(module + ".bias")] = module + ".bias"
    for hf in full:
        try:
            g = base.gguf_name(hf)
        except Lora2GGUFError:
            g = None
        src = next(a.path for a, _ in adapters if hf in a.full_weights)
        if g is None or (g not in hf_of and not hf.endswith(".bias")):
            raise Lora2GGUFError(f"{src}: the adapter replaces {hf}, which {base.path} does not have")
        want = tensors[g].shape if g in tensors else None
        if want is not None and full[hf].shape != want:
            raise Lora2GGUFError(f"{src}: the adapter's {hf} has shape {full[hf].shape}, {base.path} has {want}; "
                                 "the adapter was made for another model")
        wanted[g] = hf
    for g, hf in wanted.items():
        if g not in tensors and hf.endswith(".bias"):
            module = hf[:-len(".bias")]
            slots = spec.arch_module.bias_slots
            if not any(module.endswith(s) for s in slots):
                src = next((a.path for a, _ in adapters if hf in a.full_weights or (
                    module in a.modules and a.modules[module].bias is not None)), "adapter")
                raise Lora2GGUFError(f"{src}: the adapter adds a bias to {module}, but llama.cpp's {spec.arch} has no bias "
                                     f"tensor there (only {', '.join(s.split('.')[-1] for s in slots)}); "
                                     "retrain without lora_bias / bias='all' for that module")

    def job(g: str, shape: tuple[int, ...], source: TensorInfo | None) -> Job:
        hf = wanted.get(g)
        if hf is None:
            return Job(PlannedTensor(g, shape, source.type, source.nbytes), source)
        mods = by_module.get(hf.rsplit(".", 1)[0], [])
        if hf.endswith(".bias"):
            mods = [(m, u) for m, u in mods if m.bias is not None]
        return Job(PlannedTensor(g, shape, F32, 4 * int(np.prod(shape))), source, hf, mods, full.get(hf))

    jobs = []
    for g, t in tensors.items():
        jobs.append(job(g, t.shape, t))
        if g.endswith(".weight") and (b := g[:-len("weight")] + "bias") in wanted and b not in tensors:
            jobs.append(job(b, (t.shape[0],), None))
    untie = "output.weight" in wanted or "token_embd.weight" in wanted
    if untie and "output.weight" not in tensors and not spec.arch_module.can_untie:
        src = next(a.path for a, _ in adapters if {"lm_head", "model.embed_tokens"} & set(a.modules) | {
            n.rsplit(".", 1)[0] for n in a.full_weights})
        raise Lora2GGUFError(f"{src}: the adapter changes embed_tokens or lm_head, but llama.cpp's {spec.arch} always "
                             "multiplies the output by token_embd (it loads no separate output.weight), so no GGUF "
                             "can hold the untied head PEFT computes; retrain without embed_tokens / lm_head")
    if untie and "output.weight" not in tensors:  # the head starts from the original embedding
        emb = tensors["token_embd.weight"]
        jobs.append(job("output.weight", emb.shape, emb))
    return jobs


def _read(fh, t: TensorInfo) -> np.ndarray:
    """The tensor's bytes, read into fresh memory (freed after use, unlike pages of a memory map)."""
    return pread(fh.fileno(), t.offset, t.nbytes, f"tensor {t.name}")


def _decode(raw: np.ndarray, t: TensorInfo) -> np.ndarray:
    """float32 in GGUF layout (numpy order)."""
    return decode(raw, t.type, t.shape, f"tensor {t.name}")


class RowPool:
    """Runs a function over the row blocks of a tensor on n threads (numpy releases the GIL)."""
    def __init__(self, n: int):
        self.n, self.pool = n, ThreadPoolExecutor(n)

    def step(self, shape: tuple[int, ...]) -> int:
        """Rows per block: at most ROW_BLOCK elements, and at least n blocks when there are enough rows."""
        return max(1, min(ROW_BLOCK // max(1, shape[1]), -(-shape[0] // self.n)))

    def map(self, fn, shape: tuple[int, ...]) -> None:
        step = self.step(shape)
        list(self.pool.map(fn, [slice(i, i + step) for i in range(0, shape[0], step)]))


def _merge_dora(w: np.ndarray, mods: list[tuple[ModuleLoRA, float]], pool: RowPool) -> np.ndarray:
    """adapters.lora.merged_weight itself (HF layout), in row blocks: DoRA's row norms are row-wise for linear
    layers; an embedding with DoRA is merged whole."""
    if any(m.magnitude is not None and (m.embedding or m.fan_in_fan_out) for m, _ in mods):
        return merged_weight(w, mods).astype(np.float32)
    out = np.empty(w.shape, np.float32)

    def block(rows: slice) -> None:
        out[rows] = merged_weight(w[rows], [(m.row_block(rows), u) for m, u in mods])

    pool.map(block, w.shape)
    return out


def _plain_blocks(fd: int, src: TensorInfo, mods: list[tuple[ModuleLoRA, float]], rows_to_gguf, pool: RowPool,
                  dtype: type) -> Iterator[np.ndarray]:
    """W + Σ u·s·B·A for plain LoRA, merged_weight's sum computed the way PEFT's own merge does it: the
    scales folded into B, B·A and the sum in float32 (the output's precision; float64 here cost 3x the
    time for changes below one float32 ulp). In GGUF layout (B's rows permuted like the base's q/k rather
    than un-permuting W). Yields the tensor's row blocks in order, as `dtype` (float32 or float16): each
    block's base rows are read, decoded and merged on the pool, n blocks at a time, so only those are in
    memory. The f32/f16 outputs and the quantized ones (whose input these blocks are) share this function:
    the same blocks, the same float32 arithmetic, the same values."""
    factors = []
    for m, u in mods:
        a, b = m.factors()  # b @ a == ΔW / scale; rows of b are rows of W
        b = (b.astype(np.float64) * (m.scale * u)).astype(np.float32)
        factors.append((np.ascontiguousarray(a, np.float32), rows_to_gguf(b)))
    n_rows, ne0 = int(np.prod(src.shape[:-1])), src.shape[-1]  # a stack of experts: each expert's rows in turn
    row_bytes = src.nbytes // n_rows
    step = pool.step((n_rows, ne0))

    def block(rows: slice, raw: np.ndarray) -> np.ndarray:
        w = decode(raw, src.type, (-1, ne0), f"tensor {src.name}", copy=True)  # summed into in place
        for a, b in factors:
            w += _delta_rows(a, b, rows)
        return w if dtype == np.float32 else w.astype(dtype)

    group = step * pool.n
    for g0 in range(0, n_rows, group):
        g1 = min(n_rows, g0 + group)
        raw = pread(fd, src.offset + g0 * row_bytes, (g1 - g0) * row_bytes, f"tensor {src.name}")
        slices = [slice(i, min(i + step, g1)) for i in range(g0, g1, step)]
        yield from pool.pool.map(lambda r: block(r, raw[(r.start - g0) * row_bytes:(r.stop - g0) * row_bytes]), slices)


def _delta_rows(a: np.ndarray, b: np.ndarray, rows: slice) -> np.ndarray:
    """Rows `rows` of b·a; for a stack of experts (a (E, r, in), b (E, out, r)) rows run through each expert's
    output rows in turn and each expert's rows take its own a."""
    if a.ndim == 2:
        return b[rows] @ a
    n_out, flat, parts, i = b.shape[1], b.reshape(-1, b.shape[-1]), [], rows.start
    while i < rows.stop:  # the block's rows of expert i // n_out
        j = min(rows.stop, (i // n_out + 1) * n_out)
        parts.append(flat[i:j] @ a[i // n_out])
        i = j
    return np.concatenate(parts)


def _merged_blocks(fh, job: Job, spec, pool: RowPool) -> Iterator[np.ndarray]:
    """The output tensor in GGUF layout, in row blocks: float16 when that is the type written and the merge
    allows it (plain LoRA), float32 otherwise. Plain LoRA streams block by block; DoRA, biases and
    replacements come whole (one block)."""
    arch = spec.arch_module
    if job.replacement is None and not job.hf.endswith(".bias") and all(m.magnitude is None for m, _ in job.loras):
        half = job.info.type == GGMLQuantizationType.F16
        return _plain_blocks(fh.fileno(), job.source, job.loras, lambda b: arch.rows_to_gguf(spec, job.hf, b),
                             pool, np.float16 if half else np.float32)  # in GGUF layout already
    if job.replacement is not None:
        t = arch.to_gguf(spec, job.hf, np.asarray(job.replacement, np.float32))
    else:  # DoRA and biases: PEFT's math in HF layout and values, then back
        base = None if job.source is None else arch.from_gguf(spec, job.hf, _decode(_read(fh, job.source), job.source))
        if job.hf.endswith(".bias"):
            t = np.asarray(merged_bias(base, job.info.shape[0], job.loras), np.float32)
        else:
            t = _merge_dora(base, job.loras, pool)
        t = arch.to_gguf(spec, job.hf, t)
    if t.shape != job.info.shape:
        raise Lora2GGUFError(f"{fh.name}: an adapter gives {job.hf} shape {t.shape}, the base has {job.info.shape}")
    return iter([t])


def _merged(fh, job: Job, spec, pool: RowPool) -> np.ndarray:
    """The whole output tensor (see _merged_blocks)."""
    blocks = list(_merged_blocks(fh, job, spec, pool))
    t = blocks[0] if len(blocks) == 1 else np.concatenate(blocks)
    if t.ndim == 2 and t.shape != job.info.shape and t.size == np.prod(job.info.shape) \
            and t.shape[-1] == job.info.shape[-1]:  # rows of a stack of experts, or a one-row matrix stored as a vector
        t = t.reshape(job.info.shape)
    if t.shape != job.info.shape:
        raise Lora2GGUFError(f"{fh.name}: an adapter gives {job.hf} shape {t.shape}, the base has {job.info.shape}")
    return t


def _set_types(jobs: list[Job], out: OutputType, f16_base: bool) -> None:
    """Direct types: llama.cpp's choice per tensor (file type for 2-D weights, others keep theirs; merged
    1-D tensors F32). Quantized types: the intermediate is our f16 output for an F16 base, our f32 output
    otherwise, except that untouched tensors keep their bytes and type (llama.cpp copies or requantizes)."""
    for j in jobs:
        t = out.direct or (GGMLQuantizationType.F16 if f16_base else F32)
        if takes_file_type(j.info.name, j.info.shape) and (out.direct or j.touched):
            j.info = PlannedTensor(j.info.name, j.info.shape, t, nbytes_of(j.info.shape, t))


def _tensor_data(fh, job: Job, spec, pool: RowPool) -> np.ndarray:
    src, want = job.source, job.info.type
    if not job.touched:
        if src.type == want:
            return _read(fh, src)  # byte for byte
        return encode(_decode(_read(fh, src), src), want)
    t = _merged(fh, job, spec, pool)
    return t if t.dtype == np.float16 or want == F32 else encode(t, want)


def _writer(base: GGUFBase, ftype: LlamaFileType, record: dict) -> GGUFWriter:
    """A GGUFWriter carrying the output's metadata: the base's, this file type, the adapters on record."""
    f = base.file
    w = MetadataWriter(None, base.spec.arch)
    copy_fields(f, w, skip=lambda k: k == "general.file_type" or k.startswith("lora2gguf.merge."))
    w.add_file_type(int(ftype))
    for key, values in record.items():  # earlier merges of this base stay on record, first
        old = f.get(key)
        w.add_array(key, (old.tolist() if isinstance(old, np.ndarray) else list(old or [])) + values)
    return w


@contextlib.contextmanager
def _merging(base: GGUFBase, threads: int | None):
    """The base file opened unbuffered and the row pool, with one BLAS thread per block: numpy's OpenBLAS
    would spread each rank-r product over every core and spin between calls (10x the CPU time, slower in
    wall time too); the pool parallelises instead."""
    pool = RowPool(threads or os.cpu_count() or 1)
    with open(base.path, "rb", buffering=0) as fh, pool.pool, threadpool_limits(1, user_api="blas"):
        yield fh, pool


def _write(path: Path, base: GGUFBase, jobs: list[Job], ftype: LlamaFileType, record: dict, bar,
           threads: int | None) -> None:
    w = _writer(base, ftype, record)
    with _merging(base, threads) as (fh, pool):
        data = _ahead(lambda j: _tensor_data(fh, j, base.spec, pool), jobs)
        write_streaming(path, w, [j.info for j in jobs], data, progress=lambda t: bar.update(1))


def _source(fh, job: Job, spec, pool: RowPool) -> Tensor:
    """One tensor of the model llama.cpp's quantizer would read (the intermediate file of intermediate=True):
    an untouched tensor as stored in the base (converted to float by ggml, as llama.cpp converts it, when
    it is requantized), a merged one as _merged_blocks computes it, in its intermediate type (F32, or F16
    from an F16 base)."""
    info = job.info
    if not job.touched:
        fd, src = fh.fileno(), job.source
        return Tensor(info.name, info.shape, src.type, lambda: ggml_rows(fd, src), lambda: stored_slabs(fd, src),
                      (file_identity(fd), src.name))
    dtype = np.float16 if info.type == GGMLQuantizationType.F16 else np.float32  # rounded as the file holds it
    return Tensor(info.name, info.shape, info.type,
                  lambda: (b.astype(dtype, copy=False) for b in _merged_blocks(fh, job, spec, pool)))


def _write_quantized(path: Path, base: GGUFBase, jobs: list[Job], qtype: OutputType, mid_type: LlamaFileType,
                     record: dict, bar, threads: int | None, verbose: bool, importance: Importance | None) -> None:
    """The quantized output straight from the merge: llama.cpp's quantizer run in this process on the
    intermediate model (metadata of our f16/f32 output, tensors as _set_types plans them), which never
    becomes a file (llamacpp.ggml)."""
    with _merging(base, threads) as (fh, pool):
        tensors = [_source(fh, j, base.spec, pool) for j in jobs]
        write_quantized(path, qtype.ftype, _writer(base, mid_type, record), tensors, threads,
                        progress=lambda t: bar.update(1), verbose=verbose, imatrix=importance)


def _ahead(fn, items):
    """fn(item) for each item, in order, the next one computed while the caller writes this one out
    (so at most two results are alive)."""
    with ThreadPoolExecutor(1) as ex:
        pending = None
        for item in items:
            nxt = ex.submit(fn, item)
            if pending is not None:
                yield pending.result()
            pending = nxt
        if pending is not None:
            yield pending.result()


def _check_imatrix_request(qtype: OutputType, imatrix, imatrix_data, imatrix_out) -> None:
    if imatrix is not None and imatrix_data is not None:
        raise Lora2GGUFError("--imatrix and --imatrix-data: give one (a file from llama-imatrix, or data to measure "
                             "the matrix on)")
    if imatrix_out is not None and imatrix_data is None:
        raise Lora2GGUFError("--imatrix-out writes the matrix --imatrix-data measures; give --imatrix-data too")
    given = imatrix is not None or imatrix_data is not None
    if given and qtype.direct is not None:
        raise Lora2GGUFError(f"--quant {qtype.name} is written without quantization; an importance matrix applies "
                             "to quantized types (q4_k_m, iq2_xs, ...)")
    if qtype.needs_imatrix and not given:
        raise Lora2GGUFError(f"--quant {qtype.name}: llama.cpp needs an importance matrix for this type; give "
                             "--imatrix FILE (from llama-imatrix) or --imatrix-data DATA (measured on the merged "
                             "model; --imatrix-data alone: the adapters' own training data)")


def _calibration_files(loras: list[tuple[str | os.PathLike, float]], imatrix_data: str,
                       chat_template: str | None) -> list[tuple[Path, str | None]]:
    """The data files to measure on, each with the chat template its conversations are rendered with: the one
    given, or each adapter's training data and template (train_data.json of its training run), checked
    unchanged since training."""
    if imatrix_data != ADAPTER_DATA:
        if not Path(imatrix_data).is_file():
            raise Lora2GGUFError(f"--imatrix-data {imatrix_data}: no such file")
        return [(Path(imatrix_data), chat_template)]
    files = []
    for p, _ in loras:
        rec = read_train_data(Path(p)) if Path(p).is_dir() else None
        if rec is None:
            raise Lora2GGUFError(f"--lora {p}: no record of its training data (train_data.json, written by "
                                 "lora2gguf train); give --imatrix-data FILE")
        data = Path(rec["data"])
        if not data.is_file():
            raise Lora2GGUFError(f"--lora {p}: its training data {data} is gone; give --imatrix-data FILE")
        if rec.get("data_sha256") and _sha256([data]) != rec["data_sha256"]:
            raise Lora2GGUFError(f"--lora {p}: its training data {data} changed since training; give "
                                 "--imatrix-data FILE to measure on it anyway")
        entry = (data, chat_template or rec.get("chat_template"))
        if entry not in files:
            files.append(entry)
    return files


def _measured_importance(b: GGUFBase, adapters: list[tuple[PeftAdapter, float]],
                         files: list[tuple[Path, str | None]], imatrix_out: Path, verbose: bool) -> Importance:
    """The matrix measured on the merged model over the data (parity.importance), written to imatrix_out
    (llama-imatrix's GGUF form: llama-quantize --imatrix takes it, verify finds it), and what
    llama-quantize --imatrix imatrix_out would hand llama.cpp."""
    # torch modules, imported only on this path: a merge without --imatrix-data starts without torch
    from lora2gguf.parity.importance import measure_importance
    from lora2gguf.training.data import calibration_sequences

    seqs = []
    for f, template in files:
        tok = Tokenizer(b.path, template)
        try:
            seqs += calibration_sequences(f, tok)
        finally:
            tok.close()
    names = ", ".join(str(f) for f, _ in files)
    if verbose:
        print(f"importance matrix: {len(seqs)} sequences, {sum(map(len, seqs))} tokens from {names}", file=sys.stderr)
    im = measure_importance(b, adapters, seqs, names)
    with atomic_output(imatrix_out) as tmp:
        write_imatrix(tmp, im, b.spec.arch)
    return Importance.of(imatrix_out, im)  # the file holds exactly these float32 sums and counts


def _check_names(imp: Importance, b: GGUFBase, path) -> None:
    if not set(imp.values) & set(b.file.tensors):
        raise Lora2GGUFError(f"--imatrix {path}: none of its {len(imp.values)} entries names a tensor of {b.path} "
                             f"(e.g. {next(iter(imp.values))}); it was computed for another model")


def merge(base: str | os.PathLike, loras: list[tuple[str | os.PathLike, float]], out: str | os.PathLike,
          quant: str = "f16", threads: int | None = None, force: bool = False, progress: bool | None = None,
          verbose: bool = False, intermediate: bool = False, imatrix: str | os.PathLike | None = None,
          imatrix_data: str | os.PathLike | None = None, imatrix_out: str | os.PathLike | None = None,
          chat_template: str | None = None) -> Path:
    """Merge (adapter, scale) pairs into the GGUF base and write `out` as `quant`. Everything that can be
    wrong with the request is checked before any tensor is read. progress=None: a bar when stderr is a tty.
    intermediate=True (quantized types): the previous path, an intermediate file beside `out` quantized by
    llama.cpp in a child process; same bytes, more disk (see the module docstring).

    Importance matrix (quantized types): `imatrix`, a llama-imatrix file, used as llama-quantize --imatrix
    uses it (byte-identical output from the same F32/F16 model); or `imatrix_data`, a JSONL/text file (or
    ADAPTER_DATA: each adapter's training data) on which the matrix is measured on the merged model
    (parity.importance) and written to `imatrix_out` (default OUT's name + .imatrix.gguf) first;
    `chat_template` renders its conversations where the base has none (default for ADAPTER_DATA: the one the
    adapter was trained with)."""
    qtype = output_type(quant)
    _check_imatrix_request(qtype, imatrix, imatrix_data, imatrix_out)
    if intermediate and (imatrix is not None or imatrix_data is not None):
        raise Lora2GGUFError("an importance matrix is applied by the in-process quantizer only (not intermediate=True)")
    if threads is not None and threads < 1:
        raise Lora2GGUFError(f"--threads {threads}: give a positive number of threads")
    if not loras:
        raise Lora2GGUFError("no adapter given; pass --lora ADAPTER[:SCALE] at least once")
    for p, s in loras:
        if not math.isfinite(float(s)):
            raise Lora2GGUFError(f"--lora {p}: scale must be a finite number")
    out = check_output(out, force, [base, *[p for p, _ in loras]])
    if imatrix_data is not None:
        imatrix_out = Path(imatrix_out) if imatrix_out is not None else out.with_name(out.stem + ".imatrix.gguf")
        imatrix_out = check_output(imatrix_out, force, [base, *[p for p, _ in loras], out])
        data_files = _calibration_files(loras, str(imatrix_data), chat_template)
    importance = Importance.of(imatrix) if imatrix is not None else None
    if Path(base).is_dir():
        raise Lora2GGUFError(f"{base}: merge needs a GGUF base file (BASE.gguf), not a directory")
    with GGUFBase(base) as b:
        b.spec.arch_module.require("merge", b.path)
        if int(b.file.get("split.count", 1)) > 1:
            raise Lora2GGUFError(f"{base}: a split GGUF (shard of {b.file.get('split.count')}); join the shards "
                                 "first with llama-gguf-split --merge")
        adapters, record = [], {KEY_ADAPTERS: [], KEY_SCALES: [], KEY_SHA256: []}
        for p, s in loras:
            a, digest = load_adapter(p, b)
            adapters.append((a, float(s)))
            record[KEY_ADAPTERS].append(Path(p).name)
            record[KEY_SCALES].append(float(s))
            record[KEY_SHA256].append(digest)
        jobs = _plan(b, adapters)
        if importance is not None:
            _check_names(importance, b, imatrix)
        if imatrix_data is not None:
            importance = _measured_importance(b, adapters, data_files, imatrix_out, verbose)
        f16_base = b.file.get("general.file_type") == LlamaFileType.MOSTLY_F16
        _set_types(jobs, qtype, f16_base)
        n = len(jobs)
        mid_type = LlamaFileType.MOSTLY_F16 if f16_base else LlamaFileType.ALL_F32
        with tqdm(total=2 * n if intermediate and not qtype.direct else n, desc=f"merge → {qtype.label}",
                  unit="tensor", file=sys.stderr,
                  disable=(not sys.stderr.isatty()) if progress is None else not progress) as bar, \
                atomic_output(out) as tmp:
            if qtype.direct is not None:
                _write(tmp, b, jobs, qtype.ftype, record, bar, threads)
                return out
            if not intermediate:
                _write_quantized(tmp, b, jobs, qtype, mid_type, record, bar, threads, verbose, importance)
                return out
            fd, mid = tempfile.mkstemp(prefix=part_prefix(out), suffix=".merged.part", dir=out.parent)
            os.close(fd)
            try:  # the intermediate's metadata is exactly that of our f16 / f32 output
                _write(Path(mid), b, jobs, mid_type, record, bar, threads)
                del jobs, adapters, a  # the quantizer's buffers come on top of what we still hold: drop it
                b.close()
                release_free_memory()  # our pool's freed tensors, ~15 MB, would sit under the quantizer's peak
                bar.set_description(f"quantize → {qtype.label}")
                llama_quantize(mid, tmp, qtype.ftype, threads, verbose, on_tensor=lambda: bar.update(1))
            finally:
                Path(mid).unlink(missing_ok=True)
    return out
