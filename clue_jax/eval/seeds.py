"""Reading a seed-paired difference: one rule for every report, so they all call a result the same way.

A comparison over seeds is summarised by the mean of the per-seed
differences and their sample std. A mean inside its std is not called a
gain or a loss; with one seed there is no spread, and the words say so.
"""
from __future__ import annotations

import math


def within_seed_spread(mean_diff: float, std: float, seeds: int) -> bool:
    """True when several seeds were run and the mean difference does not exceed its std."""
    return seeds > 1 and abs(mean_diff) <= std


def direction(mean_diff: float, std: float, seeds: int, good: str, bad: str,
              unclear: str = "no clear change") -> str:
    """`good`/`bad` by the sign of the mean difference, `unclear` inside the spread, with how it was judged."""
    if not math.isfinite(mean_diff):
        return "not measured"
    if within_seed_spread(mean_diff, std, seeds):
        return f"{unclear} (within the seed spread)"
    word = good if mean_diff > 0 else bad
    return word + (" (beyond the seed spread)" if seeds > 1 else " (one seed)")
