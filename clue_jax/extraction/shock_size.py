"""The size of a frequency shock, with a bootstrap interval over people x seeds.

Rank statistics say whether predictions follow the fine-tuning skew, not
how far. The size measure compares, within each pre-training frequency
stratum (where the skew drew its objects at random), the log over-prediction
y(o) = log((predicted(o) + s) / (gold(o) + s)) of the objects fine-tuning
over-sampled with that of the objects it left out:
  size(stratum) = mean y over over-sampled objects - mean y over left-out objects,
and the overall size is the mean over strata holding both kinds. 0 is no
shock; the knowledge-free sampler of the fine-tuning answers marks the most a
model without knowledge shows, the prior sampler none. The interval resamples
people and seeds (rows and columns independently, as
eval/bootstrap.paired_difference does); objects are those gold or predicted
on the full test set, so a resample keeps the same objects.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from clue_jax.extraction.shock import entity_key

LABELS = ("left_out", "oversampled")


def _objects(stratum: Mapping[str, Mapping[str, int]], label: Mapping[str, Mapping[str, str]]):
    """[(relation, entity key, stratum, label)] of the left-out and over-sampled objects."""
    return [(rel, entity_key(o), int(stratum[rel][o]), lab) for rel, objs in label.items() for o, lab in objs.items()
            if lab in LABELS]


def count_tensor(test_items, preds_by_seed: Mapping[str, Sequence[str]], objects) -> tuple[np.ndarray, list[str]]:
    """counts[seed, person, object, (predicted, gold)] and the people's order."""
    people = sorted({it.name for it in test_items})
    p_index = {n: i for i, n in enumerate(people)}
    o_index = {(rel, key): j for j, (rel, key, _, _) in enumerate(objects)}
    seeds = sorted(preds_by_seed)
    counts = np.zeros((len(seeds), len(people), len(objects), 2), np.float64)
    for s, seed in enumerate(seeds):
        for it, pred in zip(test_items, preds_by_seed[seed]):
            p = p_index[it.name]
            for value, field in ((pred, 0), (it.answer, 1)):
                j = o_index.get((it.attribute, entity_key(value)))
                if j is not None:
                    counts[s, p, j, field] += 1
    return counts, people


def _sizes(counts: np.ndarray, strata: np.ndarray, labels: np.ndarray, smoothing: float) -> np.ndarray:
    """Per-stratum sizes [..., strata] from counts [..., objects, 2] (NaN where a stratum lacks either label)."""
    y = np.log((counts[..., 0] + smoothing) / (counts[..., 1] + smoothing))
    out = []
    for st in range(int(strata.max()) + 1 if strata.size else 0):
        over, left = (strata == st) & (labels == 1), (strata == st) & (labels == 0)
        if over.any() and left.any():
            out.append(y[..., over].mean(axis=-1) - y[..., left].mean(axis=-1))
        else:
            out.append(np.full(y.shape[:-1], np.nan))
    return np.stack(out, axis=-1) if out else np.zeros(y.shape[:-1] + (0,))


def shock_size(test_items, preds_by_seed: Mapping[str, Sequence[str]], skew: Mapping, smoothing: float = 1.0,
               n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> dict:
    """The shock size per stratum and overall, each {"mean", "low", "high"}, for one predictor over seeds.

    preds_by_seed: {seed: predictions for test_items}; skew: finetune_data.skewed_finetune_items' description
    (its "stratum" and "label" maps). The point value sums counts over all people per seed and averages seeds."""
    objects = _objects(skew["stratum"], skew["label"])
    counts, _ = count_tensor(test_items, preds_by_seed, objects)
    seen = counts.sum(axis=(0, 1)).sum(axis=-1) > 0  # gold or predicted somewhere on the test set
    counts = counts[:, :, seen]
    strata = np.array([o[2] for o, k in zip(objects, seen) if k], np.int64)
    labels = np.array([LABELS.index(o[3]) for o, k in zip(objects, seen) if k], np.int64)
    point = _sizes(counts.sum(axis=1), strata, labels, smoothing).mean(axis=0)  # [strata]
    n_seeds, n_people = counts.shape[:2]
    rng = np.random.default_rng(seed)
    # A resample: people drawn with replacement (as multiplicity weights), then seeds drawn with replacement.
    weights = np.stack([np.bincount(rng.integers(0, n_people, n_people), minlength=n_people) for _ in range(n_boot)])
    per_seed = np.einsum("bp,spoc->bsoc", weights.astype(np.float64), counts)
    rows = rng.integers(0, n_seeds, size=(n_boot, n_seeds))
    boot = _sizes(per_seed, strata, labels, smoothing)  # [n_boot, seeds, strata]
    boot = np.take_along_axis(boot, rows[..., None], axis=1).mean(axis=1)  # [n_boot, strata]
    tail = (1.0 - level) / 2.0

    def interval(values: np.ndarray, value: float) -> dict:
        values = values[np.isfinite(values)]
        if not math.isfinite(value) or not values.size:
            return {"mean": math.nan, "low": math.nan, "high": math.nan}
        low, high = np.quantile(values, [tail, 1.0 - tail])
        return {"mean": float(value), "low": float(low), "high": float(high)}

    both = np.isfinite(point)
    overall = float(point[both].mean()) if both.any() else math.nan
    return {"strata": {str(st): interval(boot[:, st], float(point[st])) for st in range(point.size)},
            "overall": interval(np.nanmean(boot[:, both], axis=1) if both.any() else np.array([]), overall),
            "smoothing": float(smoothing), "seeds": n_seeds, "people": n_people}
