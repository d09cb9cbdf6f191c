"""Dequantize rows of GGUF quant blocks with torch ops, bit-identical to gguf-py's numpy reference.

For training against the quantized base llama.cpp serves (issue 17): the frozen weights stay in their GGUF
encoding, memory-mapped, and a layer dequantizes rows of them in every forward and backward, on CPU or CUDA.
So the code is plain torch (the same ops run on either device) and vectorized over all blocks at once. On
the CPU, quant blocks into float32 go to ggml's own conversion instead (fileio.ggml_dequantize: the same bits,
faster, on torch's threads); the torch ops below serve CUDA, other dtypes, and a missing library.

Each type mirrors `dequantize_blocks` in gguf/quants.py (gguf-py 0.19.0) operation by operation: f16 scales
widened to f32, then the same products and sums in the same order, each a separate torch op (mul_ then
sub_, as gguf-py rounds each). The float32 result equals `gguf.quants.dequantize` bit for bit, and equals
llama.cpp's own dequantizer too (tests/weights/test_dequantize.py); the one exception is an F16 tensor's signaling
NaNs, which torch's conversion (like x86's F16C) returns quieted, where numpy keeps them signaling. A fused multiply-add could not change it: every
product here is exact in float32 (11-bit f16 scale × at most 6-bit sub-scale × at most 6-bit value, under
24 bits), so only the final add rounds, once either way; the bits are the same on CPU and CUDA.

Speed and memory: per-block scale factors are computed once for the whole tensor, with ops that run along
all blocks; the values are then filled chunk by chunk: unpacked in uint8/int8, converted into the float32
output by copy_, scaled there in place. On CPU a chunk stays in cache through its passes. The peak beyond
the result is the factors (at most 1/8 of a float32 result) and one chunk's temporaries; for a bf16/f16
result, one chunk-sized float32 scratch buffer.
"""

from __future__ import annotations

import math

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from lora2gguf.errors import Lora2GGUFError
from lora2gguf.fileio.ggml_dequantize import to_float

Q = GGMLQuantizationType
# Values dequantized per step: on CPU a float32 chunk small enough to stay in cache (L2/L3) across passes,
# large enough that the per-op overhead (~10 µs × ~25 ops) stays small; on an accelerator just a bound on
# the float32 scratch memory when the result is bf16/f16.
CPU_CHUNK = 1 << 20
DEVICE_CHUNK = 1 << 26


def _f16(field: torch.Tensor) -> torch.Tensor:
    """(blocks, 2) bytes of a little-endian f16 field → (blocks,) float32. Assembled from the two byte
    columns (1-D strided ops, fast), so no alignment is needed wherever the block sits. The high byte is
    sign-extended and scaled by 256: the int16 bit pattern without an overflowing shift."""
    lo, hi = field[:, 0], field[:, 1]
    bits = hi.view(torch.int8).to(torch.int16).mul_(256).bitwise_or_(lo.to(torch.int16))
    return bits.view(torch.float16).float()


def _unpack(x: torch.Tensor, shifts, mask: int) -> torch.Tensor:
    """(..., n) uint8 → (..., len(shifts), n): (x >> s) & mask for each shift s, the way gguf-py lays out
    packed sub-byte values (a field of each of n bytes, then the next field up). Built with stack, whose
    copies are runs of n bytes, rather than shifts into strided slices (a loop per run, ~2× slower)."""
    x = x.contiguous()  # the packed bytes in one run: the ops below then loop once, not per block
    return torch.stack([(x >> s if s else x) & mask for s in shifts], dim=-2)


def _u32(field: torch.Tensor) -> torch.Tensor:
    """(blocks, 4) bytes of a little-endian uint32 → (blocks,) int32 with the same bits (Q5_0/Q5_1's qh)."""
    w = field[:, 0].to(torch.int32)
    for k in (1, 2, 3):
        w.bitwise_or_(field[:, k].to(torch.int32).bitwise_left_shift_(8 * k))
    return w


