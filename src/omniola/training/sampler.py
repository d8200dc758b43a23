"""The data order of a stage: a weighted mixture of sources, grouped by modality, fixed by the seed.

The whole order is a pure function of (source sizes, weights, number of samples, seed), so a resumed run
rebuilds it and skips the batches already trained on: no data-order state beyond the step count is needed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np


def mixture_probabilities(sizes: Sequence[int], weights: Sequence[float], modalities: Sequence[str],
                          sampling: str) -> np.ndarray:
    """Probability of drawing each source.

    `proportional`: size x weight (weight 1 everywhere = all data mixed as it comes, Ola's "direct mixing").
    `balanced`: every modality gets the same share, split among its sources by weight (Ola's "balanced sampling").
    """
    sizes = np.asarray(sizes, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    if sampling == "proportional":
        p = sizes * weights
    elif sampling == "balanced":
        groups = sorted(set(modalities))
        p = np.zeros(len(sizes))
        for g in groups:
            members = [i for i, m in enumerate(modalities) if m == g]
            total = weights[members].sum()
            for i in members:
                p[i] = weights[i] / total / len(groups)
    else:
        raise ValueError(f"unknown sampling {sampling!r}")
    p = np.where(sizes > 0, p, 0.0)
    return p / p.sum()


class MixtureBatchSampler:
    """Batches of global indices into a concatenation of sources.

    Each sample's source is drawn with `probabilities`; within a source, records come in a fresh random
    permutation per pass. Windows of `group_window` batches are sorted by `group_key(index)` (modality and
    length bucket) before being cut into batches, so a batch mixes as few modalities and lengths as possible,
    and the batches of a window are then shuffled.

    Args:
        offsets: Start of each source in the concatenation (`len(sizes)` values).
        sizes: Records per source.
        probabilities: Draw probability of each source.
        num_batches: Batches to produce.
        batch_size: Samples per batch (global: all processes together).
        seed: Fixes the order.
        group_key: Optional `index -> sortable` used for grouping.
        group_window: Batches per grouping window.
    """

    def __init__(
        self,
        offsets: Sequence[int],
        sizes: Sequence[int],
        probabilities: Sequence[float],
        num_batches: int,
        batch_size: int,
        seed: int,
        group_key: Callable[[int], object] | None = None,
        group_window: int = 16,
    ):
        self.batch_size = batch_size
        self.num_batches = num_batches
        self.drop_last = False
        rng = np.random.default_rng(seed)
        n = num_batches * batch_size
        choice = rng.choice(len(sizes), size=n, p=np.asarray(probabilities))
        cursors = [0] * len(sizes)
        perms: list[np.ndarray | None] = [None] * len(sizes)
        indices = np.empty(n, dtype=np.int64)
        for k, s in enumerate(choice):
            if perms[s] is None or cursors[s] == sizes[s]:
                perms[s], cursors[s] = rng.permutation(sizes[s]), 0
            indices[k] = offsets[s] + perms[s][cursors[s]]
            cursors[s] += 1
        batches = []
        step = group_window * batch_size
        for start in range(0, n, step):
            window = indices[start : start + step].tolist()
            if group_key is not None:
                window.sort(key=lambda i: (group_key(i), i))
            chunk = [window[i : i + batch_size] for i in range(0, len(window), batch_size)]
            order = rng.permutation(len(chunk)) if group_key is not None else range(len(chunk))
            batches.extend(chunk[j] for j in order)
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[int]]:
        return iter([list(b) for b in self.batches])
