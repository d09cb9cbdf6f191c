# TEMPORARY shim (not committed): helper's torch implementation replaces it.
import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize as _dq

SUPPORTED = frozenset([T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K])


def dequantize(raw, qtype, n_cols, dtype=torch.float32):
    a = raw.cpu().numpy()
    out = _dq(a, qtype).astype(np.float32).reshape(*raw.shape[:-1], n_cols)
    return torch.from_numpy(out).to(device=raw.device, dtype=dtype)
