"""runtime: greedy decoding reuses the KV cache of a shared prompt prefix without changing its answers,
an adapter swap invalidates that cache, quantized models evaluate whole prompts on this CPU, and a stream
gives the logits a block at a time from a context of its own."""

import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, fixture, token_ids
from lora2gguf.commands.convert import convert
from lora2gguf.llamacpp.runtime import LlamaRuntime
from peft_helpers import make_peft_adapter


def test_greedy_prefix_reuse_and_adapter_swap(tmp_path):
    base = fixture("llama")
    shared = token_ids(300, 24, seed=1)
    prompts = [shared + token_ids(300, 9, seed=s)[1:] for s in range(2, 6)] + [shared[:10], shared]
    peft_dir = make_peft_adapter(fixture("llama", "hf"), tmp_path / "a", seed=1, r=4, lora_alpha=8,
                                 target_modules=["q_proj", "v_proj", "down_proj"])
    lora = convert(peft_dir, base, tmp_path / "a.gguf")

    def fresh(p, adapters=()):  # a new context per prompt: nothing cached
        with LlamaRuntime(base, n_ctx=128) as rt:
            rt.set_adapters(adapters)
            return rt.greedy(p, 12)

    with LlamaRuntime(base, n_ctx=128) as rt:
        plain = [rt.greedy(p, 12) for p in prompts]
        rt.set_adapters([(lora, 1.0)])
        adapted = [rt.greedy(p, 12) for p in prompts]
        rt.set_adapters([])
        again = rt.greedy(prompts[0], 12)
    assert plain == [fresh(p) for p in prompts]
    assert adapted == [fresh(p, [(lora, 1.0)]) for p in prompts]
    assert adapted != plain and again == plain[0]


