"""Arms' results over fine-tuning seeds: mean and sample std of every metric, paired differences seed by seed."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np


def _flatten(value, prefix: str = "") -> dict[str, float]:
    out = {}
    if isinstance(value, Mapping):
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}{k}."))
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        out[prefix[:-1]] = float(value)
    return out


def _unflatten(flat: Mapping[str, float]) -> dict:
    out: dict = {}
    for key, v in flat.items():
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v
    return out


def mean_std(runs: Sequence[Mapping]) -> dict:
    """{"mean", "std", "n"} over runs, for every numeric leaf (NaNs ignored; std is 0 for a single run)."""
    flats = [_flatten(r) for r in runs]
    keys = sorted(set().union(*flats)) if flats else []
    mean, std = {}, {}
    for k in keys:
        vals = np.array([f.get(k, math.nan) for f in flats], dtype=np.float64)
        finite = vals[np.isfinite(vals)]
        mean[k] = float(finite.mean()) if len(finite) else math.nan
        std[k] = float(finite.std(ddof=1)) if len(finite) > 1 else (0.0 if len(finite) else math.nan)
    return {"mean": _unflatten(mean), "std": _unflatten(std), "n": len(runs)}


def get(tree: Mapping, path: str, default=math.nan):
    node = tree
    for p in path.split("."):
        if not isinstance(node, Mapping) or p not in node:
            return default
        node = node[p]
    return default if node is None else node  # a NaN saved to summary.json reads back as null


def paired_difference(summary: Mapping, arm: str, ref: str, path: str) -> tuple[float, float, int]:
    """Mean and std over seeds of (arm - ref) for one metric, seed by seed; the base arm counts for every seed."""
    arms = summary["arms"]
    if arm not in arms or ref not in arms:
        return math.nan, math.nan, 0
    diffs = []
    for seed in summary["seeds"]:
        a = arms[arm]["per_seed"].get(str(seed), arms[arm]["per_seed"].get("-"))
        b = arms[ref]["per_seed"].get(str(seed), arms[ref]["per_seed"].get("-"))
        if a is None or b is None:
            continue
        x, y = get(a, path), get(b, path)
        if math.isfinite(x) and math.isfinite(y):
            diffs.append(x - y)
    if not diffs:
        return math.nan, math.nan, 0
    d = np.asarray(diffs)
    return float(d.mean()), float(d.std(ddof=1)) if len(d) > 1 else 0.0, len(d)
