"""Tensor and config files that are not GGUF: safetensors (validated by the safetensors library, read as
float32 numpy without torch), torch pickles (weights_only: tensors, never code) and JSON config objects."""

from __future__ import annotations

import json
import re
import struct
import warnings
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

from lora2gguf.errors import Lora2GGUFError


def read_json_object(cfg_path: Path, missing: str) -> dict:
    """A JSON object from a config file; `missing` is the error when the file is not there."""
    if not cfg_path.is_file():
        raise Lora2GGUFError(missing)
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise Lora2GGUFError(f"{cfg_path}: invalid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise Lora2GGUFError(f"{cfg_path}: expected a JSON object")
    return cfg


_ST_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2"}


def safetensors_header(path: Path, float_only: bool = True) -> dict:
    """The header of a safetensors file ({name: {dtype, shape, data_offsets}}, plus __metadata__), after the
    safetensors library itself has validated the file: header length and JSON, known dtypes, every
    tensor's offsets matching its shape and dtype, no overlap, the data section covered exactly (so a
    truncated file is caught here). float_only: any tensor that is not F32/F16/BF16/F64 is an error."""
    try:
        with safe_open(str(path), framework="numpy"):
            pass
        with open(path, "rb") as fh:  # the library checked it: read the offsets it validated
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
    except (SafetensorError, OSError, ValueError, struct.error) as e:  # JSONDecodeError is a ValueError
        why = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise Lora2GGUFError(f"{path}: not a readable safetensors file ({why}); the file is truncated or "
                             "corrupt, save or download it again") from None
    if float_only:
        for key, info in header.items():
            if key != "__metadata__" and info["dtype"] not in _ST_DTYPES:
                raise Lora2GGUFError(f"{path}: tensor {key} has dtype {info['dtype']}; expected a floating-point "
                                     f"type ({', '.join(_ST_DTYPES)})")
    return header


def read_safetensors_f32(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as float32 numpy, without torch (importing torch costs ~3 s,
    more than the whole convert). The safetensors library validates the file (safetensors_header); the
    bytes are then viewed by hand because safetensors' numpy loader cannot produce bf16."""
    header = safetensors_header(path)
    try:
        with open(path, "rb") as fh:
            fh.seek(8 + struct.unpack("<Q", fh.read(8))[0])
            data = np.frombuffer(fh.read(), dtype=np.uint8)
    except OSError as e:
        raise Lora2GGUFError(f"{path}: cannot read it ({e})") from None
    out = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        lo, hi = info["data_offsets"]
        arr = data[lo:hi].view(_ST_DTYPES[info["dtype"]]).reshape(tuple(info["shape"]))
        # bf16 is the top half of a float32
        out[key] = (arr.astype(np.uint32) << 16).view(np.float32) if info["dtype"] == "BF16" else arr.astype(np.float32)
    return out


def read_torch_pickle(binf: Path, writer: str) -> dict[str, np.ndarray]:
    """A torch pickle of a flat {name: tensor} dict (PEFT's adapter_model.bin, torchtune's adapter_model.pt),
    loaded with weights_only: tensors and plain containers only, never code."""
    import torch

    try:  # weights_only: tensors and plain containers only, never arbitrary objects
        with warnings.catch_warnings():  # torch warns about pickle protocols it may not support
            warnings.simplefilter("ignore")
            sd = torch.load(binf, map_location="cpu", weights_only=True)
    except Exception as e:  # whatever an untrusted file makes the unpickler raise, it is the file's fault
        text = str(e) or type(e).__name__
        lines = [x.strip() for x in text.splitlines() if x.strip()]
        # torch's refusal: boilerplate, then what the pickle asked for (a GLOBAL it blocks, an opcode)
        what = next((x for x in lines[1:] if re.search(r"unsupported", x, re.I) and "file an issue" not in x), None)
        why = f"it holds more than tensors: {what}" if what else lines[0]
        why = re.split(r"(?<=[a-z])\. ", why)[0].rstrip(".")[:160]
        raise Lora2GGUFError(f"{binf}: refused to load ({why}); only plain tensors are loaded from a pickle "
                             "(torch.load weights_only), never code: save the adapter as safetensors") from None
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise Lora2GGUFError(f"{binf}: expected a dict of tensors (what {writer} writes)")
    for k, v in sd.items():
        if not v.is_floating_point():
            raise Lora2GGUFError(f"{binf}: tensor {k} has dtype {str(v.dtype).removeprefix('torch.')}; "
                                 "expected a floating-point type")
    return {k: v.float().numpy() for k, v in sd.items()}
