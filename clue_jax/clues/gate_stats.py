"""The calibrated teacher gate: does the contrast mark the target tokens beyond seed noise? (docs/methods.md)

A teacher pair's contrast d = s_large - s_small is what clue dropout ranks by.
Whether it marks the tokens the questions rely on ("targets": a person's name,
or a document's words that its question repeats) is measured two ways:

- `method_statistic`: d ranked exactly as the method ranks it
  (`dropout.contrast`, `dropout.descending_rank`: one definition); per
  document the share of targets among the top-k ranks and the targets' mean
  rank / (length - 1) (0 = first, 1 = last), against chance (the targets'
  share among all ranked tokens; a mean rank of 0.5).
- `far_query_statistic`: from one query far from the targets, the attention
  mass the large teacher puts on them minus the small teacher's (chance: 0).

Two teachers of one size and recipe but different seeds already differ, and
by as much as the effects asked about; a bootstrap over the documents of one
pair cannot see that. So `calibrate` compares the statistic of every
large/small seed pair with the same statistic of every same-size pair
(small/small, large/large, both orders): a permutation test over pairs.
`passed` is True only beyond that null at `level` AND beyond chance; with one
seed per size there is no null and `passed` is None, never True. The pairs
share models, so the pair values are not independent: the p-value is a
screen, not an exact error rate.
"""
from __future__ import annotations

import itertools
from typing import Callable, Sequence

import numpy as np

from clue_jax.clues import dropout
from clue_jax.errors import UserInputError

MAX_EXACT_PERMUTATIONS = 20000


def _matrix(name: str, x, shape=None) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 2 or (shape is not None and a.shape != shape):
        raise UserInputError(f"gate: {name} must be [documents, length]{f' {shape}' if shape else ''}, got {a.shape}")
    return a


def method_ranks(s_large, s_small, attention_mask) -> np.ndarray:
    """int [N, T]: each token's contrast rank as clue dropout computes it (0 = largest d; padding last)."""
    d = dropout.contrast(np.asarray(s_large, np.float32), np.asarray(s_small, np.float32))
    return np.asarray(dropout.descending_rank(d, np.asarray(attention_mask, np.int32)))


def method_statistic(s_large, s_small, attention_mask, target_mask, k: int = 10) -> dict:
    """Targets among the top-k contrast ranks and their mean normalised rank, per document and averaged.

    Documents without a target (or with fewer than 2 real tokens) are left out (NaN per document).
    """
    if k < 1:
        raise UserInputError(f"gate: k must be >= 1, got {k}")
    large = _matrix("s_large", s_large)
    mask = _matrix("attention_mask", attention_mask, large.shape) > 0
    targets = _matrix("target_mask", target_mask, large.shape).astype(bool) & mask
    ranks = method_ranks(large, _matrix("s_small", s_small, large.shape), mask)
    n = mask.sum(-1)
    ok = (targets.sum(-1) > 0) & (n > 1)
    share, rank, chance = (np.full(len(n), np.nan) for _ in range(3))
    top = (ranks < np.minimum(k, n)[:, None]) & mask
    share[ok] = (top & targets).sum(-1)[ok] / np.minimum(k, n)[ok]
    norm = ranks / np.maximum(n - 1, 1)[:, None]
    rank[ok] = np.where(targets, norm, 0.0).sum(-1)[ok] / targets.sum(-1)[ok]
    chance[ok] = targets.sum(-1)[ok] / n[ok]
    return {"k": k, "documents": int(ok.sum()), "top_k_share": _mean(share), "chance": _mean(chance),
            "mean_rank": _mean(rank), "chance_rank": 0.5,
            "per_document": {"top_k_share": share, "mean_rank": rank, "chance": chance}}


def far_query_statistic(row_large, row_small, target_mask, query_index) -> dict:
    """From query q of each document: attention mass on the targets before q, large minus small (chance 0).

    row_large, row_small: [N, T] mean attention rows of q (`scoring.attention_from_query`).
    Documents without a target before q are left out.
    """
    large = _matrix("row_large", row_large)
    small = _matrix("row_small", row_small, large.shape)
    q = np.broadcast_to(np.asarray(query_index).reshape(-1), large.shape[:1])
    before = np.arange(large.shape[1])[None, :] < q[:, None]
    targets = _matrix("target_mask", target_mask, large.shape).astype(bool) & before
    ok = targets.sum(-1) > 0
    mass = np.full(len(q), np.nan)
    mass[ok] = np.where(targets, large - small, 0.0).sum(-1)[ok]
    return {"documents": int(ok.sum()), "mass_difference": _mean(mass), "chance": 0.0, "per_document": mass}


def _mean(x) -> float:
    x = np.asarray(x, np.float64)
    return float(np.nanmean(x)) if np.isfinite(x).any() else float("nan")


