"""Dequantize rows of GGUF quant blocks with torch ops, bit-identical to gguf-py's numpy reference.

For training against the quantized base llama.cpp serves (issue 17): the frozen weights stay in their GGUF
encoding, memory-mapped, and a layer dequantizes rows of them in every forward and backward, on CPU or CUDA.
So the code is plain torch (the same ops run on either device) and vectorized over all blocks at once.

Each type mirrors `dequantize_blocks` in gguf/quants.py (gguf-py 0.19.0) operation by operation: f16 scales
widened to f32, then the same products and differences in the same order, each rounded to f32 on its own.
The float32 result therefore equals `gguf.quants.dequantize` bit for bit (tests/test_dequantize.py checks
it). Each float operation is its own torch op (mul_ then sub_, never addcmul): a kernel that does both can
be compiled into a fused multiply-add, which rounds once where gguf-py rounds twice.

Memory: the integer unpacking is done in uint8/int8, converted to float32 once into the output buffer,
and the scales are applied in place, so the peak is the output plus about 2 bytes per element.
"""

from __future__ import annotations

import math

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from .errors import Lora2GGUFError

Q = GGMLQuantizationType
QK_K = 256  # elements in a K-quant super-block


def _f16(field: torch.Tensor) -> torch.Tensor:
    """(..., 2) bytes of a little-endian f16 field → (..., 1) float32. The copy makes the 2-byte view legal
    wherever the block sits (odd offsets, gathered rows); it is 2 bytes per block."""
    return field.contiguous().view(torch.float16).float()


def _unpack(x: torch.Tensor, shifts, mask: int) -> torch.Tensor:
    """(..., n) uint8 → (..., len(shifts), n): (x >> s) & mask for each shift s, the way gguf-py lays out
    packed sub-byte values (all low fields of a run of bytes, then the next field up)."""
    out = x.new_empty((*x.shape[:-1], len(shifts), x.shape[-1]))
    for i, s in enumerate(shifts):
        torch.bitwise_right_shift(x, s, out=out[..., i, :])
    return out.bitwise_and_(mask)


def _bits32(qh: torch.Tensor) -> torch.Tensor:
    """(..., 4) bytes of a little-endian uint32 → (..., 32) of its bits, bit 0 first (Q5_0/Q5_1's qh)."""
    return _unpack(qh, range(8), 1).transpose(-1, -2).reshape(*qh.shape[:-1], 32)


