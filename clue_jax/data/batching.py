"""Deterministic, resumable batches from a tokenised array corpus.

`batch(step)` is a pure function of (seed, step): epoch e uses permutation
`rng(seed, e)`, and step s takes the s-th slice of the concatenated
epochs. The data position saved in a checkpoint is therefore just the
step, and a resumed run sees exactly the batches it would have seen.
Each process takes its own contiguous share of every global batch.
"""
from __future__ import annotations

import jax
import numpy as np

from clue_jax.errors import UserInputError


class ArrayBatchSource:
    def __init__(self, arrays: dict[str, np.ndarray], batch_size: int, seed: int = 0, shuffle: bool = True,
                 process_index: int | None = None, process_count: int | None = None):
        sizes = {k: len(v) for k, v in arrays.items()}
        if not sizes or len(set(sizes.values())) != 1:
            raise UserInputError(f"batch arrays must be non-empty and of equal length, got {sizes}")
        self.arrays = {k: np.asarray(v) for k, v in arrays.items()}
        self.num_examples = next(iter(sizes.values()))
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        if batch_size % self.process_count:
            raise UserInputError(
                f"batch_size={batch_size} is not divisible by the {self.process_count} processes"
            )

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_examples)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)

    def global_indices(self, step: int) -> np.ndarray:
        positions = step * self.batch_size + np.arange(self.batch_size)
        epochs, offsets = np.divmod(positions, self.num_examples)
        idx = np.empty(self.batch_size, dtype=np.int64)
        for epoch in np.unique(epochs):
            here = epochs == epoch
            idx[here] = self._order(int(epoch))[offsets[here]]
        return idx

    def batch(self, step: int) -> dict[str, np.ndarray]:
        idx = self.global_indices(step)
        per_host = self.batch_size // self.process_count
        mine = idx[self.process_index * per_host:(self.process_index + 1) * per_host]
        return {k: v[mine] for k, v in self.arrays.items()}

    def steps_per_epoch(self) -> int:
        return max(1, self.num_examples // self.batch_size)


class ConcatBatchSource:
    """Each global batch = rows from several sources side by side (e.g. new documents + replay).

    parts: [(arrays, rows)]. The first part's rows come first in the *global*
    batch, so a step can treat them differently (clue dropout acts on the new
    documents only); each process then takes its contiguous share.
    """

    def __init__(self, parts, seed: int = 0, process_index: int | None = None, process_count: int | None = None):
        self.sources = [ArrayBatchSource(arrays, rows, seed=seed + 7919 * i, process_index=0, process_count=1)
                        for i, (arrays, rows) in enumerate(parts)]
        keys = [set(src.arrays) for src in self.sources]
        if any(k != keys[0] for k in keys):
            raise UserInputError(f"batch sources have different keys: {[sorted(k) for k in keys]}")
        self.batch_size = sum(rows for _, rows in parts)
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        if self.batch_size % self.process_count:
            raise UserInputError(f"batch_size={self.batch_size} is not divisible by the {self.process_count} processes")

    def batch(self, step: int) -> dict[str, np.ndarray]:
        batches = [src.batch(step) for src in self.sources]
        per_host = self.batch_size // self.process_count
        lo = self.process_index * per_host
        return {k: np.concatenate([b[k] for b in batches])[lo:lo + per_host] for k in batches[0]}
