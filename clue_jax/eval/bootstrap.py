"""Paired bootstrap intervals: comparisons over people x seeds, and a mean against a chance level.

Three seeds' spread on the same people misses the larger uncertainty of
which people were drawn (a per-person EM over 70 people has a standard
error near 0.06). The paired bootstrap resamples both: people (the same
resampled people for both arms, so person effects cancel) and seeds (the
same resampled seeds for both arms). The interval is the percentile
interval of the resampled mean difference; a difference is called only when
the interval excludes 0.

scipy.stats.bootstrap resamples one axis (its `paired` draws the same
indices for several samples), so it gives the one-way interval of
`mean_interval`; the crossed seeds x people resampling of
`paired_difference` (rows and columns drawn independently) is not one of
its resampling schemes and is written here.
"""
from __future__ import annotations

import numpy as np
from scipy import stats

from clue_jax.errors import UserInputError


def _as_matrix(name: str, x) -> np.ndarray:
    a = np.asarray(x, np.float64)
    if a.ndim == 1:
        a = a[None]
    if a.ndim != 2 or a.size == 0:
        raise UserInputError(f"bootstrap: {name} must be [seeds, people], got shape {a.shape}")
    return a


def paired_difference(a, b, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> dict:
    """Mean of a - b over [seeds, people] with a two-way (seeds x people) paired bootstrap interval.

    a, b: per-(seed, person) scores of two arms, rows in the same seed order and
    columns in the same person order. Returns {"mean", "low", "high", "seeds", "people"}.
    """
    a, b = _as_matrix("a", a), _as_matrix("b", b)
    if a.shape != b.shape:
        raise UserInputError(f"bootstrap: paired arms must have equal shapes, got {a.shape} and {b.shape}")
    d = a - b
    s, p = d.shape
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, s, size=(n_boot, s))
    cols = rng.integers(0, p, size=(n_boot, p))
    # mean over the resampled grid = mean over resampled seeds of (mean over resampled people)
    per_seed = np.stack([d[:, c].mean(axis=1) for c in cols])  # [n_boot, s]
    means = np.take_along_axis(per_seed, rows, axis=1).mean(axis=1)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return {"mean": float(d.mean()), "low": float(low), "high": float(high), "seeds": s, "people": p}


def mean_interval(values, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> dict:
    """Mean of per-example values (e.g. share minus its chance level) with a percentile bootstrap interval over
    examples (scipy.stats.bootstrap)."""
    v = np.asarray(values, np.float64).reshape(-1)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"mean": float("nan"), "low": float("nan"), "high": float("nan"), "n": 0}
    if np.all(v == v[0]):  # every resample has this mean (scipy would warn of a degenerate distribution)
        return {"mean": float(v[0]), "low": float(v[0]), "high": float(v[0]), "n": int(v.size)}
    res = stats.bootstrap((v,), np.mean, n_resamples=n_boot, confidence_level=level, method="percentile",
                          rng=np.random.default_rng(seed))
    low, high = res.confidence_interval
    return {"mean": float(v.mean()), "low": float(low), "high": float(high), "n": int(v.size)}


def verdict(interval: dict, good: str, bad: str, unclear: str = "no clear difference") -> str:
    """Words for an interval: `good` above 0, `bad` below, `unclear` when it covers 0."""
    if not np.isfinite(interval["mean"]):
        return "not measured"
    if interval["low"] > 0:
        return good
    if interval["high"] < 0:
        return bad
    return unclear


def describe(interval: dict) -> str:
    """'+0.052 [+0.010, +0.095]'."""
    return f"{interval['mean']:+.3f} [{interval['low']:+.3f}, {interval['high']:+.3f}]"
