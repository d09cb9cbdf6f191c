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

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from lora2gguf.errors import Lora2GGUFError
from lora2gguf.llamacpp.tokenizer import ROLES, Tokenizer

IGNORE = -100


@dataclass
class Example:
    ids: list[int]
    labels: list[int]  # aligned with ids; IGNORE where no loss (the model predicts labels[t] from ids[:t])
    source: str = ""  # file:line of the record, for messages

    @property
    def n_trained(self) -> int:
        return sum(1 for x in self.labels[1:] if x != IGNORE)


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


def calibration_sequences(path: str | os.PathLike, tok: Tokenizer, n_ctx: int = 512) -> list[list[int]]:
    """Token sequences to measure an importance matrix on. A .jsonl file: each record in the train formats,
    rendered and tokenized as training sees it (every token, not only the trained ones), cut to n_ctx. Any
    other file: plain text, tokenized whole and cut into chunks of n_ctx tokens, each starting with BOS,
    as llama-imatrix reads its text file."""
    path = Path(path)
    if path.suffix.lower() in (".jsonl", ".json"):
        seqs = [encode_record(rec, tok, where).ids[:n_ctx] for where, rec in read_jsonl(path)]
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise Lora2GGUFError(f"{path}: no such file") from None
        except (OSError, UnicodeDecodeError) as e:
            raise Lora2GGUFError(f"{path}: cannot read it as UTF-8 text ({e}); expected text or JSONL") from None
        ids = tok.rt.tokenize(text, add_bos=False, special=False)
        bos = [tok.bos_id] if tok.bos_id is not None else []
        step = n_ctx - len(bos)
        seqs = [bos + ids[i:i + step] for i in range(0, len(ids), step)]
    seqs = [s for s in seqs if len(s) > 1]
    if not seqs:
        raise Lora2GGUFError(f"{path}: no text to measure an importance matrix on")
    return seqs