def _columns(b: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Bytes start:stop of every block, transposed and contiguous: (stop - start, blocks). Ops on a field of
    the per-block header then run along all blocks; on the (blocks, few bytes) view they would loop over a
    handful of bytes at a time, many times slower."""
    return b[:, start:stop].T.contiguous()


def _scale_min_k4(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 bytes of 6-bit scales and mins, as (12, blocks) → (8, blocks) each, as floats (gguf-py's
    Q4_K.get_scale_min)."""
    d, m, md = s[0:4], s[4:8], s[8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)])
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)])
    return sc.float(), mn.float()


def _per_block(scale: torch.Tensor) -> torch.Tensor:
    """(k, blocks) per-sub-block factors → (blocks, k, 1), to broadcast over each sub-block's values."""
    return scale.T.unsqueeze(-1)


# Each type: a function of all blocks (n_blocks, type_size) uint8 that computes the per-block scale factors
# once (small: a few per block) and returns fill(i, j, out), which writes blocks i:j into `out`, float32
# (j - i, block_size): the integer values unpacked in uint8/int8, converted into `out` by copy_, scaled
# there in place. The comment by each last line is gguf-py's expression.

def _q4_0(b):
    d = _f16(b[:, 0:2])[:, None]

    def fill(i, j, out):
        q = _unpack(b[i:j, 2:18], (0, 4), 0x0F).view(-1, 32).view(torch.int8).sub_(8)
        out.copy_(q).mul_(d[i:j])  # d * q
    return fill


def _q4_1(b):
    d, m = _f16(b[:, 0:2])[:, None], _f16(b[:, 2:4])[:, None]

    def fill(i, j, out):
        out.copy_(_unpack(b[i:j, 4:20], (0, 4), 0x0F).view(-1, 32)).mul_(d[i:j]).add_(m[i:j])  # (d * q) + m
    return fill


