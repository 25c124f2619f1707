"""Course soups: average the weights of models trained with different course mixes.

docs/methods.md, "MCL": ingredients share a start (one warm-up checkpoint) and
differ in which self-correction losses they used; their weights are averaged
uniformly, with weights (e.g. from dev scores), or greedily (Wortsman et al.
2022, "Model soups"). Everything works on any pytree: nnx.State, nested dicts
of arrays, lists.

Leaves are averaged in float32 and cast back to the first ingredient's dtype,
so bf16 weights do not lose precision in the sum. Leaves that are not floating
point (integer step or RNG counters, typed PRNG keys) cannot be averaged: they
are taken from the first ingredient.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from clue_jax.errors import UserInputError

PyTree = Any

__all__ = ["check_compatible", "uniform_soup", "weighted_soup", "score_weights", "greedy_soup", "GreedySoup", "GreedyScores"]


def _is_float(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        return isinstance(x, float)
    return jnp.issubdtype(dtype, jnp.floating) and not jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def check_compatible(param_trees: Sequence[PyTree]) -> None:
    """Raise UserInputError naming the first path where an ingredient's structure or shape differs from the first's."""
    if len(param_trees) == 0:
        raise UserInputError("soup: no ingredients given")
    ref_leaves, ref_def = jax.tree_util.tree_flatten_with_path(param_trees[0])
    ref_paths = [jax.tree_util.keystr(p) for p, _ in ref_leaves]
    for idx, tree in enumerate(param_trees[1:], start=1):
        leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
        paths = [jax.tree_util.keystr(p) for p, _ in leaves]
        if paths != ref_paths or treedef != ref_def:
            missing = next(((a, b) for a, b in itertools.zip_longest(ref_paths, paths) if a != b), None)
            if missing is None:  # same leaf paths but different node types (e.g. dict vs State)
                raise UserInputError(f"soup: ingredient {idx} has a different tree type than ingredient 0 ({treedef} vs {ref_def})")
            a, b = missing
            raise UserInputError(
                f"soup: ingredient {idx} differs in structure from ingredient 0 at path {a or b}"
                f" (ingredient 0 has {a or 'nothing'}, ingredient {idx} has {b or 'nothing'})"
            )
        for path, (_, ref), (_, leaf) in zip(paths, ref_leaves, leaves):
            if jnp.shape(ref) != jnp.shape(leaf):
                raise UserInputError(
                    f"soup: ingredient {idx} has shape {jnp.shape(leaf)} at path {path},"
                    f" ingredient 0 has {jnp.shape(ref)}"
                )
            if _is_float(ref) != _is_float(leaf):
                raise UserInputError(
                    f"soup: ingredient {idx} has dtype {getattr(leaf, 'dtype', type(leaf))} at path {path},"
                    f" ingredient 0 has {getattr(ref, 'dtype', type(ref))}"
                )


def _normalise(weights: Sequence[float], n: int) -> list[float]:
    w = [float(x) for x in np.asarray(weights, dtype=np.float64).reshape(-1)]
    if len(w) != n:
        raise UserInputError(f"soup: {len(w)} weights given for {n} ingredients")
    for i, x in enumerate(w):
        if not math.isfinite(x) or x < 0:
            raise UserInputError(f"soup: weight {i} is {x}; weights must be finite and >= 0")
    total = sum(w)
    if total <= 0:
        raise UserInputError("soup: weights sum to 0")
    return [x / total for x in w]


def _mix(param_trees: Sequence[PyTree], weights: Sequence[float]) -> PyTree:
    def leaf(*xs):
        if not _is_float(xs[0]):
            return xs[0]
        acc = sum(w * jnp.asarray(x, jnp.float32) for w, x in zip(weights, xs) if w != 0.0)
        return jnp.asarray(acc).astype(jnp.result_type(xs[0]))

    return jax.tree.map(leaf, *param_trees)


def uniform_soup(param_trees: Sequence[PyTree]) -> PyTree:
    """Leaf-wise mean of the ingredients (the uniform soup)."""
    check_compatible(param_trees)
    return _mix(param_trees, [1.0 / len(param_trees)] * len(param_trees))


def weighted_soup(param_trees: Sequence[PyTree], weights: Sequence[float]) -> PyTree:
    """Leaf-wise weighted mean; weights (>= 0, e.g. dev scores) are normalised to sum to 1."""
    check_compatible(param_trees)
    return _mix(param_trees, _normalise(weights, len(param_trees)))


WEIGHTINGS = ("softmax", "min_subtracted")


def score_weights(scores: Sequence[float], mode: str = "softmax", tau: float = 1.0) -> list[float]:
    """Soup weights (summing to 1) from the ingredients' dev scores, so that they differ.

    Raw scores (e.g. 48 +- 2 points) would give nearly uniform weights.
    "softmax": softmax(score / tau) (tau in score units: tau -> inf is the
    uniform soup, tau -> 0 the best ingredient alone); "min_subtracted":
    score - min(score) (the worst ingredient gets 0; all equal: uniform).
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if s.size == 0 or not np.all(np.isfinite(s)):
        raise UserInputError(f"soup: dev scores {s.tolist()} must be finite and not empty")
    if mode == "softmax":
        if not tau > 0:
            raise UserInputError(f"soup: tau={tau} must be > 0")
        w = np.exp((s - s.max()) / tau)
    elif mode == "min_subtracted":
        w = s - s.min()
        if not w.sum() > 0:
            w = np.ones_like(s)
    else:
        raise UserInputError(f"soup: weighting {mode!r} is not one of {WEIGHTINGS}")
    return [float(x) for x in w / w.sum()]