def seed_pairs(n_large: int, n_small: int) -> dict[str, list[tuple[tuple[str, int], tuple[str, int]]]]:
    """(first, second) teacher pairs: "cross" large_i/small_j; "null" every ordered same-size pair."""
    cross = [(("large", i), ("small", j)) for i in range(n_large) for j in range(n_small)]
    null = [((size, a), (size, b)) for size, n in (("small", n_small), ("large", n_large))
            for a, b in itertools.permutations(range(n), 2)]
    return {"cross": cross, "null": null}


def permutation_p(cross: Sequence[float], null: Sequence[float], n_permutations: int = 10000,
                  seed: int = 0) -> float:
    """P(mean(cross) - mean(null) at least as large when the pair labels are shuffled), one-sided.

    Exact (every relabelling) when there are at most MAX_EXACT_PERMUTATIONS of them, else
    `n_permutations` random ones plus the observed labelling.
    """
    cross, null = np.asarray(cross, np.float64), np.asarray(null, np.float64)
    if not cross.size or not null.size:
        raise UserInputError("gate: a permutation test needs at least one cross pair and one same-size pair")
    values = np.concatenate([cross, null])
    m, total = len(cross), values.sum()
    observed = cross.mean() - null.mean()

    def gap(cross_sum):
        return cross_sum / m - (total - cross_sum) / (len(values) - m)

    tol = 1e-12 * max(1.0, np.abs(values).max())
    from math import comb

    if comb(len(values), m) <= MAX_EXACT_PERMUTATIONS:
        sums = np.array([values[list(c)].sum() for c in itertools.combinations(range(len(values)), m)])
        return float(np.mean(gap(sums) >= observed - tol))
    rng = np.random.default_rng(seed)
    sums = np.array([values[rng.permutation(len(values))[:m]].sum() for _ in range(n_permutations)])
    return float((1 + np.sum(gap(sums) >= observed - tol)) / (n_permutations + 1))


def calibrate(statistic: Callable[[object, object], float], large: Sequence, small: Sequence, chance: float,
              level: float = 0.05, higher_is_more: bool = True) -> dict:
    """The statistic of every large/small pair against every same-size pair, and the verdict.

    statistic(first, second) -> float for teachers' outputs `first` (in the large role) and `second`;
    `chance` is its value for a contrast blind to the targets; `higher_is_more`: False for a
    statistic where smaller means more target-favouring (a mean rank).
    Returns {statistic (mean over cross pairs), cross, null, pairs, chance, p, level, passed, reason}.
    """
    if not large or not small:
        raise UserInputError("gate: needs at least one large and one small teacher")
    pairs = seed_pairs(len(large), len(small))
    outputs = {"large": list(large), "small": list(small)}
    values = {kind: [float(statistic(outputs[a][i], outputs[b][j])) for (a, i), (b, j) in pairs[kind]]
              for kind in pairs}
    observed = _mean(values["cross"])
    sign = 1.0 if higher_is_more else -1.0
    out = {"statistic": observed, "cross": values["cross"], "null": values["null"], "chance": float(chance),
           "higher_is_more": higher_is_more, "level": level, "pairs": {k: [[f"{a}{i}", f"{b}{j}"] for (a, i), (b, j) in v] for k, v in pairs.items()}}
    beyond_chance = bool(sign * (observed - chance) > 0)
    if not values["null"]:
        return {**out, "p": None, "passed": None, "beyond_chance": beyond_chance,
                "reason": "one seed per size: no same-size pair, so no null; give two or more seeds per size"}
    p = permutation_p(sign * np.array(values["cross"]), sign * np.array(values["null"]))
    passed = bool(p <= level and beyond_chance)
    reason = ("beyond the same-size null and beyond chance" if passed else
              "not beyond the same-size null" if p > level else "beyond the null but not beyond chance")
    return {**out, "p": p, "passed": passed, "beyond_chance": beyond_chance, "reason": reason}


def negative_control(statistic: Callable[[object, object], float], large: Sequence, untrained: Sequence,
                     calibrated: dict) -> dict:
    """Each large teacher against a random-init small one: what "trained minus untrained" alone gives.

    A real pair whose statistic does not exceed this control's may be measuring training, not size.
    """
    values = [float(statistic(a, b)) for a in large for b in untrained]
    control = _mean(values)
    sign = 1.0 if calibrated["higher_is_more"] else -1.0
    return {"values": values, "statistic": control,
            "pair_exceeds_control": bool(sign * (calibrated["statistic"] - control) > 0)}


def verdict(checks: dict[str, dict]) -> tuple[bool | None, str]:
    """All measured checks passed -> True; any failed -> False; any without a null -> None (with why)."""
    measured = {k: c for k, c in checks.items() if c is not None}
    if not measured:
        return None, "nothing measured"
    if any(c["passed"] is False for c in measured.values()):
        return False, "; ".join(f"{k}: {c['reason']}" for k, c in measured.items() if c["passed"] is False)
    if any(c["passed"] is None for c in measured.values()):
        return None, next(c["reason"] for c in measured.values() if c["passed"] is None)
    return True, "every statistic beyond the same-size null and beyond chance"
