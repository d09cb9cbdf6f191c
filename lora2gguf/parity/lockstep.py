"""Views compared as they are made. verify's views are llama.cpp's logits (a context each, decoding a block of
positions at a time: llamacpp.runtime.LogitStream) and the reference's (its head applied to a block of its
final hidden states: parity.reference.Head). All of them advance together, a block at a time, and every
tally (parity.metrics) reads the block and lets it go: a view is never held whole. 700 positions of Gemma
3's 262k vocabulary are 734 MB per view, and verify has four to seven views."""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Iterator

import numpy as np

from lora2gguf.parity.metrics import SUB_ROWS, CarriedTally, PairTally, PerplexityTally, Rows

# float32 logits per block of one view. On Gemma 3 F32 at 700 tokens, peak PSS was 1.87 GB at 16 MB,
# 2.03-2.13 at 32, 2.30 at 64 (when llama.cpp decoded one block at a time; now DECODE_BYTES at a time)
BLOCK_BYTES = 16 << 20
# float32 logits per llama.cpp decode (a context holds about two such buffers), cut into blocks: each decode
# reads every weight, so fewer decodes are faster (see llamacpp.runtime.LogitStream)
DECODE_BYTES = 32 << 20


def decode_rows(n_vocab: int) -> int:
    """Positions per llama.cpp decode: a multiple of block_rows with at most DECODE_BYTES of logits, at most
    256 positions unless one block is more."""
    rows = block_rows(n_vocab)
    return rows * max(1, min(DECODE_BYTES // (4 * max(n_vocab, 1)), 256) // rows)


def block_rows(n_vocab: int) -> int:
    """Positions per block: a multiple of SUB_ROWS with at most BLOCK_BYTES of logits (Gemma 3: 16), at most
    256 (a 49k vocabulary: 80), at least SUB_ROWS."""
    rows = BLOCK_BYTES // (4 * max(n_vocab, 1)) // SUB_ROWS * SUB_ROWS
    return min(256, max(SUB_ROWS, rows))


@functools.cache
def _pool() -> ThreadPoolExecutor:
    """numpy computes a call on one thread and lets go of the GIL on these arrays: the views' normalizers and
    the tallies run side by side (on Gemma 3 at 700 tokens they were 8 of verify's 31 s, on one core)."""
    return ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="tallies")


class Tallies:
    """What verify measures on its views: each view's perplexity, the pairs asked for (PairTally), and
    optionally the carried fraction of (base_reference, reference, base_alone, merged). `aliases`: a view
    that is another one's logits under a second name (the base alone when the merged file has its type)."""

    def __init__(self, views: Iterable[str], tokens, pairs: Iterable[tuple[str, str]],
                 carried: tuple[str, str, str, str] | None = None, aliases: dict[str, str] | None = None):
        self.aliases = dict(aliases or {})
        self.perplexity = {v: PerplexityTally(tokens) for v in views}
        self.pairs = {pq: PairTally() for pq in pairs}
        self.carried_views, self.carried = carried, CarriedTally() if carried else None

    def add(self, start: int, blocks: dict[str, np.ndarray]) -> None:
        """One block of every view, its first position `start` (a multiple of SUB_ROWS)."""
        n = len(next(iter(blocks.values())))
        for s in range(0, n, SUB_ROWS):
            made = _pool().map(Rows, [b[s: s + SUB_ROWS] for b in blocks.values()])
            rows = dict(zip(blocks, made))
            rows |= {alias: rows[name] for alias, name in self.aliases.items()}
            # each task feeds one tally, so every tally gets its rows in order, whichever thread runs it
            tasks = [(t.add, rows[name], start + s) for name, t in self.perplexity.items()]
            tasks += [(t.add, rows[p], rows[q]) for (p, q), t in self.pairs.items()]
            if self.carried is not None:
                tasks.append((self.carried.add, *(rows[v] for v in self.carried_views)))
            for f in [_pool().submit(*task) for task in tasks]:
                f.result()

    def pair(self, p: str, q: str) -> PairTally:
        return self.pairs[p, q]


def run(streams: dict[str, Iterable[np.ndarray]], tallies: Tallies, n_positions: int) -> None:
    """Advance every stream a block at a time, feeding each block of all views to the tallies."""
    its: dict[str, Iterator[np.ndarray]] = {k: iter(v) for k, v in streams.items()}
    start = 0
    while start < n_positions:
        blocks = {k: next(it) for k, it in its.items()}
        sizes = {len(b) for b in blocks.values()}
        if len(sizes) != 1:
            raise RuntimeError(f"views gave blocks of different sizes at position {start}: {sizes}")
        tallies.add(start, blocks)
        start += sizes.pop()
