"""Training data: JSONL records → token ids and labels, with the GGUF's own tokenizer and chat template.

Records are `{"text": ...}`, `{"prompt": ..., "completion": ...}` or `{"messages": [{"role", "content"}]}`.
The loss covers every token of a text record, the completion of a prompt/completion record (plus EOS),
and the assistant turns of a conversation (with the template's end-of-turn marker). Labels are found by
rendering and tokenizing prefixes of the record and matching them against the whole record's tokens,
so no assumption is made about how a template or tokenizer joins pieces.

Batches are padded (right side) with an attention mask, never packed: each sequence attends only to
itself, exactly as at inference. The order of examples is a seeded permutation per epoch (`Order`), so a
run's data position is just its step number.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch

from .errors import Lora2GGUFError

IGNORE = -100
ROLES = ("system", "user", "assistant", "tool")
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


@dataclass
class Example:
    ids: list[int]
    labels: list[int]  # aligned with ids; IGNORE where no loss (the model predicts labels[t] from ids[:t])
    source: str = ""  # file:line of the record, for messages

    @property
    def n_trained(self) -> int:
        return sum(1 for x in self.labels[1:] if x != IGNORE)


class Tokenizer:
    """The GGUF's tokenizer through llama.cpp (vocab only) and its chat template."""

    def __init__(self, gguf_path: str | os.PathLike, template: str | None = None):
        from .gguf_file import GGUFFile
        from .runtime import LlamaRuntime

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
        from jinja2.exceptions import TemplateError
        from jinja2.ext import Extension
        from jinja2.sandbox import ImmutableSandboxedEnvironment

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


def read_jsonl(path: str | os.PathLike) -> list[tuple[str, dict]]:
    """[(\"file:line\", record)] for every non-blank line; any bad line is an error naming it."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise Lora2GGUFError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise Lora2GGUFError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:  # a directory, unreadable, ...
        raise Lora2GGUFError(f"{path}: cannot read it ({e.strerror or e}); expected a JSONL file") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise Lora2GGUFError(f"{where}: malformed JSON ({e.msg} at column {e.colno}); each line must be "
                                 "one JSON object") from None
        if not isinstance(rec, dict):
            raise Lora2GGUFError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        out.append((where, rec))
    if not out:
        raise Lora2GGUFError(f"{path}: no records (the file is empty); expected JSON lines with "
                             "\"text\", \"prompt\"/\"completion\" or \"messages\"")
    return out


def _need_str(rec: dict, key: str, where: str) -> str:
    if key not in rec:
        raise Lora2GGUFError(f"{where}: missing field {key!r}")
    if not isinstance(rec[key], str):
        raise Lora2GGUFError(f"{where}: field {key!r} must be a string, got {type(rec[key]).__name__}")
    return rec[key]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _check_messages(rec: dict, where: str) -> list[dict]:
    msgs = rec["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise Lora2GGUFError(f"{where}: 'messages' must be a non-empty list of {{\"role\", \"content\"}} objects")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise Lora2GGUFError(f"{where}: messages[{i}] must be an object with 'role' and 'content'")
        role = _need_str(m, "role", f"{where}: messages[{i}]")
        if role not in ROLES:
            raise Lora2GGUFError(f"{where}: messages[{i}] has unknown role {role!r}; expected one of "
                                 f"{', '.join(ROLES)}")
        _need_str(m, "content", f"{where}: messages[{i}]")
    if not any(m["role"] == "assistant" for m in msgs):
        raise Lora2GGUFError(f"{where}: no assistant message; the loss covers assistant turns only")
    return msgs


def _render(tok: Tokenizer, msgs: list[dict], where: str, add_generation_prompt: bool = False) -> str:
    try:
        return tok.render(msgs, add_generation_prompt)
    except Lora2GGUFError:
        raise
    except Exception as e:  # the template is data too: any failure in it is the input's
        raise Lora2GGUFError(f"{where}: the chat template failed on this conversation "
                             f"({type(e).__name__}: {e})") from None


def encode_record(rec: dict, tok: Tokenizer, where: str = "") -> Example:
    """One record → ids and labels (unmasked where the loss applies)."""
    eos = [tok.eos_id] if tok.eos_id is not None else []
    if "messages" in rec:
        msgs = _check_messages(rec, where)
        ids = tok.encode(_render(tok, msgs, where))
        labels = [IGNORE] * len(ids)
        for i, m in enumerate(msgs):
            if m["role"] == "assistant":  # its span: from after the generation prompt to the end of its turn
                start = _common_prefix(tok.encode(_render(tok, msgs[:i], where, add_generation_prompt=True)), ids)
                end = _common_prefix(tok.encode(_render(tok, msgs[: i + 1], where)), ids)
                labels[start:end] = ids[start:end]
        return Example(ids, labels, where)
    if "prompt" in rec or "completion" in rec:
        prompt, completion = _need_str(rec, "prompt", where), _need_str(rec, "completion", where)
        ids = tok.encode(prompt + completion) + eos
        start = _common_prefix(tok.encode(prompt), ids)
        return Example(ids, [IGNORE] * start + ids[start:], where)
    if "text" in rec:
        ids = tok.encode(_need_str(rec, "text", where)) + eos
        return Example(ids, list(ids), where)
    raise Lora2GGUFError(f"{where}: expected a \"text\", \"prompt\"+\"completion\" or \"messages\" field; "
                         f"found {', '.join(map(repr, rec)) or 'none'}")


def load_dataset(path: str | os.PathLike, tok: Tokenizer, seq_len: int, warn=print) -> list[Example]:
    """Every record of a JSONL file, truncated to seq_len tokens (counted in one warning)."""
    examples, truncated, empty = [], 0, 0
    for where, rec in read_jsonl(path):
        ex = encode_record(rec, tok, where)
        if len(ex.ids) > seq_len:
            truncated += 1
            ex = Example(ex.ids[:seq_len], ex.labels[:seq_len], where)
        if ex.n_trained == 0:
            empty += 1
            continue
        examples.append(ex)
    if truncated:
        warn(f"warning: {path}: {truncated} of {len(examples) + empty} sequences were longer than --seq-len "
             f"{seq_len} and were truncated")
    if empty:
        warn(f"warning: {path}: {empty} record(s) have no trained tokens within --seq-len {seq_len}; skipped")
    if not examples:
        raise Lora2GGUFError(f"{path}: no record has a token to train on within --seq-len {seq_len}")
    return examples


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor | None]:
    """Right-padded ids, labels shifted for next-token loss (IGNORE at padding), attention mask
    (None when no row is padded, so attention takes the plain causal path)."""
    T = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), T), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.ids)
        ids[i, :n] = torch.tensor(e.ids)
        targets[i, : n - 1] = torch.tensor(e.labels[1:])  # position t predicts token t+1
        mask[i, :n] = 1
    return {"ids": ids, "targets": targets, "attention_mask": None if bool(mask.all()) else mask}


class Order:
    """The data stream: epoch e visits the examples in a permutation seeded by (seed, e)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self._perms = n, seed, {}

    def __getitem__(self, pos: int) -> int:
        epoch = pos // self.n
        if epoch not in self._perms:
            self._perms = {epoch: torch.randperm(self.n, generator=torch.Generator().manual_seed(
                self.seed * 1_000_003 + epoch)).tolist()}
        return self._perms[epoch][pos % self.n]
