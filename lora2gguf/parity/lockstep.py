"""Views compared as they are made. verify's views are llama.cpp's logits (a context each, decoding a block of
positions at a time: llamacpp.runtime.LogitStream) and the reference's (its head applied to a block of its
final hidden states: parity.reference.Head). All of them advance together, a block at a time, and every
tally (parity.metrics) reads the block and lets it go: a view is never held whole. 700 positions of Gemma
3's 262k vocabulary are 734 MB per view, and verify has four to seven views."""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np

from lora2gguf.parity.metrics import SUB_ROWS, CarriedTally, PairTally, PerplexityTally, Rows

# float32 logits per block of one view; llama.cpp holds about two more of its own. On Gemma 3 F32 at 700
# tokens, peak PSS was 1.87 GB at 16 MB, 2.03-2.13 at 32, 2.30 at 64, at the same speed within noise
BLOCK_BYTES = 16 << 20


def block_rows(n_vocab: int) -> int:
    """Positions per block: a multiple of SUB_ROWS with at most BLOCK_BYTES of logits (Gemma 3: 16), at most
    256 (a 49k vocabulary: 80), at least SUB_ROWS."""
    rows = BLOCK_BYTES // (4 * max(n_vocab, 1)) // SUB_ROWS * SUB_ROWS
    return min(256, max(SUB_ROWS, rows))


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
            rows = {name: Rows(b[s: s + SUB_ROWS]) for name, b in blocks.items()}
            rows |= {alias: rows[name] for alias, name in self.aliases.items()}
            for name, t in self.perplexity.items():
                t.add(rows[name], start + s)
            for (p, q), t in self.pairs.items():
                t.add(rows[p], rows[q])
            if self.carried is not None:
                self.carried.add(*(rows[v] for v in self.carried_views))

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
