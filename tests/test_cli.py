"""The command line: version, help, inspect, and one-line errors with exit code 2."""

import json
import subprocess
import sys

import pytest

from conftest import fixture

LORA2GGUF = [sys.executable, "-m", "lora2gguf.cli"]


def run(*args):
    return subprocess.run(LORA2GGUF + [str(a) for a in args], capture_output=True, text=True)


def test_version_and_help():
    r = run("--version")
    assert r.returncode == 0 and "lora2gguf" in r.stdout
    r = run("--help")
    assert r.returncode == 0 and "inspect" in r.stdout


def test_inspect_model_json():
    r = run("inspect", fixture("qwen2", "q4_k_m"), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["kind"] == "gguf-model" and info["architecture"] == "qwen2"
    assert info["file_type"] == "MOSTLY_Q4_K_M"
    assert info["spec"]["n_head_kv"] == 2 and info["spec"]["tied_embeddings"] is True
    assert "Q4_K" in info["tensor_types"]


def test_inspect_human_and_hf_dir():
    r = run("inspect", fixture("llama"))
    assert r.returncode == 0 and "architecture: llama" in r.stdout
    r = run("inspect", fixture("qwen3", "hf"), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["spec"]["qk_norm"] is True


@pytest.mark.parametrize("content,expect", [
    (b"not a gguf at all, just text" * 4, "not a GGUF file"),
    (None, "truncated"),
])
def test_bad_input_one_line_exit_2(tmp_path, content, expect):
    p = tmp_path / "bad.gguf"
    p.write_bytes(content if content is not None else fixture("llama").read_bytes()[:300])
    r = run("inspect", p)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(p) in lines[0] and expect in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_verbose_shows_traceback(tmp_path):
    p = tmp_path / "bad.gguf"
    p.write_bytes(b"x" * 100)
    r = run("-v", "inspect", p)
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_unknown_arch_via_cli(tmp_path):
    import gguf

    p = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(p), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", __import__("numpy").zeros((4, 8), "float32"))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    r = run("inspect", p)  # inspect describes any GGUF; the verbs that need the architecture refuse it
    assert r.returncode == 0 and "supported: False" in r.stdout and "cannot use it" in r.stdout, r.stdout
    r = run("verify", "--base", p, "--lora", p)
    assert r.returncode == 2 and "unsupported architecture 'gpt2'" in r.stderr and "llama, qwen2, qwen3" in r.stderr


def test_bad_usage_exit_2():
    r = run("inspect")
    assert r.returncode == 2
