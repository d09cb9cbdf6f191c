"""gemma3 (Gemma 3 text models, e.g. google/gemma-3-270m): Google's conventions on a GQA decoder.

- RMSNorm multiplies by 1 + w, and checkpoints store w: llama.cpp's converter writes 1 + w into the GGUF
  (every *norm.weight, the per-head q/k norms too), so to_gguf/from_gguf add and remove the 1;
- embeddings are scaled by sqrt(n_embd); the head is tied to them;
- a norm before and after attention and before and after the MLP; GELU (tanh) gated MLP;
- per-head RMSNorm on q and k; attention scale 1/sqrt(query_pre_attn_scalar) (llama.cpp: 1/sqrt(head_dim),
  1/sqrt(n_embd/n_head) for the 27B);
- sliding-window attention on five of every six layers (layer i is global when (i + 1) % 6 == 0), with rope
  base 10 000 there (`rope.freq_base_swa`) and `rope.freq_base` (and any linear scaling) on global layers.
gemma2 follows these conventions with other choices (models/gemma2.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from gguf import MODEL_ARCH

from lora2gguf.errors import Lora2GGUFError
from lora2gguf.models.arch import Arch
from lora2gguf.models.spec import ModelSpec


@dataclass(frozen=True)
class GemmaSpec(ModelSpec):
    sliding_window: int = 0  # tokens a local layer sees (0: no sliding window)
    swa_layers: tuple[int, ...] = ()  # the local (sliding-window) layers
    rope_theta_local: float = 10000.0
    attn_scale: float = 0.0  # multiplies q·k
    attn_softcap: float = 0.0  # tanh soft-cap of the attention scores (0: none)
    final_softcap: float = 0.0  # of the logits


class Gemma3(Arch):
    name = "gemma3"
    model_arch = MODEL_ARCH.GEMMA3
    hf_architectures = ("Gemma3ForCausalLM",)
    hf_model_types = ("gemma3_text",)
    spec_class = GemmaSpec
    layer_norms = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                   "post_feedforward_layernorm")
    qk_norm = True
    norm_offset = 1.0
    bias_slots = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")  # llama.cpp loads bq/bk/bv only
    # llama.cpp's defaults for metadata a file may lack (src/models/gemma3.cpp, llama-hparams.h)
    swa_pattern = 6  # layer il is local when il % 6 < 5
    window_default = 0  # no sliding_window key: no sliding window
    attn_softcap_default = final_softcap_default = 0.0
    local_rope_scaled = False  # local layers: rope_freq_scale_train_swa = 1, no linear scaling

    def local_rope(self, common: dict) -> float:
        return 10000.0  # rope_freq_base_train_swa when the file has no rope.freq_base_swa

    # -- hyperparameters ---------------------------------------------------------------------------------
    def swa_from_pattern(self, n_layer: int, pattern: int) -> tuple[int, ...]:
        return tuple(i for i in range(n_layer) if pattern == 0 or i % pattern < pattern - 1)

    def gguf_extra(self, f, common: dict, where) -> dict:
        a, n_layer = self.name, common["n_layer"]
        window = f.number(f"{a}.attention.sliding_window", self.window_default, int)
        pat = f.get(f"{a}.attention.sliding_window_pattern")
        if pat is None or isinstance(pat, (int, float)):
            swa = self.swa_from_pattern(n_layer, int(self.swa_pattern if pat is None else pat))
        else:  # an array: one flag per layer
            flags = list(np.asarray(pat).reshape(-1))
            if len(flags) < n_layer:
                raise Lora2GGUFError(f"{where}: metadata {a}.attention.sliding_window_pattern has {len(flags)} "
                                     f"entries for {n_layer} layers; the file is corrupt")
            swa = tuple(i for i in range(n_layer) if flags[i])
        head_scale = (common["n_embd"] // common["n_head"]) if n_layer == 62 else common["head_dim"]  # as llama.cpp
        return dict(sliding_window=window, swa_layers=swa if window > 0 else (),
                    rope_theta_local=f.number(f"{a}.rope.freq_base_swa", self.local_rope(common)),
                    attn_scale=float(head_scale) ** -0.5,
                    attn_softcap=f.number(f"{a}.attn_logit_softcapping", self.attn_softcap_default),
                    final_softcap=f.number(f"{a}.final_logit_softcapping", self.final_softcap_default))

    def spec_from_hf(self, c: dict, where) -> ModelSpec:
        params = c.get("rope_parameters") or {}
        if "full_attention" in params:  # transformers 5: one rope per layer type
            c = dict(c, rope_parameters=params["full_attention"])
        return super().spec_from_hf(c, where)

    def hf_extra(self, c: dict, common: dict, where) -> dict:
        n_layer, window = common["n_layer"], int(c.get("sliding_window") or 0)
        types = c.get("layer_types")
        if types:
            swa = tuple(i for i, t in enumerate(types[:n_layer]) if t == "sliding_attention")
        else:
            swa = self.swa_from_pattern(n_layer, int(c.get("sliding_window_pattern", self.swa_pattern)))
        params = c.get("rope_parameters") or {}
        local = (params.get("sliding_attention") or {}).get("rope_theta", c.get("rope_local_base_freq"))
        local = float(local) if local is not None else self.local_rope(common)
        return dict(sliding_window=window, swa_layers=swa if window > 0 else (), rope_theta_local=local,
                    attn_scale=float(c.get("query_pre_attn_scalar") or common["head_dim"]) ** -0.5,
                    attn_softcap=float(c.get("attn_logit_softcapping") or 0.0),
                    final_softcap=float(c.get("final_logit_softcapping") or 0.0))

    def hf_config(self, spec: GemmaSpec) -> dict:
        scalar = spec.attn_scale ** -2  # transformers' config wants an int where it is one (256, not 256.0)
        scalar = round(scalar) if abs(scalar - round(scalar)) < 1e-6 else scalar
        cfg = super().hf_config(spec)
        del cfg["hidden_act"], cfg["rope_theta"]
        scaling = cfg.pop("rope_scaling", None)
        glob = {"rope_type": "default", "rope_theta": spec.rope_theta} if scaling is None else {
            **scaling, "rope_theta": spec.rope_theta}
        local = {"rope_type": "default", "rope_theta": spec.rope_theta_local}
        cfg.update(hidden_activation="gelu_pytorch_tanh", sliding_window=spec.sliding_window or None,
                   layer_types=["sliding_attention" if i in spec.swa_layers else "full_attention"
                                for i in range(spec.n_layer)],
                   query_pre_attn_scalar=scalar, attn_logit_softcapping=spec.attn_softcap or None,
                   final_logit_softcapping=spec.final_softcap or None,
                   rope_parameters={"full_attention": glob, "sliding_attention": local})
        return cfg

    # -- tensors: norms are norm_offset + w in the GGUF --------------------------------------------------------------
    def _shifted(self, hf_name: str) -> bool:
        return hf_name.endswith("norm.weight")

    def stored_as_hf(self, spec, hf_name: str) -> bool:
        return not self._shifted(hf_name)

    def to_gguf(self, spec, hf_name: str, t):
        return t + np.float32(self.norm_offset) if self._shifted(hf_name) else t

    def from_gguf(self, spec, hf_name: str, t):
        return t - np.float32(self.norm_offset) if self._shifted(hf_name) else t

    # -- PyTorch forward -----------------------------------------------------------------------------------
    def build_layer(self, spec: GemmaSpec, i: int):
        from lora2gguf.models.layers import MLP, Attention, DecoderLayer, RMSNorm

        local = i in spec.swa_layers
        attn = Attention(spec, norm_offset=self.norm_offset, scale=spec.attn_scale, softcap=spec.attn_softcap,
                         window=spec.sliding_window if local else 0,
                         rope_theta=spec.rope_theta_local if local else spec.rope_theta,
                         rope_linear=1.0 if local and not self.local_rope_scaled else 0.0)
        return DecoderLayer(
            norms={n: RMSNorm(spec.n_embd, spec.norm_eps, self.norm_offset) for n in self.layer_norms},
            attn_in="input_layernorm", attn_out="post_attention_layernorm",
            mlp_in="pre_feedforward_layernorm", mlp_out="post_feedforward_layernorm",
            self_attn=attn, mlp=MLP(spec.n_embd, spec.n_ff, "gelu_tanh"))

    def embed_scale(self, spec) -> float:
        return math.sqrt(spec.n_embd)

    def final_softcap(self, spec: GemmaSpec) -> float:
        return spec.final_softcap


ARCH = Gemma3()
