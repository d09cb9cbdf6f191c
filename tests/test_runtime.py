"""runtime: greedy decoding reuses the KV cache of a shared prompt prefix without changing its answers,
and an adapter swap invalidates that cache."""

from conftest import fixture, token_ids
from lora2gguf.convert import convert
from lora2gguf.runtime import LlamaRuntime
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
