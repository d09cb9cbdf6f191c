"""spill: logits written to disk read back by rows as the metrics read them; every metric gives the same
numbers on a spilled view as on the array in memory."""

import numpy as np

from lora2gguf.parity.metrics import carried_fraction, compare, perplexity
from lora2gguf.parity.spill import SpilledLogits, spill


def test_spilled_logits_give_the_same_metrics(tmp_path):
    rng = np.random.default_rng(0)
    views = [(rng.standard_normal((37, 50_000)) * 3).astype(np.float32) for _ in range(4)]
    views[1] = views[0] + (0.05 * rng.standard_normal(views[0].shape)).astype(np.float32)
    on_disk = [spill(v, tmp_path / f"{i}.logits", limit=0) for i, v in enumerate(views)]
    assert all(isinstance(d, SpilledLogits) for d in on_disk)
    assert spill(views[0], tmp_path / "small.logits") is views[0]  # under the limit: kept in memory
    d = on_disk[2]
    assert np.array_equal(d[5:17], views[2][5:17]) and np.array_equal(d[-1], views[2][-1])
    assert np.array_equal(d[30:99], views[2][30:]) and len(d[40:50]) == 0 and len(d) == 37
    tokens = rng.integers(0, 50_000, 37)
    assert compare(on_disk[0], on_disk[1]) == compare(views[0], views[1])
    assert perplexity(on_disk[3], tokens) == perplexity(views[3], tokens)
    assert carried_fraction(*on_disk) == carried_fraction(*views)
    assert compare(views[0], views[1])["mean_kl"] > 1e-4  # the pair really differs