def _q5(qh: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    """Q5_0/Q5_1's 5-bit values 0..31: low nibbles from qs, the fifth bit of value e is bit e of qh (int32,
    one per block). One broadcast shift by 0..31 (rather than 8 shifts of 4-byte rows, which loop per block)."""
    bits = (qh[:, None] >> torch.arange(32, dtype=torch.int32, device=qh.device)) & 1
    q = _unpack(qs, (0, 4), 0x0F).view(-1, 32)
    return q.bitwise_or_(bits.to(torch.uint8).bitwise_left_shift_(4))


def _q5_0(b):
    d, qh = _f16(b[:, 0:2])[:, None], _u32(b[:, 2:6])

    def fill(i, j, out):
        q = _q5(qh[i:j], b[i:j, 6:22]).view(torch.int8).sub_(16)
        out.copy_(q).mul_(d[i:j])  # d * q
    return fill


def _q5_1(b):
    d, m, qh = _f16(b[:, 0:2])[:, None], _f16(b[:, 2:4])[:, None], _u32(b[:, 4:8])

    def fill(i, j, out):
        out.copy_(_q5(qh[i:j], b[i:j, 8:24])).mul_(d[i:j]).add_(m[i:j])  # (d * q) + m
    return fill


def _q8_0(b):
    d = _f16(b[:, 0:2])[:, None]

    def fill(i, j, out):
        out.copy_(b[i:j, 2:34].view(torch.int8)).mul_(d[i:j])  # x * d
    return fill


def _q2_k(b):
    scales = _columns(b, 0, 16)
    d, dmin = _f16(b[:, 80:82]), _f16(b[:, 82:84])
    dl = _per_block(d * (scales & 0x0F).float())  # per 16 values
    ml = _per_block(dmin * (scales >> 4).float())

    def fill(i, j, out):
        q = _unpack(b[i:j, 16:80].unflatten(-1, (2, 32)), (0, 2, 4, 6), 0x03).view(-1, 16, 16)
        out.view(-1, 16, 16).copy_(q).mul_(dl[i:j]).sub_(ml[i:j])  # dl * q - ml
    return fill


def _q3_k(b):
    scales = _columns(b, 96, 108)
    d = _f16(b[:, 108:110])
    lo = torch.cat([(scales[0:8] >> s) & 0x0F for s in (0, 4)])  # (16, blocks): low nibbles, then high
    hi = torch.cat([(scales[8:12] >> s) & 0x03 for s in (0, 2, 4, 6)])
    sc = lo.bitwise_or_(hi.bitwise_left_shift_(4)).view(torch.int8).sub_(32)
    dl = _per_block(d * sc.float())  # d * scales, per 16 values

    def fill(i, j, out):
        ql = _unpack(b[i:j, 32:96].unflatten(-1, (2, 32)), (0, 2, 4, 6), 0x03).view(-1, 16, 16)
        qh = _unpack(b[i:j, 0:32], range(8), 0x01).view(-1, 16, 16)
        # gguf-py: ql - ((qh ^ 1) << 2): 4 is subtracted where the hmask bit is 0; the same as (ql | qh << 2) - 4
        q = ql.bitwise_or_(qh.bitwise_left_shift_(2)).view(torch.int8).sub_(4)
        out.view(-1, 16, 16).copy_(q).mul_(dl[i:j])  # dl * q
    return fill


def _k4_factors(b):
    """Q4_K/Q5_K: d * scale and dmin * min per 32 values, (blocks, 8, 1) each."""
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, mn = _scale_min_k4(_columns(b, 4, 16))
    return _per_block(d * sc), _per_block(dmin * mn)


def _q4_k(b):
    dl, dm = _k4_factors(b)

    def fill(i, j, out):
        q = _unpack(b[i:j, 16:144].unflatten(-1, (4, 32)), (0, 4), 0x0F).view(-1, 8, 32)
        out.view(-1, 8, 32).copy_(q).mul_(dl[i:j]).sub_(dm[i:j])  # d * q - dm
    return fill


def _q5_k(b):
    dl, dm = _k4_factors(b)

    def fill(i, j, out):
        ql = _unpack(b[i:j, 48:176].unflatten(-1, (4, 32)), (0, 4), 0x0F).view(-1, 8, 32)
        q = ql.bitwise_or_(_unpack(b[i:j, 16:48], range(8), 0x01).bitwise_left_shift_(4))
        out.view(-1, 8, 32).copy_(q).mul_(dl[i:j]).sub_(dm[i:j])  # d * q - dm
    return fill


def _q6_k(b):
    d = _f16(b[:, 208:210])
    dl = _per_block(d * _columns(b, 192, 208).view(torch.int8).float())  # per 16 values

    def fill(i, j, out):
        lo = _unpack(b[i:j, 0:128].unflatten(-1, (2, 64)), (0, 4), 0x0F).view(-1, 256)
        hi = _unpack(b[i:j, 128:192].unflatten(-1, (2, 32)), (0, 2, 4, 6), 0x03).view(-1, 256)
        q = lo.bitwise_or_(hi.bitwise_left_shift_(4)).view(torch.int8).sub_(32)
        out.view(-1, 16, 16).copy_(q.view(-1, 16, 16)).mul_(dl[i:j])  # d * q
    return fill


_BLOCKS = {Q.Q4_0: _q4_0, Q.Q4_1: _q4_1, Q.Q5_0: _q5_0, Q.Q5_1: _q5_1, Q.Q8_0: _q8_0,
           Q.Q2_K: _q2_k, Q.Q3_K: _q3_k, Q.Q4_K: _q4_k, Q.Q5_K: _q5_k, Q.Q6_K: _q6_k}
_FLOATS = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}
SUPPORTED: frozenset[GGMLQuantizationType] = frozenset(_FLOATS) | frozenset(_BLOCKS)