def test_batched_eval_of_quantized_models_runs():
    """A whole prompt through each quantized fixture, in a child process so that a crash in llama.cpp's
    CPU kernels (SIGILL in its AMX path, before runtime._without_extra_bufts) fails this test and not the run."""
    code = ("import sys, numpy as np; sys.path.insert(0, 'tests'); from conftest import fixture, token_ids; "
            "from lora2gguf.llamacpp.runtime import LlamaRuntime\n"
            "for arch in ('llama', 'qwen3'):\n"
            "    for kind in ('q4_k_m', 'q8_0', 'f32'):\n"
            "        with LlamaRuntime(fixture(arch, kind), n_ctx=128) as rt:\n"
            "            x = rt.logits(token_ids(rt.n_vocab, 96))\n"
            "            assert x.shape == (96, rt.n_vocab) and np.isfinite(x).all()\n"
            "            print(arch, kind, int(x[-1].argmax()))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert len(r.stdout.splitlines()) == 6, r.stdout


def test_logits_and_routing_over_several_batches_equal_one_batch():
    """logits() decodes n_batch tokens at a time, copying each batch's logits into the result; a MoE's
    routing is kept batch by batch. Over three batches both must equal one batch over the same tokens,
    and greedy() after it must reuse nothing stale."""
    base = fixture("qwen3moe")
    tokens = token_ids(300, 70, seed=3)
    with LlamaRuntime(base, n_ctx=128, n_batch=128, moe_routing=True) as rt:
        whole, whole_routing = rt.logits(tokens), rt.routing
        whole_greedy = rt.greedy(tokens[:20], 6)
    with LlamaRuntime(base, n_ctx=128, n_batch=32, moe_routing=True) as rt:
        parts, parts_routing = rt.logits(tokens), rt.routing
        parts_greedy = rt.greedy(tokens[:20], 6)
        again = rt.logits(tokens[:40])
    assert parts.shape == whole.shape and len(whole) == 70
    assert abs(parts - whole).max() < 1e-4 and abs(again - whole[:40]).max() < 1e-4
    assert sorted(parts_routing) == sorted(whole_routing) and len(whole_routing) > 0
    for layer, ids in whole_routing.items():
        assert ids.shape[0] == 70 and (parts_routing[layer] == ids).all()
    assert parts_greedy == whole_greedy


def test_greedy_many_equals_greedy_one_by_one(tmp_path):
    """Prompts decoded side by side (one sequence each, batches that split prompts, a shared prefix decoded once)
    give the answers greedy() gives one prompt at a time, with and without an adapter; then logits() sees no
    stale cache."""
    base = fixture("llama")
    prompts = [token_ids(300, k, seed=s) for s, k in ((1, 5), (2, 17), (3, 9), (4, 30), (5, 2))]
    system = token_ids(300, 11, seed=9)  # a prefix every prompt shares (decoded once, shared in the cache)
    prompts += [system + p[1:] for p in prompts] + [system[:6], system]
    peft_dir = make_peft_adapter(fixture("llama", "hf"), tmp_path / "a", seed=2, r=4, lora_alpha=8,
                                 target_modules=["q_proj", "v_proj", "down_proj"])
    lora = convert(peft_dir, base, tmp_path / "a.gguf")
    with LlamaRuntime(base, n_ctx=256) as rt:
        one = [rt.greedy(p, 10) for p in prompts]
        rt.set_adapters([(lora, 1.0)])
        one_lora = [rt.greedy(p, 10) for p in prompts]
        lg = rt.logits(prompts[3])
    with LlamaRuntime(base, n_ctx=512, n_batch=16, n_seq=len(prompts)) as rt:
        many = rt.greedy_many(prompts, 10)
        shared = rt.greedy_many(prompts[5:], 10)  # only prompts with the common prefix
        rt.set_adapters([(lora, 1.0)])
        many_lora = rt.greedy_many(prompts, 10)
        lg_after = rt.logits(prompts[3])
    assert all(len(a) == 10 for a in one) and one != one_lora
    assert many == one and many_lora == one_lora and shared == one[5:]
    assert abs(lg_after - lg).max() < 1e-4


def test_a_stream_is_logits_a_block_at_a_time_in_its_own_context(tmp_path):
    """LlamaRuntime.stream: the logits logits() gives with the same batch, with its own adapters and its
    own expert choices, a block at a time, in a context of its own: the model's main context (greedy, its
    adapters) is untouched, and two streams on one model advance side by side."""
    base = fixture("qwen3moe")
    tokens = token_ids(300, 70, seed=3)
    peft_dir = make_peft_adapter(fixture("qwen3moe", "hf"), tmp_path / "a", seed=1, r=4, lora_alpha=8,
                                 target_modules=["q_proj", "v_proj"])
    lora = convert(peft_dir, base, tmp_path / "a.gguf")
    with LlamaRuntime(base, n_ctx=128, n_batch=32, moe_routing=True) as rt:
        plain, plain_routing = rt.logits(tokens), rt.routing
        rt.set_adapters([(lora, 1.0)])
        adapted = rt.logits(tokens)
        rt.set_adapters([])
        greedy = rt.greedy(tokens[:20], 6)
        with rt.stream(tokens, [], 32) as a, rt.stream(tokens, [(lora, 1.0)], 32) as b:
            blocks = [(x.copy(), y.copy()) for x, y in zip(a, b)]
            a_routing = a.routing
        assert rt.greedy(tokens[:20], 6) == greedy
    assert [len(x) for x, _ in blocks] == [32, 32, 6]
    assert (np.concatenate([x for x, _ in blocks]) == plain).all()
    assert (np.concatenate([y for _, y in blocks]) == adapted).all() and abs(adapted - plain).max() > 1e-2
    assert sorted(a_routing) == sorted(plain_routing) and all((a_routing[k] == v).all() for k, v in plain_routing.items())


def test_a_stream_cuts_its_blocks_from_larger_decodes():
    """decode_rows: blocks of `rows` positions cut from decodes of a multiple of them, the same logits as one
    decode per block (this fixture's batch sizes give the same bits), and a decode size that is no multiple
    is refused."""
    base = fixture("llama")
    tokens = token_ids(256, 75, seed=4)
    with LlamaRuntime(base, n_ctx=128, n_batch=16) as rt:
        with rt.stream(tokens, [], 16) as one, rt.stream(tokens, [], 16, decode_rows=48) as cut:
            pairs = [(x.copy(), y.copy()) for x, y in zip(one, cut)]
        with pytest.raises(ValueError, match="not a multiple"):
            rt.stream(tokens, [], 16, decode_rows=40)
    assert [len(y) for _, y in pairs] == [16, 16, 16, 16, 11]
    assert all((x == y).all() for x, y in pairs)
