"""llama.cpp through llama-cpp-python: load a GGUF once, read logits for every position, swap LoRA
adapters on the loaded model without reloading it.

Settings chosen for parity checks: F32 KV cache (llama.cpp's default F16 cache alone costs ~1e-6 KL),
no flash attention, logits for all positions, one evaluation per sequence."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
from pathlib import Path
from typing import Sequence

import llama_cpp
import numpy as np

from lora2gguf.errors import Lora2GGUFError


@contextlib.contextmanager
def _quiet_stderr(enabled: bool = True):
    """llama.cpp logs to fd 2 from C; silence it unless asked for (verbose=True)."""
    if not enabled:
        yield
        return
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


@functools.cache
def _cpu_has_amx() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " amx_tile" in line for line in f)
    except OSError:  # not Linux: ggml has no AMX path there either
        return False


@contextlib.contextmanager
def _without_extra_bufts(llama_cpp, repack: bool):
    """Load a model without llama.cpp's extra CPU buffer types where the CPU has AMX, or where the caller
    asks for the file's own layout (`repack=False`). The extra types are llama.cpp's repacked CPU kernels:
    on x86 they copy the quantized weights into another layout, so an 8B Q4_K_M (4.9 GB) costs the mapped
    file plus 3.4 GB of copies (8.6 GB measured); verify loads the file as it is (5.3 GB). A build with AMX
    (GGML_NATIVE on a Sapphire Rapids machine) moves quantized weights into its AMX buffer, and on this
    project's 2-core KVM machines (llama-cpp-python 0.3.36) those kernels die with SIGILL at the first
    batched matmul (`tilezero` in ggml_backend_amx_mul_mat; Q4_1, Q8_0 and K-quant models alike, any
    prompt of more than a few tokens), although a small C program's AMX tiles work there: the cause is
    in ggml or the VM, not found. llama-cpp-python's Llama() has no argument for use_extra_bufts, so its
    default params are patched for the load. Elsewhere llama.cpp keeps its defaults (there the extra types
    are its repacked CPU kernels)."""
    if repack and not _cpu_has_amx():
        yield
        return
    lc = llama_cpp.llama_cpp
    default = lc.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    lc.llama_model_default_params = params
    try:
        yield
    finally:
        lc.llama_model_default_params = default


class _GGMLTensor(ctypes.Structure):
    """The head of ggml.h's struct ggml_tensor, up to its name (what an eval callback reads)."""
    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4),
                ("nb", ctypes.c_size_t * 4), ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16),
                ("flags", ctypes.c_int32), ("src", ctypes.c_void_p * 10), ("view_src", ctypes.c_void_p),
                ("view_offs", ctypes.c_size_t), ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64)]


def _routing_callback(store: dict[int, list[np.ndarray]]):
    """A ggml eval callback that keeps each MoE layer's chosen experts, one array per decoded batch:
    build_moe_ffn names them `ffn_moe_topk-<layer>` (int32, ne [n_expert_used, n_tokens], a view with row
    stride nb[1]); CPU backend."""
    @llama_cpp.ggml_backend_sched_eval_callback
    def cb(t, ask, _user):
        g = ctypes.cast(t, ctypes.POINTER(_GGMLTensor)).contents
        name = g.name.decode(errors="replace")
        if not name.startswith("ffn_moe_topk-"):
            return not ask  # not wanted; keep computing
        if ask:
            return True
        n_used, n_tok, stride = g.ne[0], g.ne[1], g.nb[1]
        rows = (ctypes.c_int32 * n_used)
        store.setdefault(int(name.rsplit("-", 1)[1]), []).append(
            np.array([list(rows.from_address(g.data + j * stride)) for j in range(n_tok)], np.int64))
        return True
    return cb


@contextlib.contextmanager
def _context_params(llama_cpp, cb, n_seq: int):
    """llama-cpp-python's Llama() has no argument for cb_eval, nor for several sequences outside embedding
    mode: its default context params are patched for the load, as _without_extra_bufts does for the
    model's. Several sequences share one KV cache (kv_unified), each using as many cells as it needs."""
    if cb is None and n_seq == 1:
        yield
        return
    lc, default = llama_cpp.llama_cpp, llama_cpp.llama_cpp.llama_context_default_params

    def params():
        p = default()
        if cb is not None:
            p.cb_eval, p.cb_eval_user_data = cb, None
        if n_seq > 1:
            p.n_seq_max, p.kv_unified = n_seq, True
        return p

    lc.llama_context_default_params = llama_cpp.llama_context_default_params = params
    try:
        yield
    finally:
        lc.llama_context_default_params = llama_cpp.llama_context_default_params = default


