"""The base fingerprint tells a base from its fine-tune (the instruct version) whenever the fine-tune's
weight updates exceed the rounding of the files compared, still matches the same base at any type, and
yields to an explicit override."""

import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import fixture
from lora2gguf.weights import fingerprint
from lora2gguf.weights.base_model import open_base
from test_gguf_lora import rewrite_gguf

TYPES = {"f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0", "q4_k_m": "MOSTLY_Q4_K_M", "q2_k": "MOSTLY_Q2_K"}


def fine_tune(src, dst, rel=0.02, seed=0):
    """What full fine-tuning does to a base: every weight moved a little (here a Gaussian update of 2% of
    each tensor's RMS): correlation with the base stays ~0.9998, which the old 0.8 rule called 'same'."""
    rng = np.random.default_rng(seed)

    def update(t):
        rms = np.sqrt((t.astype(np.float64) ** 2).mean())
        return (t + rng.standard_normal(t.shape) * rel * rms).astype(np.float32)
    return rewrite_gguf(src, dst, tensor_fn=update)


def quantized(src, dst, kind):
    from gguf import LlamaFileType

    from lora2gguf.llamacpp.quantize import llama_quantize

    llama_quantize(src, dst, LlamaFileType[TYPES[kind]])
    return dst


def fp(path):
    with open_base(path) as b:
        return fingerprint.fingerprint(b)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("pair")
    base, instruct = fixture("qwen3"), fine_tune(fixture("qwen3"), d / "instruct.gguf")
    out = {("base", "f32"): base, ("instruct", "f32"): instruct}
    for kind in TYPES:
        out["base", kind] = quantized(base, d / f"base-{kind}.gguf", kind)
        out["instruct", kind] = quantized(instruct, d / f"instruct-{kind}.gguf", kind)
    return out


def test_same_base_matches_at_every_type(pair):
    recorded = fp(pair["base", "f32"])
    for kind in ("f32", *TYPES):
        c = fingerprint.compare(recorded, fp(pair["base", kind]))
        assert c["match"] and c["max_difference_vs_rounding"] < 1, (kind, c)
        c = fingerprint.compare(fp(pair["base", kind]), recorded)  # recorded from a quantized base
        assert c["match"], (kind, c)


@pytest.mark.parametrize("kind", ["f32", "f16", "q8_0"])
def test_instruct_version_is_told_apart(pair, kind):
    """A 2% update is beyond the rounding of F32, F16 and Q8_0 (below Q4's, weights alone cannot tell)."""
    recorded = fp(pair["base", "f32"])
    c = fingerprint.compare(recorded, fp(pair["instruct", kind]))
    assert not c["match"] and "fine-tune" in c["verdict"] and c["min_correlation"] > 0.999, c
    c = fingerprint.compare(fp(pair["instruct", "f32"]), fp(pair["base", kind]))
    assert not c["match"], c
    old_rule = fingerprint.Fingerprint(recorded.structure, recorded.sample)  # recorded before types: correlation
    assert fingerprint.compare(old_rule, fp(pair["instruct", kind]))["match"], "what the 0.8 correlation rule said"


def test_commands_refuse_the_instruct_version_unless_overridden(pair, tmp_path):
    from lora2gguf.commands.convert import convert
    from peft_helpers import make_peft_adapter

    lora = convert(make_peft_adapter(fixture("qwen3", "hf"), tmp_path / "a", r=4, lora_alpha=8,
                                     target_modules=["q_proj", "v_proj"]), pair["base", "f32"], tmp_path / "a.gguf")
    cmd = [sys.executable, "-m", "lora2gguf.cli", "merge", "--base", str(pair["instruct", "f16"]), "--lora", str(lora),
           "-o", str(tmp_path / "m.gguf"), "--quant", "f16"]
    env = {k: v for k, v in os.environ.items() if k != fingerprint.OVERRIDE}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "fine-tune" in r.stderr and fingerprint.OVERRIDE in r.stderr, r.stderr
    assert not (tmp_path / "m.gguf").exists()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env | {fingerprint.OVERRIDE: "1"})
    assert r.returncode == 0 and (tmp_path / "m.gguf").is_file(), r.stderr
