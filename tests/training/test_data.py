"""Training data: JSONL errors, labels of rendered conversations at token level, truncation, batches."""

import json

import pytest
import torch

from conftest import FIXTURES, fixture
from lora2gguf.llamacpp.tokenizer import DEFAULT_CHAT_TEMPLATE, Tokenizer, render_chat
from lora2gguf.training.data import IGNORE, collate, encode_record, load_dataset, read_jsonl
from lora2gguf.errors import Lora2GGUFError

CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"},
        {"role": "assistant", "content": "the cat sat on the mat"}, {"role": "user", "content": "one two"},
        {"role": "assistant", "content": "three red green"}]


@pytest.fixture(scope="module")
def tok():
    t = Tokenizer(fixture("llama"), "chatml")  # the fixture GGUF has no chat template: name one
    yield t
    t.close()


def write(tmp_path, lines, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return p


def spans(ids, labels):
    """Runs of consecutive labelled tokens."""
    out, cur = [], []
    for i, lab in zip(ids, labels):
        if lab != IGNORE:
            assert lab == i, "a label is either the token itself or IGNORE"
            cur.append(i)
        elif cur:
            out.append(cur)
            cur = []
    return out + ([cur] if cur else [])


def detok(tok, ids):
    """Text of ids with special tokens written out (llama.cpp's detokenize hides them by default)."""
    return tok.rt.llm.detokenize(ids, special=True).decode()


def char_offsets(tok, ids):
    """Start/end character of each token in the detokenized text, from detokenizing growing prefixes."""
    ends = [len(tok.rt.detokenize(ids[: k + 1])) for k in range(len(ids))]
    return list(zip([0] + ends[:-1], ends))


def test_chat_labels_cover_exactly_the_assistant_turns(tok):
    """Expected labels come from character positions in the rendered text (str.find), not from the
    prefix-rendering the code uses: a token is trained iff it lies inside an assistant turn."""
    ex = encode_record({"messages": CHAT}, tok, "x:1")
    text = render_chat(DEFAULT_CHAT_TEMPLATE, CHAT, False)
    assert tok.rt.detokenize(ex.ids) == text and ex.ids[0] == tok.bos_id
    want_ranges, pos = [], 0
    for m in CHAT:
        if m["role"] == "assistant":
            start = text.index("<|im_start|>assistant\n" + m["content"], pos) + len("<|im_start|>assistant\n")
            end = text.index("<|im_end|>\n", start) + len("<|im_end|>\n")
            want_ranges.append((start, end))
            pos = end
    # BOS detokenizes to nothing (and makes detokenize drop the tokenizer's leading space)
    want = [i if b > a and any(s <= a and b <= e for s, e in want_ranges) else IGNORE
            for i, (a, b) in zip(ex.ids, char_offsets(tok, ex.ids))]
    assert ex.labels == want
    assert [tok.rt.detokenize(s) for s in spans(ex.ids, ex.labels)] == [
        "the cat sat on the mat<|im_end|>\n", "three red green<|im_end|>\n"]


def test_prompt_completion_labels(tok):
    ex = encode_record({"prompt": "the cat sat on", "completion": " the mat"}, tok, "x:1")
    (span,) = spans(ex.ids, ex.labels)
    assert span[-1] == tok.eos_id and tok.rt.detokenize(span[:-1]) == " the mat"
    assert ex.ids[: len(ex.ids) - len(span)] == tok.encode("the cat sat on")


def test_text_labels_everything(tok):
    ex = encode_record({"text": "the dog is big"}, tok, "x:1")
    assert ex.labels == ex.ids and ex.ids[-1] == tok.eos_id and ex.ids[0] == tok.bos_id


def test_renderer_matches_llama_cpp_python_on_a_real_template(smollm2_f32):
    """Our Jinja rendering against llama-cpp-python's own chat formatter, on SmolLM2's template."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from lora2gguf.fileio.gguf_read import GGUFFile

    with GGUFFile(smollm2_f32) as f:
        template = f.get("tokenizer.chat_template")
    for gen in (False, True):
        ref = Jinja2ChatFormatter(template, eos_token="<|im_end|>", bos_token="<|im_start|>",
                                  add_generation_prompt=gen)(messages=CHAT[1:]).prompt
        assert render_chat(template, CHAT[1:], gen, "<|im_start|>", "<|im_end|>") == ref
    assert "You are a helpful AI assistant" in ref  # the template inserts a default system turn


@pytest.mark.slow
def test_chat_labels_with_real_tokenizer_and_template(smollm2_f32):
    """SmolLM2: BPE tokens, real special tokens, and a template that adds its own system prompt."""
    tok = Tokenizer(smollm2_f32)
    try:
        assert tok.template is not None
        ex = encode_record({"messages": CHAT[1:]}, tok, "x:1")
        im_start, im_end = tok.encode("<|im_start|>"), tok.encode("<|im_end|>")
        got = [detok(tok, s) for s in spans(ex.ids, ex.labels)]
        masked = detok(tok, [i for i, lab in zip(ex.ids, ex.labels) if lab == IGNORE])
    finally:
        tok.close()
    assert len(im_start) == 1 and len(im_end) == 1, "special tokens are parsed as such"
    assert got == ["the cat sat on the mat<|im_end|>\n", "three red green<|im_end|>\n"]
    assert "helpful AI assistant" in masked and "hello world" in masked and "one two" in masked


@pytest.mark.parametrize("lines, where, what", [
    ([{"text": "a"}, '{"text": "b"', {"text": "c"}], ":2:", "malformed JSON"),
    ([{"text": "a"}, "[1, 2]"], ":2:", "expected a JSON object"),
    ([{"messages": [{"role": "user", "content": "a"}, {"role": "wizard", "content": "b"}]}], ":1:",
     "unknown role 'wizard'"),
    ([{"text": "a"}, "", {"prompt": "a"}], ":3:", "missing field 'completion'"),
    ([{"messages": [{"role": "user"}, {"role": "assistant", "content": "b"}]}], ":1:", "missing field 'content'"),
    ([{"messages": [{"role": "user", "content": "a"}]}], ":1:", "no assistant message"),
    ([{"messages": []}], ":1:", "non-empty list"),
    ([{"text": 3}], ":1:", "must be a string"),
    ([{"input": "a", "output": "b"}], ":1:", "expected a \"text\""),
])
def test_bad_records_name_file_and_line(tmp_path, tok, lines, where, what):
    p = write(tmp_path, lines)
    with pytest.raises(Lora2GGUFError) as e:
        load_dataset(p, tok, 64)
    assert str(e.value).startswith(f"{p}{where}") and what in str(e.value), str(e.value)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_data(tmp_path, tok, content):
    p = tmp_path / "e.jsonl"
    p.write_text(content)
    with pytest.raises(Lora2GGUFError, match="no records"):
        read_jsonl(p)


def test_missing_file_and_bad_template(tmp_path, tok):
    with pytest.raises(Lora2GGUFError, match="no such file"):
        read_jsonl(tmp_path / "nope.jsonl")
    tok.template = "{% if messages|length > 1 %}{{ raise_exception('one message only') }}{% endif %}x"
    try:
        with pytest.raises(Lora2GGUFError, match=r"x:7: the chat template failed .*one message only"):
            encode_record({"messages": CHAT}, tok, "x:7")
    finally:
        tok.template = None


def test_long_sequences_truncated_and_counted_once(tmp_path, tok):
    long = "the cat sat on the mat and the dog sat with the cat"
    p = write(tmp_path, [{"text": long}, {"text": "the"}, {"text": long + " ."},
                         {"prompt": long + long, "completion": " the"}])
    warnings = []
    exs = load_dataset(p, tok, 8, warn=warnings.append)
    assert [len(e.ids) for e in exs] == [8, 3, 8], "the prompt-only-within-8 record has nothing to train on"
    assert exs[0].ids == tok.encode(long)[:8]
    assert warnings[0] == f"warning: {p}: 3 of 4 sequences were longer than --seq-len 8 and were truncated"
    assert "1 record(s) have no trained tokens" in warnings[1] and len(warnings) == 2


def test_no_template_refuses_messages_but_not_text(tmp_path):
    """A GGUF without a chat template (a pretrained base): conversations are refused in one line that names
    --chat-template; prompt/completion and text records need no template."""
    t = Tokenizer(fixture("gemma3"))
    try:
        with pytest.raises(Lora2GGUFError, match="has no chat template.*--chat-template"):
            load_dataset(FIXTURES / "train" / "chat.jsonl", t, 256)
        assert load_dataset(FIXTURES / "train" / "memorise.jsonl", t, 256)
        assert load_dataset(FIXTURES / "train" / "text.jsonl", t, 256)
    finally:
        t.close()
    g = Tokenizer(fixture("gemma3"), "gemma")
    try:
        ex = load_dataset(FIXTURES / "train" / "chat.jsonl", g, 256)[0]
        assert g.rt.detokenize(ex.ids).count("<start_of_turn>") >= 2, "Gemma's turn markers, not ChatML's"
    finally:
        g.close()


def test_collate_pads_right_and_shifts_labels(tok):
    a = encode_record({"prompt": "the cat", "completion": " sat"}, tok)
    b = encode_record({"text": "one two three red"}, tok)
    batch = collate([a, b], pad_id=tok.pad_id)
    T = max(len(a.ids), len(b.ids))
    assert batch["ids"].shape == (2, T) and batch["attention_mask"] is not None
    assert batch["attention_mask"][0].tolist() == [1] * len(a.ids) + [0] * (T - len(a.ids))
    assert batch["ids"][0, len(a.ids):].eq(tok.pad_id).all()
    assert batch["targets"][0].tolist() == a.labels[1:] + [IGNORE] * (T - len(a.ids) + 1)
    assert batch["targets"][1].tolist() == b.ids[1:] + [IGNORE]
    same = collate([b, b], pad_id=tok.pad_id)
    assert same["attention_mask"] is None and torch.equal(same["ids"][0], same["ids"][1])
