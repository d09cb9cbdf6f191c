"""The base model, read from a GGUF file or a Hugging Face directory into one typed spec and one
tensor interface in HF layout (names and row order), so everything above it is format-agnostic."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from . import archs
from .errors import Lora2GGUFError
from .gguf_file import GGUFFile


@dataclass(frozen=True)
class ModelSpec:
    arch: str
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_vocab: int
    n_ctx_train: int
    rope_theta: float
    rope_scaling_type: str  # "none" or "linear"
    rope_scaling_factor: float
    norm_eps: float
    tied_embeddings: bool
    qk_norm: bool
    attn_bias: bool
    name: str = ""

    @property
    def facts(self) -> archs.ArchFacts:
        return archs.ARCHS[self.arch]

    def to_dict(self) -> dict:
        return asdict(self)


def expected_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """HF tensor name → the shape (HF layout) a model of this spec has: what the metadata/config promises
    and everything downstream (merge, the reference model, LoRA shape checks) relies on."""
    n_q, n_kv, e, hd = spec.n_head * spec.head_dim, spec.n_head_kv * spec.head_dim, spec.n_embd, spec.head_dim
    per = {"input_layernorm.weight": (e,), "post_attention_layernorm.weight": (e,),
           "self_attn.q_proj.weight": (n_q, e), "self_attn.k_proj.weight": (n_kv, e),
           "self_attn.v_proj.weight": (n_kv, e), "self_attn.o_proj.weight": (e, n_q),
           "mlp.gate_proj.weight": (spec.n_ff, e), "mlp.up_proj.weight": (spec.n_ff, e),
           "mlp.down_proj.weight": (e, spec.n_ff), "self_attn.q_proj.bias": (n_q,),
           "self_attn.k_proj.bias": (n_kv,), "self_attn.v_proj.bias": (n_kv,),
           "self_attn.q_norm.weight": (hd,), "self_attn.k_norm.weight": (hd,)}
    out = {}
    for name in archs.hf_tensor_names(spec.arch, spec.n_layer, spec.tied_embeddings):
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            out[name] = (spec.n_vocab, e)
        elif name == "model.norm.weight":
            out[name] = (e,)
        else:
            out[name] = per[name.split(".", 3)[3]]
    return out


def check_dims(spec_fields: dict[str, int], where) -> None:
    """Sizes from metadata/config.json must be positive (a zero head count would divide by zero later)."""
    for key, v in spec_fields.items():
        if v < 1:
            raise Lora2GGUFError(f"{where}: {key} is {v}; it must be positive (the model description is corrupt)")


def check_shapes(spec: ModelSpec, shapes: dict[str, tuple[int, ...]], where, name_of=lambda h: h,
                 source: str = "the model's metadata") -> None:
    """Every tensor the spec implies exists with the shape it implies (shapes: HF name → HF-layout shape)."""
    for hf, want in expected_shapes(spec).items():
        got = shapes.get(hf)
        if got is None:
            raise Lora2GGUFError(f"{where}: tensor {name_of(hf)} is missing; the file is not a complete "
                                 f"{spec.arch} model")
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
                                     f"{self.spec.arch} model")
            check_shapes(self.spec, {h: self.file.tensors[g].shape for g, h in self._gguf_to_hf.items()},
                         self.path, self.gguf_name)
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
        facts = archs.arch_facts(arch, str(self.path))

        def need(key, kind=int):
            v = f.number(f"{arch}.{key}", None, kind)
            if v is None:
                raise Lora2GGUFError(f"{self.path}: metadata {arch}.{key} is missing")
            return v

        n_embd, n_head = need("embedding_length"), need("attention.head_count")
        check_dims({f"{arch}.embedding_length": n_embd, f"{arch}.attention.head_count": n_head}, self.path)
        n_head_kv = f.number(f"{arch}.attention.head_count_kv", n_head, int)
        head_dim = f.number(f"{arch}.attention.key_length", n_embd // n_head, int)
        if "token_embd.weight" not in f.tensors:
            raise Lora2GGUFError(f"{self.path}: tensor token_embd.weight is missing")
        n_vocab = f.number(f"{arch}.vocab_size", f.tensors["token_embd.weight"].shape[0], int)
        scaling = f.string(f"{arch}.rope.scaling.type", "none")
        if scaling not in ("none", "linear"):
            raise Lora2GGUFError(f"{self.path}: rope scaling {scaling!r} is not supported (none, linear)")
        n_layer, n_ff = need("block_count"), need("feed_forward_length")
        check_dims({f"{arch}.block_count": n_layer, f"{arch}.feed_forward_length": n_ff,
                    f"{arch}.attention.head_count_kv": n_head_kv, f"{arch}.attention.key_length": head_dim,
                    f"{arch}.vocab_size": n_vocab}, self.path)
        return ModelSpec(
            arch=facts.name, n_layer=n_layer, n_embd=n_embd,
            n_ff=n_ff, n_head=n_head, n_head_kv=n_head_kv, head_dim=head_dim,
            n_vocab=n_vocab, n_ctx_train=f.number(f"{arch}.context_length", 2048, int),
            rope_theta=f.number(f"{arch}.rope.freq_base", 10000.0),
            rope_scaling_type=scaling, rope_scaling_factor=f.number(f"{arch}.rope.scaling.factor", 1.0),
            norm_eps=need("attention.layer_norm_rms_epsilon", float),
            tied_embeddings="output.weight" not in f.tensors,
            qk_norm="blk.0.attn_q_norm.weight" in f.tensors,
            attn_bias="blk.0.attn_q.bias" in f.tensors,
            name=str(f.get("general.name", self.path.stem)),
        )

    def hf_names(self) -> list[str]:
        s = self.spec
        return archs.hf_tensor_names(s.arch, s.n_layer, s.tied_embeddings)

    def gguf_name(self, hf_name: str) -> str:
        return archs.gguf_name(self.spec.arch, self.spec.n_layer, hf_name)

    def tensor(self, hf_name: str) -> np.ndarray:
        """float32 tensor in HF layout."""
        w = self.file.tensor(self.gguf_name(hf_name))
        heads = archs.qk_heads(hf_name, self.spec.n_head, self.spec.n_head_kv)
        if heads and self.spec.facts.permute_qk:
            w = archs.unpermute_rows(w, heads)
        return w

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
        facts = archs.arch_facts(name, str(self.path / "config.json"))
        try:
            n_embd, n_head = int(c["hidden_size"]), int(c["num_attention_heads"])
            rs = c.get("rope_scaling") or {}
            rtype = rs.get("rope_type", rs.get("type", "none")) if rs else "none"
            if rtype in ("default",):
                rtype = "none"
            if rtype not in ("none", "linear"):
                raise Lora2GGUFError(f"{self.path}/config.json: rope scaling {rtype!r} is not supported (none, linear)")
            rope_theta = c.get("rope_theta", (c.get("rope_parameters") or {}).get("rope_theta", 10000.0))
            check_dims({k: int(c[k]) for k in ("hidden_size", "num_attention_heads", "num_hidden_layers",
                                                 "intermediate_size", "vocab_size")}, self.path / "config.json")
            return ModelSpec(
                arch=facts.name, n_layer=int(c["num_hidden_layers"]), n_embd=n_embd,
                n_ff=int(c["intermediate_size"]), n_head=n_head,
                n_head_kv=int(c.get("num_key_value_heads") or n_head),
                head_dim=int(c.get("head_dim") or n_embd // n_head), n_vocab=int(c["vocab_size"]),
                n_ctx_train=int(c.get("max_position_embeddings", 2048)), rope_theta=float(rope_theta),
                rope_scaling_type=rtype, rope_scaling_factor=float(rs.get("factor", 1.0)) if rs else 1.0,
                norm_eps=float(c.get("rms_norm_eps", 1e-6)),
                tied_embeddings=bool(c.get("tie_word_embeddings", False)),
                qk_norm=facts.qk_norm, attn_bias=bool(c.get("attention_bias", facts.qkv_bias)),
                name=c.get("_name_or_path", "") or self.path.name,
            )
        except KeyError as e:
            raise Lora2GGUFError(f"{self.path}/config.json: key {e.args[0]} is missing") from None
        except (TypeError, ValueError, AttributeError) as e:
            raise Lora2GGUFError(f"{self.path}/config.json: a value has the wrong type ({e})") from None

    def _index(self) -> dict[str, Path]:
        """HF tensor name → the safetensors file holding it. Every file is validated by the safetensors
        library, and every tensor the config implies must be there with its shape."""
        from .adapter import safetensors_header

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
        check_shapes(self.spec, shapes, self.path, source="config.json")
        return located

    def hf_names(self) -> list[str]:
        s = self.spec
        return archs.hf_tensor_names(s.arch, s.n_layer, s.tied_embeddings)

    def gguf_name(self, hf_name: str) -> str:
        return archs.gguf_name(self.spec.arch, self.spec.n_layer, hf_name)

    def tensor(self, hf_name: str) -> np.ndarray:
        from safetensors import safe_open

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