def _as(raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The bytes of whole rows reinterpreted as `dtype` (a view where torch allows one, else a copy)."""
    try:
        return raw.view(dtype)
    except RuntimeError:  # rows not contiguous, or an offset not a multiple of the element size
        return raw.clone(memory_format=torch.contiguous_format).view(dtype)


def dequantize(raw: torch.Tensor, qtype, n_cols: int, dtype: torch.dtype = torch.float32,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows of GGUF blocks → values. `raw` is uint8 (..., row_bytes), row_bytes = n_cols // block_size *
    type_size; the result is (..., n_cols) in `dtype`, computed in float32 (bit-identical to gguf-py's
    dequantize) then cast. `raw` is only read (it may be a read-only mmap); the result never shares its
    memory. `out`: a contiguous buffer of as many `dtype` values to write into (reused by the caller).
    Quant blocks into float32 on the CPU are converted by ggml itself (fileio.ggml_dequantize, the same
    bits), on torch's threads: faster than the ops below, most of all into a reused buffer."""
    try:
        qtype = GGMLQuantizationType(qtype)
    except ValueError:
        raise Lora2GGUFError(f"unknown GGML tensor type {qtype!r}; the file is damaged or newer than "
                             "this gguf package") from None
    if qtype not in SUPPORTED:
        raise Lora2GGUFError(
            f"{qtype.name} tensors cannot be dequantized on the fly (supported: "
            f"{', '.join(t.name for t in sorted(SUPPORTED))}); requantize the base with llama-quantize to "
            "a supported type (e.g. Q4_K_M), or use --base-weights resident")
    block, type_size = GGML_QUANT_SIZES[qtype]
    if raw.dtype != torch.uint8 or raw.dim() == 0:
        raise ValueError(f"raw must be a uint8 tensor of rows of bytes, got {raw.dtype} {tuple(raw.shape)}")
    if n_cols % block or raw.shape[-1] != n_cols // block * type_size:
        raise ValueError(f"{qtype.name}: {n_cols} columns need {n_cols // block * type_size} bytes per row "
                         f"(whole blocks of {block}), got {raw.shape[-1]}")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point type, got {dtype}")
    lead = raw.shape[:-1]
    n_blocks = math.prod(lead) * (n_cols // block)
    if out is not None and (out.dtype != dtype or out.numel() != n_blocks * block or not out.is_contiguous()
                            or out.device != raw.device):
        raise ValueError(f"out must be {n_blocks * block} contiguous {dtype} values on {raw.device}")

    if qtype in _FLOATS:
        x = _as(raw, _FLOATS[qtype])
        if out is not None:
            return out.view(*lead, n_cols).copy_(x)
        if x.dtype == dtype:
            return x.clone(memory_format=torch.contiguous_format)  # never alias raw: it may be read-only
        return x.to(dtype)  # f16/bf16 → f32 is exact; torch's f16 ↔ bf16 casts round via f32, as f32 then cast

    out = torch.empty((n_blocks, block), dtype=dtype, device=raw.device) if out is None else out.view(n_blocks, block)
    if raw.device.type == "cpu" and dtype == torch.float32 and n_blocks:
        done = to_float(raw.reshape(-1).numpy(), qtype, out.view(-1).numpy(), threads=torch.get_num_threads())
        if done is not None:
            return out.view(*lead, n_cols)
    blocks = raw.reshape(n_blocks, type_size)  # a view wherever raw's strides allow
    # In chunks of blocks: on CPU the float32 chunk stays in cache through its 2-3 passes (convert, scale,
    # offset); for another dtype the float32 values live only in one reused chunk-sized scratch buffer.
    step = max(1, (CPU_CHUNK if raw.device.type == "cpu" else DEVICE_CHUNK) // block)
    scratch = None
    if dtype != torch.float32:
        scratch = torch.empty((min(step, n_blocks), block), dtype=torch.float32, device=raw.device)
    fill = _BLOCKS[qtype](blocks)
    for i in range(0, n_blocks, step):
        j = min(i + step, n_blocks)
        if scratch is None:
            fill(i, j, out[i:j])
        else:
            fill(i, j, scratch[:j - i])
            out[i:j].copy_(scratch[:j - i])
    return out.view(*lead, n_cols)
