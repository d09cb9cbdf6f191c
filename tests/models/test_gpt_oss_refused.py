"""gpt-oss is refused by name: every verb, given a gpt-oss GGUF (general.architecture "gpt-oss", a base or a LoRA
adapter) or a gpt-oss config.json (GptOssForCausalLM / gpt_oss), exits non-zero with one line that names gpt-oss
and what lora2gguf lacks for it, and no traceback. inspect reads any GGUF's header: it describes a gpt-oss base
as unsupported instead of refusing it."""

import json

import gguf
import numpy as np
import pytest
from safetensors.numpy import save_file

from lora2gguf.cli import main

MISSING = ("MXFP4", "expert biases", "interleaved gate/up", "SwiGLU", "attention sinks", "sliding window")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("gptoss")
    base = d / "base.gguf"  # a minimal header, as llama.cpp's converter names the keys, and one tensor
    w = gguf.GGUFWriter(str(base), "gpt-oss")
    w.add_block_count(1)
    w.add_embedding_length(64)
    w.add_feed_forward_length(64)
    w.add_head_count(4)
    w.add_expert_count(4)
    w.add_expert_used_count(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("llama")
    w.add_token_list(["<unk>", "<s>", "</s>"] + [f"▁t{i}" for i in range(13)])
    w.add_token_scores([0.0] * 16)
    w.add_token_types([2, 3, 3] + [1] * 13)
    w.add_tensor("token_embd.weight", np.zeros((16, 64), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    lora = d / "lora.gguf"
    w = gguf.GGUFWriter(str(lora), "gpt-oss")
    w.add_type("adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", 8.0)
    w.add_tensor("blk.0.attn_q.weight.lora_a", np.ones((2, 64), np.float32))
    w.add_tensor("blk.0.attn_q.weight.lora_b", np.ones((64, 2), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    hf = d / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({
        "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "hidden_size": 64, "num_attention_heads": 4,
        "num_hidden_layers": 1, "intermediate_size": 64, "vocab_size": 16, "num_local_experts": 4}))
    peft_dir = d / "peft"
    peft_dir.mkdir()
    (peft_dir / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 2, "lora_alpha": 8, "target_modules": ["q_proj"],
        "base_model_name_or_path": "openai/gpt-oss-20b"}))
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.ones((2, 64), np.float32),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": np.ones((64, 2), np.float32)},
              str(peft_dir / "adapter_model.safetensors"))
    data = d / "d.jsonl"
    data.write_text('{"text": "the cat sat on the mat"}\n')
    return {"base": str(base), "lora": str(lora), "hf": str(hf), "peft": str(peft_dir), "data": str(data),
            "out": str(d / "out")}


RUNS = {
    "convert": ["convert", "{peft}", "--base", "{base}", "-o", "{out}.gguf"],
    "convert-hf": ["convert", "{peft}", "--base", "{hf}", "-o", "{out}.gguf"],
    "merge": ["merge", "--base", "{base}", "--lora", "{lora}", "-o", "{out}.gguf"],
    "verify": ["verify", "--base", "{base}", "--lora", "{lora}"],
    "train": ["train", "--base", "{base}", "--data", "{data}", "-o", "{out}", "--steps", "1"],
    "extract": ["extract", "--base", "{base}", "--tuned", "{hf}", "--rank", "2", "-o", "{out}.gguf"],
    "export": ["export", "{lora}", "--base", "{base}", "-o", "{out}"],
    "combine": ["combine", "{lora}", "--base", "{base}", "-o", "{out}.gguf"],
    "resize": ["resize", "{lora}", "--rank", "1", "-o", "{out}-peft"],
    "analyze": ["analyze", "{lora}"],
    "modelfile": ["modelfile", "--base", "{base}", "--lora", "{lora}", "--adapter", "-o", "{out}.Modelfile"],
    "inspect-adapter": ["inspect", "{lora}"],
    "inspect-hf": ["inspect", "{hf}"],
}


@pytest.mark.parametrize("run", list(RUNS))
def test_every_verb_refuses_gpt_oss_by_name_in_one_line(files, capsys, run):
    capsys.readouterr()
    rc = main([a.format(**files) for a in RUNS[run]])
    err = capsys.readouterr().err
    assert rc != 0, (run, err)
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, (run, err)
    assert "gpt-oss is not supported" in err and all(m in err for m in MISSING), (run, err)


def test_inspect_describes_a_gpt_oss_base_as_unsupported(files, capsys):
    assert main(["inspect", files["base"], "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["architecture"] == "gpt-oss" and info["supported"] is False and "gpt-oss" in info["verdict"]
