"""The GGUF's own tokenizer through llama.cpp (vocab only) and its chat template, rendered as transformers'
apply_chat_template renders it (a sandboxed Jinja environment). Training and verify both tokenize here, so
that what an adapter is trained and checked on are the tokens llama.cpp makes when serving."""

from __future__ import annotations

import contextlib
import io
import json
import os
from datetime import datetime
from pathlib import Path

from jinja2.exceptions import TemplateError
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lora2gguf.errors import Lora2GGUFError
from lora2gguf.fileio.gguf_read import GGUFFile
from lora2gguf.llamacpp.runtime import LlamaRuntime

ROLES = ("system", "user", "assistant", "tool")
# Templates a user can name with --chat-template for a base whose GGUF carries none (pretrained bases such as
# Gemma 3 270M, the test fixtures): a conversation is never rendered in a format nobody chose.


# Templates a user can name with --chat-template for a base whose GGUF carries none (pretrained bases such as
# Gemma 3 270M, the test fixtures): a conversation is never rendered in a format nobody chose.
CHAT_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
        "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"),
    # Gemma's turn markers (<start_of_turn>, <end_of_turn> are tokens of every Gemma vocabulary); the system
    # prompt goes before the first user turn, as Gemma's own template puts it. No {{ bos_token }}: encoding
    # adds BOS as the model's tokenizer says (Gemma's own template writes it and llama.cpp then warns).
    "gemma": (
        "{% if messages[0]['role'] == 'system' %}{% set first = messages[0]['content'] + '\n\n' %}"
        "{% set msgs = messages[1:] %}{% else %}{% set first = '' %}{% set msgs = messages %}{% endif %}"
        "{% for message in msgs %}{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else "
        "message['role']) + '\n' + (first if loop.first else '') + message['content'] + '<end_of_turn>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"),
}


DEFAULT_CHAT_TEMPLATE = CHAT_TEMPLATES["chatml"]


def chat_template(name_or_path: str) -> str:
    """--chat-template: a name from CHAT_TEMPLATES or a Jinja file."""
    if name_or_path in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[name_or_path]
    p = Path(name_or_path)
    try:
        return p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise Lora2GGUFError(f"--chat-template {name_or_path}: neither {' nor '.join(CHAT_TEMPLATES)} nor a readable "
                             f"Jinja file ({type(e).__name__})") from None


class Tokenizer:
    """The GGUF's tokenizer through llama.cpp (vocab only) and its chat template."""
    def __init__(self, gguf_path: str | os.PathLike, template: str | None = None):
        self.path = Path(gguf_path)
        with GGUFFile(self.path) as f:
            if f.get("general.type") == "adapter":
                raise Lora2GGUFError(f"{self.path}: this is a LoRA adapter, not a base model; pass the base GGUF")
            tokens = f.get("tokenizer.ggml.tokens")
            if tokens is None:
                raise Lora2GGUFError(f"{self.path}: no tokenizer in this GGUF; pass --tokenizer with a GGUF "
                                     "of the same model")
            if isinstance(tokens, str) or not hasattr(tokens, "__len__") or not len(tokens):
                raise Lora2GGUFError(f"{self.path}: metadata tokenizer.ggml.tokens is not a list of tokens; "
                                     "the file is corrupt")
            self.template = chat_template(template) if template else f.string("tokenizer.chat_template")
            ids = {}
            for what in ("bos", "eos", "padding"):
                key = f"tokenizer.ggml.{what}_token_id"
                ids[what] = f.number(key, None, int)
                if ids[what] is not None and not 0 <= ids[what] < len(tokens):
                    raise Lora2GGUFError(f"{self.path}: metadata {key} is {ids[what]}, outside the vocabulary of "
                                         f"{len(tokens)} tokens; the file is corrupt")
            self.bos_id, self.eos_id = ids["bos"], ids["eos"]
            self.bos_token = str(tokens[self.bos_id]) if self.bos_id is not None else ""
            self.eos_token = str(tokens[self.eos_id]) if self.eos_id is not None else ""
            self.n_vocab = len(tokens)
            pad = ids["padding"]
        self.pad_id = int(pad if pad is not None else (self.eos_id or 0))
        # llama-cpp-python prints a context-size warning through sys.stderr even when quiet: irrelevant here
        with contextlib.redirect_stderr(io.StringIO()):
            self.rt = LlamaRuntime(self.path, vocab_only=True)

    def encode(self, text: str) -> list[int]:
        """Tokens as llama.cpp makes them for serving: BOS if the model adds one, special tokens parsed."""
        ids = self.rt.tokenize(text, add_bos=True, special=True)
        if len(ids) >= 2 and ids[0] == ids[1] == self.bos_id:  # the template wrote BOS itself
            ids = ids[1:]
        return ids

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        if self.template is None:
            raise Lora2GGUFError(f"{self.path}: has no chat template (tokenizer.chat_template), so a conversation has "
                                 f"no format to train or prompt in; pass --chat-template ({', '.join(CHAT_TEMPLATES)} "
                                 "or a Jinja file), or write prompt/completion records")
        return render_chat(self.template, messages, add_generation_prompt, self.bos_token, self.eos_token)

    def close(self) -> None:
        self.rt.close()


def open_tokenizer(base: str, tokenizer: str | None = None, template: str | None = None) -> Tokenizer:
    """The tokenizer of --tokenizer, else of the base GGUF (an HF-directory base has no GGUF tokenizer)."""
    path = tokenizer or base
    if Path(path).is_dir() or Path(path).name == "config.json":
        raise Lora2GGUFError(f"{base}: a Hugging Face directory has no GGUF tokenizer; pass --tokenizer "
                             "MODEL.gguf (the GGUF you will serve) so training sees the tokens llama.cpp makes")
    if not Path(path).is_file():
        raise Lora2GGUFError(f"{path}: no such file")
    return Tokenizer(path, template)


_ENV = None


_COMPILED: dict = {}


def _environment():
    """A sandboxed Jinja environment set up as transformers' apply_chat_template sets it up."""
    global _ENV
    if _ENV is None:
        class GenerationTag(Extension):  # HF's {% generation %}...{% endgeneration %}: render the body as is
            tags = {"generation"}

            def parse(self, parser):
                parser.stream.skip(1)
                return parser.parse_statements(("name:endgeneration",), drop_needle=True)

        def raise_exception(msg):
            raise TemplateError(msg)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        _ENV = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                             extensions=[GenerationTag, "jinja2.ext.loopcontrols"])
        _ENV.filters["tojson"] = tojson
        _ENV.globals["raise_exception"] = raise_exception
        _ENV.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return _ENV


def render_chat(template: str, messages: list[dict], add_generation_prompt: bool, bos_token: str = "",
                eos_token: str = "") -> str:
    """Render a conversation with a chat template, like transformers' apply_chat_template."""
    if template not in _COMPILED:
        _COMPILED[template] = _environment().from_string(template)
    return _COMPILED[template].render(
        messages=messages, add_generation_prompt=add_generation_prompt, bos_token=bos_token, eos_token=eos_token)
