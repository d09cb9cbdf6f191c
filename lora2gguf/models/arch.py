"""What every architecture module provides, with the behaviour of a llama-style decoder as the default.

An architecture (models/<arch>.py) is one `Arch` subclass instance. It owns:
- its hyperparameters, read from GGUF metadata (`spec_from_gguf`) and from HF config.json (`spec_from_hf`),
  and written back as a config.json (`hf_config`);
- its tensors: HF names and shapes (`layer_shapes`), GGUF names (gguf-py's TensorNameMap, the table
  llama.cpp's own converter uses) and the value transforms between the two layouts (`to_gguf`/`from_gguf`:
  llama's q/k row permutation, Gemma's 1+w norms; `rows_to_gguf` is the part that applies to LoRA B);
- its LoRA targets (`layer_linears`) and where llama.cpp can take a bias (`bias_slots`);
- its PyTorch forward (`build_layer`, `embed_scale`, `final_softcap`: composed from models/layers.py)
  and its training form (`fused_training`: whether training may use the fused layer of training.fused).
Everything here is numpy-free and torch-free except the forward, which imports torch when called: reading
a GGUF header, convert and merge never import torch.
"""

from __future__ import annotations

from functools import lru_cache

from gguf import MODEL_ARCH, get_tensor_name_map

from lora2gguf.errors import Lora2GGUFError
from lora2gguf.models.spec import ModelSpec, check_dims

VERBS = ("convert", "merge", "verify", "train", "inspect", "analyze", "export", "extract", "resize", "combine",
         "modelfile")
ATTN_PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
MLP_PROJ = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def hf_rope(c: dict, params: dict, where) -> tuple[float, str, float]:
    """(theta, scaling type, factor) from a config.json: `rope_theta` / `rope_scaling` (transformers 4) or a
    flat `rope_parameters` dict (transformers 5, `params`)."""
    rs = c.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else {})
    rtype = rs.get("rope_type", rs.get("type", "none")) if rs else "none"
    if rtype in ("default",):
        rtype = "none"
    if rtype not in ("none", "linear"):
        raise Lora2GGUFError(f"{where}: rope scaling {rtype!r} is not supported (none, linear)")
    theta = c.get("rope_theta", params.get("rope_theta", 10000.0))
    return float(theta), rtype, float(rs.get("factor", 1.0)) if rs else 1.0


@lru_cache(maxsize=64)
def _name_map(model_arch: MODEL_ARCH, n_layer: int):
    return get_tensor_name_map(model_arch, n_layer)


