"""The base model, read from a GGUF file or a Hugging Face directory into one typed spec and one
tensor interface in HF layout (names and row order), so everything above it is format-agnostic."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
from safetensors import safe_open

from lora2gguf import models
from lora2gguf.errors import Lora2GGUFError
from lora2gguf.fileio.gguf_read import GGUFFile
from lora2gguf.fileio.tensors import safetensors_header
from lora2gguf.models.spec import ModelSpec


def check_shapes(spec: ModelSpec, shapes: dict[str, tuple[int, ...]], where, name_of=lambda h: h,
                 source: str = "the model's metadata") -> None:
    """Every tensor the spec implies exists with the shape it implies (shapes: HF name → HF-layout shape)."""
    for hf, want in spec.arch_module.expected_shapes(spec).items():
        got = shapes.get(hf)
        if got is None:
            raise Lora2GGUFError(f"{where}: tensor {name_of(hf)} is missing; the file is not a complete "
                                 f"{spec.arch_module.name} model")
        if tuple(got) != want:
            raise Lora2GGUFError(f"{where}: tensor {name_of(hf)} has shape {tuple(got)}, {source} implies "
                                 f"{want}; the file is corrupt or its description does not match it")


class GGUFBase:
    """A GGUF base model. Tensors come back float32 in HF layout (q/k rows un-permuted)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.file = GGUFFile(self.path)
        try:
            self.spec = self._read_spec()
            self._gguf_to_hf = {self.gguf_name(h): h for h in self.hf_names()}
            missing = [g for g in self._gguf_to_hf if g not in self.file.tensors]
            if missing:
                raise Lora2GGUFError(f"{self.path}: tensor {missing[0]} is missing "
                                     f"({len(missing)} expected tensors missing); the file is not a complete "
                                     f"{self.spec.arch_module.name} model")
            check_shapes(self.spec, {h: self.shape(h) for h in self._gguf_to_hf.values()}, self.path, self.gguf_name)
        except Exception:
            self.file.close()
            raise

    def _read_spec(self) -> ModelSpec:
        f = self.file
        if f.get("general.type", "model") == "adapter":
            raise Lora2GGUFError(f"{self.path}: this is a LoRA adapter, not a base model; pass the model it was "
                                 "made for as --base")
        arch = f.string("general.architecture")
        if arch is None:
            raise Lora2GGUFError(f"{self.path}: no general.architecture in the GGUF metadata")
        spec = models.for_gguf(f, str(self.path)).spec_from_gguf(f, self.path)
        return spec if spec.name else dataclasses.replace(spec, name=self.path.stem)

    def hf_names(self) -> list[str]:
        return list(self.spec.arch_module.expected_shapes(self.spec))

    def gguf_name(self, hf_name: str) -> str:
        return self.spec.arch_module.gguf_name(self.spec.n_layer, hf_name)

    def shape(self, hf_name: str) -> tuple[int, ...]:
        """The tensor's shape in HF layout. A one-row matrix may be stored as a vector (llama-quantize writes
        qwen2moe's (1, n_embd) ffn_gate_inp_shexp so; ggml's trailing ne of 1 is implied): its HF shape is (1, n)."""
        s = tuple(self.file.tensors[self.gguf_name(hf_name)].shape)
        want = self.spec.arch_module.layer_shapes(self.spec).get(hf_name.split(".", 3)[-1]) if len(s) == 1 else None
        return (1,) + s if want is not None and len(want) == 2 and want[0] == 1 else s

    def tensor(self, hf_name: str) -> np.ndarray:
        """float32 tensor in HF layout and values (q/k rows un-permuted, Gemma's norms as HF stores them)."""
        t = self.file.tensor(self.gguf_name(hf_name))
        return self.spec.arch_module.from_gguf(self.spec, hf_name, t.reshape(self.shape(hf_name)))

    def rope_freqs(self) -> np.ndarray | None:
        """llama3-style per-dimension rope frequency factors, when the file carries them."""
        return self.file.tensor("rope_freqs.weight") if "rope_freqs.weight" in self.file.tensors else None

    def close(self) -> None:
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class HFBase:
    """A Hugging Face model directory: config.json + model.safetensors (or sharded with an index)."""
    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        self.path = path.parent if path.name == "config.json" else path
        cfg_path = self.path / "config.json"
        try:
            self.config = json.loads(cfg_path.read_text())
        except FileNotFoundError:
            raise Lora2GGUFError(f"{cfg_path}: not found; a Hugging Face model directory needs config.json") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise Lora2GGUFError(f"{cfg_path}: invalid JSON ({e})") from None
        except OSError as e:
            raise Lora2GGUFError(f"{cfg_path}: cannot read it ({e})") from None
        if not isinstance(self.config, dict):
            raise Lora2GGUFError(f"{cfg_path}: expected a JSON object")
        self.spec = self._read_spec()
        self._files = self._index()

    def _read_spec(self) -> ModelSpec:
        c = self.config
        name = (c.get("architectures") or [c.get("model_type", "?")])[0]
        arch = models.find(name, str(self.path / "config.json"))
        try:
            spec = arch.spec_from_hf(c, self.path / "config.json")
        except KeyError as e:
            raise Lora2GGUFError(f"{self.path}/config.json: key {e.args[0]} is missing") from None
        except (TypeError, ValueError, AttributeError) as e:
            raise Lora2GGUFError(f"{self.path}/config.json: a value has the wrong type ({e})") from None
        return spec if spec.name else dataclasses.replace(spec, name=self.path.name)

    def _index(self) -> dict[str, Path]:
        """HF tensor name → the safetensors file holding it. Every file is validated by the safetensors
        library, and every tensor the config implies must be there with its shape."""
        idx = self.path / "model.safetensors.index.json"
        if idx.is_file():
            try:
                weight_map = json.loads(idx.read_text())["weight_map"]
                files = {k: self.path / v for k, v in weight_map.items()}
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise Lora2GGUFError(f"{idx}: not a valid safetensors index ({type(e).__name__}: {e})") from None
        else:
            single = self.path / "model.safetensors"
            if not single.is_file():
                raise Lora2GGUFError(f"{self.path}: no model.safetensors or model.safetensors.index.json")
            files = None
        shapes, located, wanted = {}, {}, set(self.hf_names())
        for f in sorted(set(files.values())) if files is not None else [single]:
            if not f.is_file():
                raise Lora2GGUFError(f"{f}: no such file (listed in {idx.name})")
            for k, info in safetensors_header(f, float_only=False).items():
                if k != "__metadata__" and (files is None or files.get(k) == f):
                    shapes[k], located[k] = tuple(info["shape"]), f
                    if k in wanted and info["dtype"] not in ("F32", "F16", "BF16", "F64"):
                        raise Lora2GGUFError(f"{f}: tensor {k} has dtype {info['dtype']}; expected a floating-point "
                                             "type (F32, F16, BF16, F64)")
        self._parts = {}  # a tensor the checkpoint stores in parts (one per expert) → the parts' names
        self._alias = {}  # a tensor the checkpoint stores whole under another name → that name
        arch = self.spec.arch_module
        for name in sorted(wanted - set(shapes)):
            alias = arch.hf_file_alias(self.spec, name)
            if alias in shapes:
                shapes[name], self._alias[name] = shapes[alias], alias
                continue
            parts = arch.hf_file_parts(self.spec, name)
            if parts and parts[0] in shapes:
                missing = [p for p in parts if p not in shapes]
                if missing:
                    raise Lora2GGUFError(f"{self.path}: tensor {missing[0]} is missing ({len(missing)} of the "
                                         f"{len(parts)} parts of {name}); the checkpoint is incomplete")
                odd = next((p for p in parts if shapes[p] != shapes[parts[0]]), None)
                if odd is not None:
                    raise Lora2GGUFError(f"{self.path}: tensor {odd} has shape {shapes[odd]} but {parts[0]} has "
                                         f"{shapes[parts[0]]}; the checkpoint is corrupt")
                shapes[name] = (len(parts),) + shapes[parts[0]]
                self._parts[name] = parts
        check_shapes(self.spec, shapes, self.path, source="config.json")
        self._shapes = {h: shapes[h] for h in wanted}
        return located

    def hf_names(self) -> list[str]:
        return list(self.spec.arch_module.expected_shapes(self.spec))

    def gguf_name(self, hf_name: str) -> str:
        return self.spec.arch_module.gguf_name(self.spec.n_layer, hf_name)

    def file_name(self, hf_name: str) -> str:
        """The name the checkpoint stores this whole tensor under (Mixtral's router: block_sparse_moe.gate)."""
        return self._alias.get(hf_name, hf_name)

    def shape(self, hf_name: str) -> tuple[int, ...]:
        """The tensor's shape in HF layout (a stack of per-expert tensors: (n_expert, ...))."""
        return self._shapes[hf_name]

    def tensor(self, hf_name: str) -> np.ndarray:
        if hf_name in self._parts:
            return np.stack([self.tensor(p) for p in self._parts[hf_name]])
        hf_name = self.file_name(hf_name)
        if hf_name not in self._files:
            raise Lora2GGUFError(f"{self.path}: tensor {hf_name} not found")
        # framework="pt" reads bf16 too (numpy has no bfloat16); memory-mapped by safetensors.
        with safe_open(self._files[hf_name], framework="pt") as f:
            return f.get_tensor(hf_name).float().numpy()

    def rope_freqs(self) -> np.ndarray | None:
        return None

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_base(path: str | os.PathLike) -> GGUFBase | HFBase:
    """Open a base model: a .gguf file, an HF directory, or an HF config.json."""
    p = Path(path)
    if p.is_dir() or p.name == "config.json":
        return HFBase(p)
    if not p.exists():
        raise Lora2GGUFError(f"{p}: no such file or directory")
    return GGUFBase(p)