class LlamaRuntime:
    def __init__(self, model_path: str | os.PathLike, n_ctx: int = 512, n_threads: int | None = None,
                 vocab_only: bool = False, verbose: bool = False, repack: bool = True, moe_routing: bool = False,
                 n_batch: int = 256, n_seq: int = 1):
        """moe_routing: keep the experts llama.cpp chose in each MoE layer since the last `logits` call
        (`self.routing`: layer → (tokens, n_expert_used) expert ids), for routing-aware parity.
        n_batch: tokens per decode. llama.cpp holds n_batch × n_vocab float32 logits twice (its output
        buffer and the graph's last tensor): 268 MB each at Gemma 3's 262k vocabulary and 256 tokens, 740 MB
        at 700; larger batches were no faster on CPU (scripts/bench_verify.py, BENCHMARKS.md).
        n_seq: how many prompts `greedy_many` may decode side by side (n_ctx is then shared by all)."""
        self._lc = llama_cpp
        self.path = Path(model_path)
        self.verbose = verbose
        self._adapters: dict[str, object] = {}
        self._routing: dict[int, list[np.ndarray]] = {}
        self._cb = _routing_callback(self._routing) if moe_routing else None  # kept alive with the context
        self.n_seq = n_seq
        with _quiet_stderr(not verbose), _without_extra_bufts(llama_cpp, repack), _context_params(llama_cpp, self._cb,
                                                                                                   n_seq):
            try:
                self.llm = llama_cpp.Llama(
                    model_path=str(self.path), n_ctx=n_ctx, n_batch=min(n_batch, n_ctx), n_ubatch=min(n_batch, n_ctx),
                    logits_all=True,
                    type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, flash_attn=False,
                    n_threads=n_threads or min(4, os.cpu_count() or 1), vocab_only=vocab_only,
                    seed=0, verbose=verbose)
            except (ValueError, RuntimeError) as e:
                raise Lora2GGUFError(f"{self.path}: llama.cpp could not load it ({e})") from None

    @property
    def routing(self) -> dict[int, np.ndarray]:
        return {layer: np.concatenate(parts) for layer, parts in self._routing.items()}

    # -- tokens -----------------------------------------------------------------------------------
    def tokenize(self, text: str, add_bos: bool = True, special: bool = False) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self.llm.detokenize(list(tokens)).decode("utf-8", errors="replace")

    @property
    def n_vocab(self) -> int:
        return self.llm.n_vocab()

    # -- adapters ---------------------------------------------------------------------------------
    def set_adapters(self, adapters: Sequence[tuple[str | os.PathLike, float]]) -> None:
        """Make exactly these (path, scale) adapters active on the loaded model. Each file is loaded
        once and kept; switching between loaded adapters costs no model reload."""
        self._set_adapters_on(self.llm.ctx, adapters)
        self.llm.reset()  # the KV cache was computed with the previous adapters: no prefix reuse across

    def _set_adapters_on(self, ctx, adapters: Sequence[tuple[str | os.PathLike, float]]) -> None:
        lc = self._lc
        ptrs = []
        for path, _ in adapters:
            key = str(Path(path).resolve())
            if key not in self._adapters:
                with _quiet_stderr(not self.verbose):
                    ptr = lc.llama_adapter_lora_init(self.llm.model, key.encode())
                if not ptr:
                    raise Lora2GGUFError(f"{path}: llama.cpp refused this LoRA adapter for {self.path} "
                                         "(run with --verbose to see llama.cpp's reason)")
                self._adapters[key] = ptr
            ptrs.append(self._adapters[key])
        n = len(ptrs)
        arr = (lc.llama_adapter_lora_p_ctypes * max(n, 1))(*ptrs)
        scales = (ctypes.c_float * max(n, 1))(*[float(s) for _, s in adapters])
        if lc.llama_set_adapters_lora(ctx, arr if n else None, n, scales if n else None):
            raise Lora2GGUFError(f"{self.path}: llama.cpp could not set the LoRA adapters")

    def stream(self, tokens: Sequence[int], adapters: Sequence[tuple[str | os.PathLike, float]] = (),
               rows: int = 64, decode_rows: int | None = None) -> LogitStream:
        """The logits of `tokens` with these adapters, `rows` positions at a time, decoded `decode_rows` (a
        multiple of rows) at a time (LogitStream)."""
        return LogitStream(self, tokens, adapters, rows, decode_rows)

    # -- evaluation -------------------------------------------------------------------------------
    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        """float32 logits (len(tokens), n_vocab) for every position, from an empty context.

        llama-cpp-python's eval() loop, n_batch tokens per decode, with each batch's logits copied straight
        into the result: eval() would first copy them into its own n_ctx × n_vocab `scores` and we would copy
        those again (two extra 700 × 262k float32 arrays, 1.5 GB, for 700 tokens of Gemma 3)."""
        llm, n = self.llm, len(tokens)
        if n > llm.n_ctx():
            raise Lora2GGUFError(f"{n} tokens exceed the context of {llm.n_ctx()}")
        llm.reset()
        self._routing.clear()
        llm._ctx.kv_cache_seq_rm(-1, 0, -1)
        out = np.empty((n, self.n_vocab), np.float32)
        for i in range(0, n, llm.n_batch):
            batch = list(tokens[i: i + llm.n_batch])
            llm._batch.set_batch(batch=batch, n_past=i, logits_all=True)
            llm._ctx.decode(llm._batch)
            out[i: i + len(batch)] = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(len(batch), out.shape[1]))
            llm.input_ids[i: i + len(batch)] = batch  # what greedy() reuses the KV cache of
            llm.n_tokens = i + len(batch)
        return out

    def greedy(self, tokens: Sequence[int], n: int) -> list[int]:
        """Greedy continuation of n tokens (argmax of llama.cpp's logits), stopping at end of generation."""
        out: list[int] = []
        tokens = list(tokens)
        # Reuse the KV cache of the longest prefix shared with the last evaluation (chat prompts share
        # their system prompt), as llama-cpp-python's generate() does; at least one token is evaluated.
        cached = self.llm.input_ids[: self.llm.n_tokens]
        p = 0
        while p < min(len(cached), len(tokens) - 1) and cached[p] == tokens[p]:
            p += 1
        self.llm.n_tokens = p  # eval() drops the cache past n_tokens
        self.llm.eval(tokens[p:])
        for _ in range(n):
            nxt = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            if self._lc.llama_vocab_is_eog(self._lc.llama_model_get_vocab(self.llm.model), nxt):
                break
            out.append(nxt)
            self.llm.eval([nxt])
        return out

    def greedy_many(self, prompts: Sequence[Sequence[int]], n: int) -> list[list[int]]:
        """greedy() of several prompts at once: each prompt one sequence of the shared KV cache, the prefix
        all prompts share (a chat template's system prompt: 24 of the demo's ~37 tokens) decoded once and
        shared by every sequence, then every step one decode of all sequences still running (a 135M model
        decodes 24 tokens in about the time of one). n_seq prompts at a time, whose Σ (len(prompt) + n)
        must fit n_ctx."""
        if len(prompts) > self.n_seq:
            return [a for i in range(0, len(prompts), self.n_seq) for a in self.greedy_many(prompts[i: i + self.n_seq], n)]
        if sum(len(p) + n for p in prompts) > self.llm.n_ctx():
            raise Lora2GGUFError(f"{len(prompts)} prompts of {n} more tokens exceed the context of {self.llm.n_ctx()}")
        lc, llm = self._lc, self.llm
        vocab, mem = lc.llama_model_get_vocab(llm.model), lc.llama_get_memory(llm.ctx)
        outs: list[list[int]] = [[] for _ in prompts]
        self._clear()
        shared = len(os.path.commonprefix([list(p) for p in prompts])) if len(prompts) > 1 else 0
        shared = min(shared, min(len(p) for p in prompts) - 1)  # each prompt decodes its last token itself
        if shared > 0:
            self._decode_tokens([(0, i, t, False) for i, t in enumerate(prompts[0][:shared])])
            for s in range(1, len(prompts)):
                lc.llama_memory_seq_cp(mem, 0, s, -1, -1)
        # (sequence, position, token, wants logits): the prompts' own tokens, then one per running sequence
        todo = [(s, i, t, i == len(p) - 1) for s, p in enumerate(prompts) for i, t in enumerate(p) if i >= shared]
        while todo and n > 0:
            nxt = self._decode_tokens(todo)
            todo = []
            for s, tok in nxt.items():
                if lc.llama_vocab_is_eog(vocab, tok):
                    continue
                outs[s].append(tok)
                if len(outs[s]) < n:
                    todo.append((s, len(prompts[s]) + len(outs[s]) - 1, tok, True))
        self._clear()
        return outs

    def _decode_tokens(self, todo: list[tuple[int, int, int, bool]]) -> dict[int, int]:
        """Decode (sequence, position, token, wants logits) entries, n_batch at a time → sequence → the argmax
        of its logits, for the entries that want them."""
        lc, llm, nxt = self._lc, self.llm, {}
        for start in range(0, len(todo), llm.n_batch):
            part, b = todo[start: start + llm.n_batch], llm._batch.batch
            b.n_tokens = len(part)
            for j, (s, pos, tok, want) in enumerate(part):
                b.token[j], b.pos[j], b.seq_id[j][0], b.n_seq_id[j], b.logits[j] = tok, pos, s, 1, want
            llm._ctx.decode(llm._batch)
            for j, (s, _, _, want) in enumerate(part):
                if want:
                    nxt[s] = int(np.argmax(np.ctypeslib.as_array(lc.llama_get_logits_ith(llm.ctx, j),
                                                                 shape=(self.n_vocab,))))
        return nxt

    def _clear(self) -> None:
        """An empty KV cache, every sequence (llama-cpp-python's own calls clear sequence 0 only)."""
        self.llm.reset()
        self._lc.llama_memory_clear(self._lc.llama_get_memory(self.llm.ctx), True)

    def close(self) -> None:
        for ptr in self._adapters.values():
            self._lc.llama_adapter_lora_free(ptr)
        self._adapters.clear()
        self.llm.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class LogitStream:
    """llama.cpp's logits for one token sequence, `rows` positions at a time, from a context of its own on a
    loaded model (LlamaRuntime.stream), with its own adapters and its own record of expert choices: a view
    that is read as it is made, never held whole (parity.lockstep). The same settings as LlamaRuntime.logits
    (the model's context parameters, F32 KV cache), only a smaller batch: llama.cpp keeps about two
    rows × n_vocab float32 buffers per context. Each block is a read-only view of llama.cpp's output,
    valid until the next one is made.

    Blocks are cut from decodes of `decode_rows` positions (a multiple of rows): each decode reads every
    weight once, so fewer, larger decodes are faster where the weights outweigh the activations (Gemma 3
    F32, 700 positions: 4.5 s at 16 per decode, 3.1 s at 32, 2.5 s at 64), and llama.cpp's buffers grow
    with them."""

    def __init__(self, rt: LlamaRuntime, tokens: Sequence[int], adapters: Sequence[tuple[str | os.PathLike, float]],
                 rows: int, decode_rows: int | None = None):
        decode_rows = decode_rows or rows
        if decode_rows % rows:
            raise ValueError(f"decode_rows {decode_rows} is not a multiple of rows {rows}")
        self.tokens, self.rows, self.decode_rows, self.n_vocab = list(tokens), rows, decode_rows, rt.n_vocab
        self._routing: dict[int, list[np.ndarray]] = {}
        self._cb = _routing_callback(self._routing) if rt._cb is not None else None
        params = llama_cpp.llama_context_params.from_buffer_copy(rt.llm.context_params)
        params.n_ctx = max(len(self.tokens), decode_rows)
        params.n_batch = params.n_ubatch = decode_rows
        params.n_seq_max, params.kv_unified = 1, False
        params.cb_eval = self._cb if self._cb is not None else type(params.cb_eval)()
        with _quiet_stderr(not rt.verbose):
            try:
                self.ctx = llama_cpp._internals.LlamaContext(model=rt.llm._model, params=params, verbose=rt.verbose)
            except ValueError as e:
                raise Lora2GGUFError(f"{rt.path}: llama.cpp could not make a context ({e})") from None
        self.batch = llama_cpp._internals.LlamaBatch(n_tokens=decode_rows, embd=0, n_seq_max=1, verbose=rt.verbose)
        rt._set_adapters_on(self.ctx.ctx, adapters)

    def __iter__(self):
        for i in range(0, len(self.tokens), self.decode_rows):
            part = self.tokens[i: i + self.decode_rows]
            self.batch.set_batch(batch=part, n_past=i, logits_all=True)
            self.ctx.decode(self.batch)
            decoded = np.ctypeslib.as_array(self.ctx.get_logits(), shape=(len(part), self.n_vocab))
            decoded.flags.writeable = False
            for j in range(0, len(part), self.rows):
                yield decoded[j: j + self.rows]

    @property
    def routing(self) -> dict[int, np.ndarray]:
        """Layer → (tokens, n_expert_used) expert ids llama.cpp chose (a mixture of experts, moe_routing)."""
        return {layer: np.concatenate(parts) for layer, parts in self._routing.items()}

    def close(self) -> None:
        self.batch.close()
        self.ctx.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