class Arch:
    name: str  # the module's name in the registry: the GGUF general.architecture unless gguf_arch says otherwise
    model_arch: MODEL_ARCH
    hf_architectures: tuple[str, ...]  # config.json "architectures" entries
    hf_model_types: tuple[str, ...]  # config.json "model_type"
    spec_class: type[ModelSpec] = ModelSpec
    attn_proj: tuple[str, ...] = ATTN_PROJ
    mlp_proj: tuple[str, ...] = MLP_PROJ
    expert_proj: tuple[str, ...] = ()  # stacked per-expert weights (E, out, in), by HF module path
    # transformers' 3-D expert parameters (what PEFT's target_parameters names), in the order the experts module
    # registers them, → the expert_proj stacks their rows split into, in order (a fused gate_up: gate rows first)
    expert_params: dict[str, tuple[str, ...]] = {}
    expert_modules: dict[str, str] = {}  # per-expert module on disk ({E}: the expert) → its expert_proj stack
    module_aliases: dict[str, str] = {}  # a whole module's name on disk → its in-memory (transformers 5) name
    layer_norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")
    qkv_bias: bool = False  # HF's default for attention_bias
    qk_norm: bool = False
    norm_offset: float = 0.0  # RMSNorm multiplies by offset + w (Gemma: 1)
    fused_training: bool = False  # training.fused.TrainingLayer may compute this arch's layer
    can_untie: bool = True  # llama.cpp loads an output.weight beside tied embeddings (merge may untie)
    verbs: tuple[str, ...] = VERBS  # the verbs that handle this architecture

    @property
    def gguf_arch(self) -> str:
        """GGUF general.architecture (and metadata key prefix) of this arch's files (Mixtral: llama)."""
        return self.name

    def require(self, verb: str, where) -> None:
        """Refuse, in one line, a verb that does not handle this architecture yet."""
        if verb not in self.verbs:
            raise Lora2GGUFError(f"{where}: `lora2gguf {verb}` does not handle {self.name} models yet; "
                                 f"{' and '.join(self.verbs)} do")

    # -- LoRA targets ------------------------------------------------------------------------------------
    @property
    def layer_linears(self) -> tuple[str, ...]:
        """The linear projections inside each decoder layer, by HF module path: what LoRA targets."""
        return self.attn_proj + self.mlp_proj

    @property
    def bias_slots(self) -> tuple[str, ...]:
        """Projections whose bias llama.cpp's graph adds (merge can write a new one there)."""
        return self.layer_linears

    # -- hyperparameters ---------------------------------------------------------------------------------
    def spec_from_gguf(self, f, where) -> ModelSpec:
        """The spec from a GGUF file's metadata (f: fileio.gguf_read.GGUFFile); extra fields: `gguf_extra`."""
        arch = self.gguf_arch

        def need(key, kind=int):
            v = f.number(f"{arch}.{key}", None, kind)
            if v is None:
                raise Lora2GGUFError(f"{where}: metadata {arch}.{key} is missing")
            return v

        n_embd, n_head = need("embedding_length"), need("attention.head_count")
        check_dims({f"{arch}.embedding_length": n_embd, f"{arch}.attention.head_count": n_head}, where)
        n_head_kv = f.number(f"{arch}.attention.head_count_kv", n_head, int)
        head_dim = f.number(f"{arch}.attention.key_length", n_embd // n_head, int)
        if "token_embd.weight" not in f.tensors:
            raise Lora2GGUFError(f"{where}: tensor token_embd.weight is missing")
        n_vocab = f.number(f"{arch}.vocab_size", f.tensors["token_embd.weight"].shape[0], int)
        scaling = f.string(f"{arch}.rope.scaling.type", "none")
        if scaling not in ("none", "linear"):
            raise Lora2GGUFError(f"{where}: rope scaling {scaling!r} is not supported (none, linear)")
        n_layer, n_ff = need("block_count"), need("feed_forward_length")
        rope_dim = f.number(f"{arch}.rope.dimension_count", head_dim, int)
        check_dims({f"{arch}.block_count": n_layer, f"{arch}.feed_forward_length": n_ff,
                    f"{arch}.attention.head_count_kv": n_head_kv, f"{arch}.attention.key_length": head_dim,
                    f"{arch}.vocab_size": n_vocab, f"{arch}.rope.dimension_count": rope_dim}, where)
        common = dict(
            arch=arch, n_layer=n_layer, n_embd=n_embd, n_ff=n_ff, n_head=n_head, n_head_kv=n_head_kv,
            head_dim=head_dim, n_vocab=n_vocab, n_ctx_train=f.number(f"{arch}.context_length", 2048, int),
            rope_theta=f.number(f"{arch}.rope.freq_base", 10000.0), rope_scaling_type=scaling,
            rope_scaling_factor=f.number(f"{arch}.rope.scaling.factor", 1.0),
            norm_eps=need("attention.layer_norm_rms_epsilon", float),
            tied_embeddings="output.weight" not in f.tensors, qk_norm="blk.0.attn_q_norm.weight" in f.tensors,
            attn_bias="blk.0.attn_q.bias" in f.tensors, rope_dim=rope_dim,
            name=str(f.get("general.name", "") or ""))
        return self.spec_class(**common, **self.gguf_extra(f, common, where))

    def gguf_extra(self, f, common: dict, where) -> dict:
        """This arch's own spec fields from GGUF metadata (spec_class's fields beyond ModelSpec's)."""
        return {}

    def spec_from_hf(self, c: dict, where) -> ModelSpec:
        """The spec from a transformers config.json (a dict); extra fields: `hf_extra`."""
        n_embd, n_head = int(c["hidden_size"]), int(c["num_attention_heads"])
        rope_theta, rtype, factor = hf_rope(c, c.get("rope_parameters") or {}, where)
        check_dims({k: int(c[k]) for k in ("hidden_size", "num_attention_heads", "num_hidden_layers",
                                             "intermediate_size", "vocab_size")}, where)
        head_dim = int(c.get("head_dim") or n_embd // n_head)
        common = dict(
            arch=self.gguf_arch, n_layer=int(c["num_hidden_layers"]), n_embd=n_embd, n_ff=int(c["intermediate_size"]),
            n_head=n_head, n_head_kv=int(c.get("num_key_value_heads") or n_head), head_dim=head_dim,
            n_vocab=int(c["vocab_size"]), n_ctx_train=int(c.get("max_position_embeddings", 2048)),
            rope_theta=rope_theta, rope_scaling_type=rtype, rope_scaling_factor=factor,
            norm_eps=float(c.get("rms_norm_eps", 1e-6)), tied_embeddings=bool(c.get("tie_word_embeddings", False)),
            qk_norm=self.qk_norm, attn_bias=bool(c.get("attention_bias", self.qkv_bias)),
            rope_dim=int(head_dim * float(c.get("partial_rotary_factor", 1.0))),
            name=c.get("_name_or_path", "") or "")
        return self.spec_class(**common, **self.hf_extra(c, common, where))

    def hf_extra(self, c: dict, common: dict, where) -> dict:
        return {}

    def hf_config(self, spec: ModelSpec) -> dict:
        """A transformers config.json for this spec (tests and HF directories made from a GGUF)."""
        cfg = {"architectures": [self.hf_architectures[0]], "model_type": self.hf_model_types[0],
               "vocab_size": spec.n_vocab, "hidden_size": spec.n_embd, "intermediate_size": spec.n_ff,
               "num_hidden_layers": spec.n_layer, "num_attention_heads": spec.n_head,
               "num_key_value_heads": spec.n_head_kv, "head_dim": spec.head_dim,
               "max_position_embeddings": spec.n_ctx_train, "rms_norm_eps": spec.norm_eps,
               "rope_theta": spec.rope_theta, "hidden_act": "silu", "tie_word_embeddings": spec.tied_embeddings,
               "attention_bias": spec.attn_bias, "torch_dtype": "float32"}
        if spec.rope_scaling_type == "linear":
            cfg["rope_scaling"] = {"rope_type": "linear", "factor": spec.rope_scaling_factor}
        return cfg

    # -- tensors -----------------------------------------------------------------------------------------
    def layer_shapes(self, spec: ModelSpec) -> dict[str, tuple[int, ...]]:
        """HF tensor name inside a layer → shape (HF layout), in a stable order (the fingerprint hashes it)."""
        n_q, n_kv, e, hd = spec.n_head * spec.head_dim, spec.n_head_kv * spec.head_dim, spec.n_embd, spec.head_dim
        out = {n + ".weight": (e,) for n in self.layer_norms}
        out.update(self.linear_shapes(spec))
        out.update(self.expert_shapes(spec))
        if spec.attn_bias:
            out.update({"self_attn.q_proj.bias": (n_q,), "self_attn.k_proj.bias": (n_kv,),
                        "self_attn.v_proj.bias": (n_kv,)})
        if spec.qk_norm:
            out.update({"self_attn.q_norm.weight": (hd,), "self_attn.k_norm.weight": (hd,)})
        return out

    def linear_shapes(self, spec: ModelSpec) -> dict[str, tuple[int, int]]:
        """HF weight name of each layer_linears projection → (out, in)."""
        n_q, n_kv, e, f = spec.n_head * spec.head_dim, spec.n_head_kv * spec.head_dim, spec.n_embd, spec.n_ff
        return {"self_attn.q_proj.weight": (n_q, e), "self_attn.k_proj.weight": (n_kv, e),
                "self_attn.v_proj.weight": (n_kv, e), "self_attn.o_proj.weight": (e, n_q),
                "mlp.gate_proj.weight": (f, e), "mlp.up_proj.weight": (f, e), "mlp.down_proj.weight": (e, f)}

    def expert_shapes(self, spec: ModelSpec) -> dict[str, tuple[int, int, int]]:
        """HF weight name of each expert_proj stack → (n_expert, out, in); none for a dense arch."""
        return {}

    def hf_file_parts(self, spec: ModelSpec, hf_name: str) -> list[str] | None:
        """The tensors of an HF checkpoint that, stacked on a new first axis, make this tensor when the
        checkpoint stores it in parts (per-expert weights: expert_modules); None when it is stored whole."""
        head, _, rest = hf_name.partition(".layers.")
        i, _, mod = rest.partition(".")
        disk = next((k for k, v in self.expert_modules.items() if f"{v}.weight" == mod), None)
        if disk is None:  # layers.N.mlp.experts.gate_proj.weight → layers.N.mlp.experts.E.gate_proj.weight
            return None
        return [f"{head}.layers.{i}.{disk.format(E=e)}.weight" for e in range(spec.n_expert)]

    def hf_file_alias(self, spec: ModelSpec, hf_name: str) -> str | None:
        """The name a checkpoint stores this whole tensor under when it is not the in-memory one (Mixtral's
        router: block_sparse_moe.gate on disk, mlp.gate in transformers 5: module_aliases); None when it is the same."""
        for disk, mem in self.module_aliases.items():
            if f".{mem}." in hf_name:
                return hf_name.replace(f".{mem}.", f".{disk}.")
        return None

    def expected_shapes(self, spec: ModelSpec, tied: bool | None = None) -> dict[str, tuple[int, ...]]:
        """Every HF tensor name a model of this spec has → its shape (HF layout), in a stable order."""
        tied = spec.tied_embeddings if tied is None else tied
        out = {"model.embed_tokens.weight": (spec.n_vocab, spec.n_embd)}
        per = self.layer_shapes(spec)
        for i in range(spec.n_layer):
            out.update({f"model.layers.{i}.{k}": v for k, v in per.items()})
        out["model.norm.weight"] = (spec.n_embd,)
        if not tied:
            out["lm_head.weight"] = (spec.n_vocab, spec.n_embd)
        return out

    def lora_weight_names(self, n_layer: int) -> list[str]:
        """HF weight names a LoRA can change in an n_layer model of this arch: the embedding, the head and
        every layer_linears projection (what a GGUF LoRA's tensors are looked up against)."""
        names = ["model.embed_tokens.weight", "lm_head.weight"]
        for i in range(n_layer):
            names += [f"model.layers.{i}.{m}.weight" for m in self.layer_linears + self.expert_proj]
        known = _name_map(self.model_arch, n_layer)  # gemma2 has no separate output tensor in llama.cpp
        return [n for n in names if known.get_name(n, try_suffixes=(".weight",)) is not None]

    def target_shapes(self, spec: ModelSpec) -> dict[str, tuple[int, int]]:
        """LoRA-targetable module inside a layer (e.g. self_attn.q_proj) → ΔW shape (out, in), or
        (n_expert, out, in) for a stack of experts."""
        shapes = self.linear_shapes(spec) | self.expert_shapes(spec)
        return {k[:-len(".weight")]: v for k, v in shapes.items()}

    def gguf_name(self, n_layer: int, hf_name: str) -> str:
        """GGUF tensor name for an HF tensor name (model.layers.0.self_attn.q_proj.weight → blk.0.attn_q.weight)."""
        name = _name_map(self.model_arch, n_layer).get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise Lora2GGUFError(f"tensor {hf_name} has no GGUF name for arch {self.name}")
        return name

    def rows_to_gguf(self, spec: ModelSpec, hf_name: str, x):
        """HF row order → llama.cpp's, for any array whose first axis is this tensor's output rows (a weight,
        a bias, LoRA B, or row indices). Identity unless the arch stores rows permuted."""
        return x

    def rows_from_gguf(self, spec: ModelSpec, hf_name: str, x):
        return x

    def permutes_rows(self, spec: ModelSpec, hf_name: str) -> bool:
        return False

    def stored_as_hf(self, spec: ModelSpec, hf_name: str) -> bool:
        """Whether the GGUF holds this tensor exactly as HF does (training then maps it in place)."""
        return not self.permutes_rows(spec, hf_name)

    def to_gguf(self, spec: ModelSpec, hf_name: str, t):
        """A whole HF tensor (numpy) as the GGUF file stores it."""
        return self.rows_to_gguf(spec, hf_name, t)

    def from_gguf(self, spec: ModelSpec, hf_name: str, t):
        """A whole GGUF tensor (float32 numpy) in HF layout and values."""
        return self.rows_from_gguf(spec, hf_name, t)

    # -- PyTorch forward (torch, imported when called) ---------------------------------------------------
    def build_layer(self, spec: ModelSpec, i: int):
        """Decoder layer i as a torch module whose submodule names are the HF ones."""
        from lora2gguf.models.layers import MLP, Attention, DecoderLayer, RMSNorm

        return DecoderLayer(
            norms={"input_layernorm": RMSNorm(spec.n_embd, spec.norm_eps),
                   "post_attention_layernorm": RMSNorm(spec.n_embd, spec.norm_eps)},
            attn_in="input_layernorm", mlp_in="post_attention_layernorm",
            self_attn=Attention(spec), mlp=MLP(spec.n_embd, spec.n_ff, "silu"))

    def embed_scale(self, spec: ModelSpec) -> float:
        return 1.0

    def final_softcap(self, spec: ModelSpec) -> float:
        return 0.0