class GreedyScores(NamedTuple):
    """Dev scores from a greedy soup: each ingredient alone, the final soup, and every trial."""

    ingredients: list[float]
    soup: float
    trials: list[tuple[int, float, bool]]  # (ingredient index, score of the soup with it, kept?)


class GreedySoup(NamedTuple):
    soup: PyTree
    chosen: list[int]  # ingredient indices in the order they were added
    scores: GreedyScores


def greedy_soup(
    param_trees: Sequence[PyTree],
    score_fn: Callable[[PyTree], float],
    order_by: Sequence[float] | None = None,
) -> GreedySoup:
    """Greedy soup (Wortsman et al. 2022): add ingredients best-first while the dev score does not drop.

    score_fn(params) -> dev score, higher is better (negate a loss). order_by
    gives the ingredients' own dev scores if already known (saves
    score_fn calls; the best one is still re-scored with score_fn as the
    soup's starting score); otherwise each ingredient is scored. The
    ingredients are visited in order of decreasing own score (ties: input
    order); the best starts the soup; each next one is kept if the uniform
    soup of the kept set plus it scores >= the current soup. A candidate
    whose score is NaN is rejected.
    """
    check_compatible(param_trees)
    n = len(param_trees)
    if order_by is None:
        own = [float(score_fn(t)) for t in param_trees]
    else:
        own = [float(x) for x in np.asarray(order_by, dtype=np.float64).reshape(-1)]
        if len(own) != n:
            raise UserInputError(f"greedy soup: {len(own)} scores in order_by for {n} ingredients")
    for i, s in enumerate(own):
        if math.isnan(s):
            raise UserInputError(f"greedy soup: ingredient {i} has dev score NaN")
    order = sorted(range(n), key=lambda i: -own[i])
    chosen = [order[0]]
    soup = param_trees[order[0]]
    # Score the start with score_fn itself, so order_by may come from another metric.
    best = own[order[0]] if order_by is None else float(score_fn(soup))
    trials: list[tuple[int, float, bool]] = []
    for i in order[1:]:
        candidate = _mix([param_trees[j] for j in chosen + [i]], [1.0 / (len(chosen) + 1)] * (len(chosen) + 1))
        score = float(score_fn(candidate))
        keep = score >= best  # False for NaN
        trials.append((i, score, keep))
        if keep:
            chosen.append(i)
            soup, best = candidate, score
    return GreedySoup(soup=soup, chosen=chosen, scores=GreedyScores(ingredients=own, soup=best, trials=trials))