def _scale_min_k4(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 bytes of 6-bit scales and mins → (..., 8) each (gguf-py's Q4_K.get_scale_min)."""
    s = s.reshape(*s.shape[:-1], 3, 4)
    d, m, md = s[..., 0, :], s[..., 1, :], s[..., 2, :]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


# Each takes blocks (rows, blocks per row, type_size) uint8 and returns float32 (rows, blocks per row, ...)
# holding block_size values per block in order. The comment by each line is gguf-py's expression.

def _q4_0(b):
    d = _f16(b[..., 0:2])
    q = _unpack(b[..., 2:18], (0, 4), 0x0F).flatten(-2).view(torch.int8).sub_(8)
    return q.float().mul_(d)  # d * q


def _q4_1(b):
    d, m = _f16(b[..., 0:2]), _f16(b[..., 2:4])
    q = _unpack(b[..., 4:20], (0, 4), 0x0F).flatten(-2)
    return q.float().mul_(d).add_(m)  # (d * q) + m


def _q5(qh: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    """Q5_0/Q5_1's 5-bit values 0..31: low nibbles from qs, the fifth bit from qh."""
    q = _unpack(qs, (0, 4), 0x0F).flatten(-2)
    return q.bitwise_or_(_bits32(qh).bitwise_left_shift_(4))


def _q5_0(b):
    d = _f16(b[..., 0:2])
    q = _q5(b[..., 2:6], b[..., 6:22]).view(torch.int8).sub_(16)
    return q.float().mul_(d)  # d * q


def _q5_1(b):
    d, m = _f16(b[..., 0:2]), _f16(b[..., 2:4])
    q = _q5(b[..., 4:8], b[..., 8:24])
    return q.float().mul_(d).add_(m)  # (d * q) + m


def _q8_0(b):
    d = _f16(b[..., 0:2])
    return b[..., 2:34].view(torch.int8).float().mul_(d)  # x * d


def _q2_k(b):
    scales, qs = b[..., 0:16], b[..., 16:80]
    d, dmin = _f16(b[..., 80:82]), _f16(b[..., 82:84])
    dl = (d * (scales & 0x0F).float()).unsqueeze(-1)  # per 16 values
    ml = (dmin * (scales >> 4).float()).unsqueeze(-1)
    q = _unpack(qs.unflatten(-1, (2, 32)), (0, 2, 4, 6), 0x03).reshape(*b.shape[:-1], 16, 16)
    return q.float().mul_(dl).sub_(ml)  # dl * q - ml


def _q3_k(b):
    hmask, qs, scales = b[..., 0:32], b[..., 32:96], b[..., 96:108]
    d = _f16(b[..., 108:110])
    lo = _unpack(scales[..., 0:8], (0, 4), 0x0F).flatten(-2)
    hi = _unpack(scales[..., 8:12], (0, 2, 4, 6), 0x03).flatten(-2)
    sc = lo.bitwise_or_(hi.bitwise_left_shift_(4)).view(torch.int8).sub_(32)
    dl = (d * sc.float()).unsqueeze(-1)  # d * scales, per 16 values
    ql = _unpack(qs.unflatten(-1, (2, 32)), (0, 2, 4, 6), 0x03).reshape(*b.shape[:-1], 16, 16)
    qh = _unpack(hmask, range(8), 0x01).reshape(*b.shape[:-1], 16, 16)
    # gguf-py: ql - ((qh ^ 1) << 2), i.e. 4 is subtracted where the hmask bit is 0; the same as (ql | qh << 2) - 4
    q = ql.bitwise_or_(qh.bitwise_left_shift_(2)).view(torch.int8).sub_(4)
    return q.float().mul_(dl)  # dl * q


def _q4_k(b):
    d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])
    sc, mn = _scale_min_k4(b[..., 4:16])
    dl = (d * sc.float()).unsqueeze(-1)  # per 32 values
    dm = (dmin * mn.float()).unsqueeze(-1)
    q = _unpack(b[..., 16:144].unflatten(-1, (4, 32)), (0, 4), 0x0F).flatten(-3, -2)
    return q.float().mul_(dl).sub_(dm)  # d * q - dm


def _q5_k(b):
    d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])
    sc, mn = _scale_min_k4(b[..., 4:16])
    dl = (d * sc.float()).unsqueeze(-1)
    dm = (dmin * mn.float()).unsqueeze(-1)
    ql = _unpack(b[..., 48:176].unflatten(-1, (4, 32)), (0, 4), 0x0F).flatten(-3, -2)
    qh = _unpack(b[..., 16:48], range(8), 0x01)
    q = ql.bitwise_or_(qh.bitwise_left_shift_(4))
    return q.float().mul_(dl).sub_(dm)  # d * q - dm


def _q6_k(b):
    ql, qh, scales = b[..., 0:128], b[..., 128:192], b[..., 192:208]
    d = _f16(b[..., 208:210])
    dl = (d * scales.view(torch.int8).float()).unsqueeze(-1)  # per 16 values
    lo = _unpack(ql.unflatten(-1, (2, 64)), (0, 4), 0x0F).flatten(-3)
    hi = _unpack(qh.unflatten(-1, (2, 32)), (0, 2, 4, 6), 0x03).flatten(-3)
    q = lo.bitwise_or_(hi.bitwise_left_shift_(4)).view(torch.int8).sub_(32)
    return q.float().unflatten(-1, (16, 16)).mul_(dl)  # d * q


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


def dequantize(raw: torch.Tensor, qtype, n_cols: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows of GGUF blocks → values. `raw` is uint8 (..., row_bytes), row_bytes = n_cols // block_size *
    type_size; the result is (..., n_cols) in `dtype`, computed in float32 (bit-identical to gguf-py's
    dequantize) then cast. `raw` is only read (it may be a read-only mmap); the result never shares its
    memory."""
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
    lead = raw.shape[:-1]

    if qtype in _FLOATS:
        x = _as(raw, _FLOATS[qtype])
        if x.dtype == dtype:
            return x.clone(memory_format=torch.contiguous_format)  # never alias raw: it may be read-only
        if x.dtype == torch.bfloat16 or dtype == torch.float32:
            return x.to(dtype)  # bf16 → f32 and f16 → f32 are exact
        return x.float().to(dtype)  # as gguf-py: widen to f32 first, then round

    # (rows, blocks per row, type_size): a view of raw wherever its strides allow
    blocks = raw.reshape(math.prod(lead), n_cols // block, type_size)
    out = _BLOCKS[qtype](blocks).reshape(*lead, n_cols)
    return out if dtype == torch.float32 else out.to(dtype)
