"""adapter_any: the format told by the files, multimodal text towers and 4-bit (Unsloth / QLoRA) bases
through every verb.

Which case applies: the multimodal and Unsloth adapters are real PEFT adapters (the peft library on our
tiny llama) whose files are then laid out as PEFT saves them on a multimodal model (transformers'
Gemma3ForConditionalGeneration / Qwen2.5-VL module paths, with LoRA on vision modules) or given the
`base_model_name_or_path` Unsloth writes; no multimodal model or bitsandbytes is installed here."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from conftest import fixture
from lora2gguf.adapters.load import adapter_format, describe_adapter
from lora2gguf.cli import main
from lora2gguf.errors import Lora2GGUFError
from lora2gguf.commands.verify import format_report, verify
from peft_helpers import assert_converts_like_peft, make_peft_adapter

P = "base_model.model."
# (text-tower prefix replacing "model.", lm_head's path, vision LoRA tensors added) per checkpoint layout
LAYOUTS = {
    "gemma3-new": ("model.language_model.", "lm_head", ["model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj",
                                                         "model.vision_tower.vision_model.encoder.layers.1.mlp.fc1",
                                                         "model.multi_modal_projector.mm_input_projection"]),
    "gemma3-old": ("language_model.model.", "language_model.lm_head", ["vision_tower.vision_model.encoder.layers.0.self_attn.k_proj"]),
    "qwen25vl": ("model.language_model.", "lm_head", ["model.visual.blocks.0.attn.qkv", "model.visual.merger.mlp.0"]),
}


def as_multimodal(peft_dir, out, layout, regex_targets=False):
    """The same PEFT adapter laid out as on a multimodal model: text modules under its language model,
    plus LoRA pairs on vision modules (which a GGUF LoRA cannot carry: llama.cpp's mmproj takes none)."""
    text, head, vision = LAYOUTS[layout]
    tensors = load_file(peft_dir / "adapter_model.safetensors")
    moved = {}
    for k, v in tensors.items():
        name = k[len(P):]
        name = head + name[len("lm_head"):] if name.startswith("lm_head") else text + name[len("model."):]
        moved[P + name] = v
    r = next(v for k, v in tensors.items() if "lora_A" in k).shape[0]
    rng = np.random.default_rng(0)
    for mod in vision:  # shapes of a small vision tower: llama.cpp would have nowhere to put them
        moved[f"{P}{mod}.lora_A.weight"] = rng.standard_normal((r, 16), dtype=np.float32)
        moved[f"{P}{mod}.lora_B.weight"] = rng.standard_normal((24, r), dtype=np.float32)
    out.mkdir()
    save_file(moved, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((peft_dir / "adapter_config.json").read_text())
    if regex_targets:  # Unsloth's vision notebooks pass a regex over the language model's paths
        cfg["target_modules"] = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|up_proj)|lm_head"
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    return out


@pytest.mark.parametrize("arch,layout", [("llama", k) for k in LAYOUTS] + [("gemma3", "gemma3-new"), ("gemma3", "gemma3-old")])
def test_multimodal_text_tower_converts_like_peft(arch, layout, tmp_path, capsys):
    """llama carries every layout (the q/k permutation is the strictest path); gemma3 is the real case
    (Gemma 3 4B+ is Gemma3ForConditionalGeneration), its tied head without lm_head LoRA."""
    head = ["lm_head"] if arch == "llama" else []
    peft_dir = make_peft_adapter(fixture(arch, "hf"), tmp_path / "peft", seed=61, r=4, lora_alpha=8,
                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"] + head)
    mm = as_multimodal(peft_dir, tmp_path / "mm", layout, regex_targets=layout == "gemma3-new")
    assert_converts_like_peft(arch, mm, peft_dir, tmp_path / "a.gguf")
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    n = len(LAYOUTS[layout][2])
    assert len(notes) == 1 and f"{n} vision-tower module{'s' if n > 1 else ''} skipped" in notes[0], notes


@pytest.fixture
def unsloth(tmp_path):
    d = make_peft_adapter(fixture("llama", "hf"), tmp_path / "unsloth", seed=62, r=4, lora_alpha=8,
                          target_modules=["q_proj", "v_proj"])
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "unsloth/tiny-llama-Instruct-bnb-4bit"
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    return d


def test_4bit_base_said_in_one_line_by_every_verb(unsloth, tmp_path, capsys):
    def notes(args):
        assert main(args) == 0
        err = capsys.readouterr().err
        return [line for line in err.splitlines() if "4-bit" in line]

    for args in (["convert", str(unsloth), "--base", str(fixture("llama")), "-o", str(tmp_path / "a.gguf")],
                 ["merge", "--base", str(fixture("llama")), "--lora", str(unsloth), "-o", str(tmp_path / "m.gguf")],
                 ["export", str(unsloth), "--base", str(fixture("llama")), "-o", str(tmp_path / "e")]):
        got = notes(args)
        assert len(got) == 1 and "unsloth/tiny-llama-Instruct-bnb-4bit" in got[0] and "NF4" in got[0], (args, got)
    info = describe_adapter(unsloth)
    assert len(info["notes"]) == 1 and "bnb-4bit" in info["notes"][0]
    rep = verify(fixture("llama"), [(unsloth, 1.0)])
    assert rep["pass"] and sum("4-bit" in w for w in rep["warnings"]) == 1, rep["warnings"]
    gap = rep["four_bit_gap"]  # the adapter on an NF4-rounded copy of the base vs on the base
    print(gap)
    assert 0 < gap["kl_nf4_base_to_base"] < 1 and 0 < gap["kl_nf4_to_reference"] < 1
    assert "4-bit training base: KL" in format_report(rep)


def test_plain_peft_has_no_notes(tmp_path, capsys):
    d = make_peft_adapter(fixture("llama", "hf"), tmp_path / "a", seed=63, r=2, lora_alpha=4, target_modules=["v_proj"])
    assert main(["convert", str(d), "--base", str(fixture("llama")), "-o", str(tmp_path / "a.gguf")]) == 0
    assert "note:" not in capsys.readouterr().err and "notes" not in describe_adapter(d)
    assert "four_bit_gap" not in verify(fixture("llama"), [(d, 1.0)])


def test_format_detection(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(Lora2GGUFError, match="adapter_model.pt \\(torchtune\\) or adapters.safetensors \\(mlx-lm\\)"):
        adapter_format(empty)
    with pytest.raises(Lora2GGUFError, match="no such file or directory"):
        adapter_format(tmp_path / "nope")
    for files, fmt in ((["adapters.safetensors"], "mlx-lm"), (["adapter_model.pt"], "torchtune"),
                       (["adapter_model.pt", "adapter_model.safetensors"], "peft"), (["adapter_config.json"], "peft")):
        d = tmp_path / "-".join(files)
        d.mkdir()
        for f in files:
            (d / f).write_bytes(b"")
        assert adapter_format(d) == fmt, files


# -- malformed mlx-lm / torchtune inputs through every verb --------------------------------------------
class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("touch PWNED",))


def _mlx(tmp_path):
    from test_mlx import write_mlx

    peft = make_peft_adapter(fixture("llama", "hf"), tmp_path / "p", seed=64, r=2, lora_alpha=4, target_modules=["v_proj"])
    return write_mlx(peft, tmp_path / "mlx")


def _tune(tmp_path):
    from test_torchtune import write_torchtune

    peft = make_peft_adapter(fixture("llama", "hf"), tmp_path / "p", seed=65, r=2, lora_alpha=4, target_modules=["q_proj"])
    return write_torchtune(peft, tmp_path / "tune", "llama")


def _edit_json(d, name, fn):
    cfg = json.loads((d / name).read_text())
    fn(cfg)
    (d / name).write_text(json.dumps(cfg))
    return d


def _nan_st(d):
    t = load_file(d / "adapters.safetensors")
    save_file({k: v * np.nan if i == 0 else v for i, (k, v) in enumerate(t.items())}, str(d / "adapters.safetensors"))
    return d


def _torch_save(d, obj):
    torch.save(obj, d / "adapter_model.pt")
    return d


def _pickle(d, obj):
    import pickle

    (d / "adapter_model.pt").write_bytes(pickle.dumps(obj))
    return d


MALFORMED = {
    "mlx-truncated": (_mlx, lambda d: (d / "adapters.safetensors").write_bytes((d / "adapters.safetensors").read_bytes()[:200]) and d,
                      "not a readable safetensors file"),
    "mlx-nan": (_mlx, _nan_st, "contains NaN or Inf"),
    "mlx-no-scale": (_mlx, lambda d: _edit_json(d, "adapter_config.json", lambda c: c["lora_parameters"].pop("scale")),
                     "lora_parameters.scale is missing"),
    "mlx-config-not-json": (_mlx, lambda d: (d / "adapter_config.json").write_text("{oops") and d, "invalid JSON"),
    "mlx-unknown-tensor": (_mlx, lambda d: save_file({"model.layers.0.self_attn.v_proj.lora_c": np.zeros((2, 2), np.float32)},
                                                     str(d / "adapters.safetensors")) or d, "not an mlx-lm LoRA tensor"),
    "mlx-for-another-model": (_mlx, lambda d: save_file({"model.layers.0.self_attn.v_proj.lora_a": np.zeros((48, 2), np.float32),
                                                         "model.layers.0.self_attn.v_proj.lora_b": np.zeros((2, 32), np.float32)},
                                                        str(d / "adapters.safetensors")) or d, "changes a 32x48 weight"),
    "tune-evil-pickle": (_tune, lambda d: _pickle(d, {"layers.0.attn.q_proj.lora_a.weight": _Evil()}), "refused to load"),
    "tune-garbage": (_tune, lambda d: (d / "adapter_model.pt").write_bytes(b"not a torch file" * 9) and d, "refused to load"),
    "tune-not-a-dict": (_tune, lambda d: _torch_save(d, [1, 2]), "expected a dict of tensors"),
    "tune-int-tensor": (_tune, lambda d: _torch_save(d, {"layers.0.attn.q_proj.lora_a.weight": torch.zeros(2, 64, dtype=torch.int32)}),
                        "expected a floating-point type"),
    "tune-no-config": (_tune, lambda d: (d / "adapter_config.json").unlink() or d, "without adapter_config.json"),
    "tune-unknown-module": (_tune, lambda d: _torch_save(d, {"layers.0.attn.pos_embeddings.lora_a.weight": torch.zeros(2, 64)}),
                            "not a torchtune LoRA tensor"),
}
VERBS = ("convert", "merge", "export", "inspect", "verify")


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_other_formats_one_error_line_every_verb(case, tmp_path, capsys):
    make, spoil, message = MALFORMED[case]
    d = spoil(make(tmp_path))
    capsys.readouterr()
    base = str(fixture("llama"))
    out = tmp_path / "out"
    for verb in VERBS:
        args = {"convert": ["convert", str(d), "--base", base, "-o", str(out)],
                "merge": ["merge", "--base", base, "--lora", str(d), "-o", str(out)],
                "export": ["export", str(d), "--base", base, "-o", str(out)],
                "inspect": ["inspect", str(d)],
                "verify": ["verify", "--base", base, "--lora", str(d)]}[verb]
        if verb == "inspect" and case == "mlx-for-another-model":
            continue  # shapes are checked against a base; inspect has none
        rc = main(args)
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], (verb, rc, err)
        assert not out.exists(), verb
    assert not (tmp_path / "PWNED").exists() and not Path("PWNED").exists(), "the pickle's code never ran"
