"""Deterministic, resumable batches from a tokenised array corpus, and their global arrays.

`batch(step, rows)` is a pure function of (seed, step): epoch e uses
permutation `rng(seed, e)`, and step s takes the s-th slice of the
concatenated epochs. The data position saved in a checkpoint is therefore
just the step, and a resumed run sees exactly the batches it would have seen.

Which rows of a global batch a process loads comes from the mesh, not from
its process index: `process_rows` asks the batch sharding which rows this
process's devices hold. When the `tensor` axis (or part of `fsdp`) spans
processes, several processes hold the same rows and each must load all of
them; a split by process index would give every tensor replica different
rows. `global_batch` builds the global arrays with their explicit shape and
refuses a per-process batch of the wrong size.
"""
from __future__ import annotations

import jax
import numpy as np

from clue_jax.errors import UserInputError
from clue_jax.parallel.rules import batch_sharding


def process_rows(mesh, batch_size: int) -> np.ndarray:
    """Sorted positions in a global batch of `batch_size` rows that this process's devices hold."""
    index_map = batch_sharding(mesh, 1).addressable_devices_indices_map((batch_size,))
    rows = set()
    for (rows_slice,) in index_map.values():
        rows.update(range(*rows_slice.indices(batch_size)))
    return np.asarray(sorted(rows), dtype=np.int64)


def global_batch(local: dict[str, np.ndarray], mesh, batch_size: int, rows: np.ndarray,
                 where: str = "batch") -> dict[str, jax.Array]:
    """Global [batch_size, ...] arrays, batch split over (data, fsdp), from this process's `rows` of them.

    `local[k]` must hold exactly the rows `rows` (from `process_rows`) in that
    order; anything else is refused, naming the mesh and the shapes.
    """
    out = {}
    for key, value in local.items():
        value = np.asarray(value)
        shape = (batch_size, *value.shape[1:])
        if value.ndim == 0 or value.shape[0] != len(rows):
            raise UserInputError(
                f"{where}: process {jax.process_index()} got batch[{key!r}] of shape {value.shape}, but on mesh "
                f"{dict(mesh.shape)} its devices hold {len(rows)} of the {batch_size} rows of the global batch "
                f"{shape}, so it needs shape {(len(rows), *value.shape[1:])}; a batch source must return the rows "
                f"it is given (batching.process_rows), not a share by process index"
            )
        out[key] = jax.make_array_from_process_local_data(batch_sharding(mesh, value.ndim), value, shape)
    return out


def rows_of(full: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
    """Global arrays from a batch that every process has whole (e.g. the scored corpus)."""
    n = len(next(iter(full.values())))
    rows = process_rows(mesh, n)
    return global_batch({k: np.asarray(v)[rows] for k, v in full.items()}, mesh, n, rows)


def _positions(rows, batch_size: int) -> np.ndarray:
    return np.arange(batch_size) if rows is None else np.asarray(rows, dtype=np.int64)


class ArrayBatchSource:
    def __init__(self, arrays: dict[str, np.ndarray], batch_size: int, seed: int = 0, shuffle: bool = True):
        sizes = {k: len(v) for k, v in arrays.items()}
        if not sizes or len(set(sizes.values())) != 1:
            raise UserInputError(f"batch arrays must be non-empty and of equal length, got {sizes}")
        self.arrays = {k: np.asarray(v) for k, v in arrays.items()}
        self.num_examples = next(iter(sizes.values()))
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle

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

    def batch(self, step: int, rows=None) -> dict[str, np.ndarray]:
        """Rows `rows` (positions in the global batch; default all) of global batch `step`."""
        mine = self.global_indices(step)[_positions(rows, self.batch_size)]
        return {k: v[mine] for k, v in self.arrays.items()}

    def steps_per_epoch(self) -> int:
        return max(1, self.num_examples // self.batch_size)


class ConcatBatchSource:
    """Each global batch = rows from several sources side by side (e.g. new documents + replay).

    parts: [(arrays, rows)]. The first part's rows come first in the *global*
    batch, so a step can treat them differently (clue dropout acts on the new
    documents only); a process loads, from each part, the positions it holds.
    """

    def __init__(self, parts, seed: int = 0):
        self.sources = [ArrayBatchSource(arrays, rows, seed=seed + 7919 * i) for i, (arrays, rows) in enumerate(parts)]
        keys = [set(src.arrays) for src in self.sources]
        if any(k != keys[0] for k in keys):
            raise UserInputError(f"batch sources have different keys: {[sorted(k) for k in keys]}")
        self.batch_size = sum(rows for _, rows in parts)
        self.offsets = np.cumsum([0] + [rows for _, rows in parts])

    def batch(self, step: int, rows=None) -> dict[str, np.ndarray]:
        positions = _positions(rows, self.batch_size)
        batches = []
        for src, lo, hi in zip(self.sources, self.offsets[:-1], self.offsets[1:]):
            here = positions[(positions >= lo) & (positions < hi)] - lo
            batches.append(src.batch(step, np.sort(here)))
        order = np.argsort(positions, kind="stable")  # parts come out in global order; restore `rows` order
        return {k: np.concatenate([b[k] for b in batches])[np.argsort(order)] for k in batches[0]}
