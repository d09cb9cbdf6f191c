"""modelfile: FROM a merged GGUF by default (Ollama 0.34.1+ refuses ADAPTER at create time); FROM base + ADAPTER
lora behind --adapter, written only for a GGUF LoRA that fits the base; refused for anything else."""

import os
import stat
import subprocess
import sys

from conftest import fixture
from lora2gguf.commands.convert import convert
from lora2gguf.commands.merge import merge
from peft_helpers import make_peft_adapter

CLI = [sys.executable, "-m", "lora2gguf.cli", "modelfile"]


def test_modelfile_command(tmp_path):
    lora = convert(make_peft_adapter(fixture("llama", "hf"), tmp_path / "a", r=4, lora_alpha=8,
                                     target_modules=["q_proj"]), fixture("llama"), tmp_path / "a.gguf")
    merged = merge(fixture("llama"), [(lora, 1.0)], tmp_path / "m.gguf", quant="q8_0")
    out = tmp_path / "Modelfile"
    cmd = CLI + ["--merged", str(merged), "-o", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert out.read_text() == f"FROM {merged.resolve()}\n"
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 2 and "already exists" in r.stderr
    # the ADAPTER form, for an older Ollama: behind --adapter, with a note on why
    cmd = CLI + ["--base", str(fixture("llama")), "--lora", str(lora), "-o", str(out), "--force"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 2 and "Ollama 0.34.1 and later refuse ADAPTER" in r.stderr and "--adapter" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and out.read_text() == f"FROM {merged.resolve()}\n"
    r = subprocess.run(cmd + ["--adapter"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert out.read_text() == f"FROM {fixture('llama').resolve()}\nADAPTER {lora.resolve()}\n"
    assert r.stderr.startswith("note: Ollama 0.34.1 and later refuse ADAPTER")


def test_modelfile_refuses_an_adapter_as_merged_and_mixed_forms(tmp_path):
    lora = convert(make_peft_adapter(fixture("llama", "hf"), tmp_path / "a", r=4, lora_alpha=8,
                                     target_modules=["q_proj"]), fixture("llama"), tmp_path / "a.gguf")
    out = tmp_path / "Modelfile"
    for args, match in [(["--merged", str(lora)], "a LoRA adapter, not a model"),
                        (["--merged", str(fixture("llama")), "--adapter"], "give it alone"),
                        (["--lora", str(lora), "--adapter"], "give --merged MERGED.gguf, or --base and --lora")]:
        r = subprocess.run(CLI + args + ["-o", str(out)], capture_output=True, text=True)
        assert r.returncode == 2 and match in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not out.exists()


def test_modelfile_refuses_a_base_as_lora_and_a_lora_for_another_base(tmp_path):
    from test_gguf_lora import shuffled_base

    out = tmp_path / "Modelfile"
    r = subprocess.run(CLI + ["--base", str(fixture("llama")), "--lora", str(fixture("llama")), "-o", str(out), "--adapter"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "not a GGUF LoRA" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    other = shuffled_base(fixture("llama"), tmp_path / "other.gguf")
    lora = convert(make_peft_adapter(fixture("llama", "hf"), tmp_path / "a", r=4, lora_alpha=8,
                                     target_modules=["q_proj"]), other, tmp_path / "a.gguf")
    r = subprocess.run(CLI + ["--base", str(fixture("llama")), "--lora", str(lora), "-o", str(out), "--adapter"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "another base" in r.stderr
    assert not out.exists() and not list(tmp_path.glob(".Modelfile*"))


def test_modelfile_mode_follows_umask(tmp_path):
    from lora2gguf.commands.modelfile import write_modelfile

    lora = convert(make_peft_adapter(fixture("llama", "hf"), tmp_path / "a", r=4, lora_alpha=8,
                                     target_modules=["q_proj"]), fixture("llama"), tmp_path / "a.gguf")
    old = os.umask(0o022)
    try:
        out = write_modelfile(tmp_path / "Modelfile", base=fixture("llama"), lora=lora, adapter=True)
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
