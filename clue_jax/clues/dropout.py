"""Clue dropout: delete tokens with a probability that grows with their contrast rank.

docs/methods.md, "Clue dropout", steps 3 to 6. Everything here is jitted with fixed
shapes, so augmentation can run inside the training step (the big_vision
way for mixup) with no host round trip:

    d = s_large - s_small                      (contrast)
    r = rank of d, descending, 0 = largest     (descending_rank)
    p(r) = alpha * (1 - exp(-beta * r))        (drop_probability)
    keep each token with probability 1 - p(r), protected tokens always,
    delete the dropped ones and close the gaps (drop_tokens).

The baselines are the same code path with another score: "attention" ranks
by s_large alone, "random" drops every token with probability alpha, "plain"
keeps everything. Two controls isolate what the contrast adds:
- "rate_matched": every droppable token of a document is dropped with one
  probability q, chosen so that the expected number of dropped tokens equals
  contrast's sum of p(r) over that document (the same deletion budget, no
  ranking);
- "shuffled": contrast's p(r), but each document is ranked by the contrast
  of another document of the batch (rolled by one row), read at its own
  positions: the same drop profile, the ranking detached from the text. Choices where the paper is silent (all in DropoutConfig or
documented here):
- Ranks are over all real tokens, protected ones included (the paper ranks
  "the tokens"); protection only overrides the keep probability.
- Ties in the score are broken by position (earlier token ranks higher).
- The kept tokens are left-aligned: the output is right-padded whatever the
  input padding was.
- original_fraction defaults to 1/11, the paper's mix of 1 original and 10
  augmented copies per example, drawn independently per example.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from clue_jax import dataclass_config
from clue_jax.choices import ARMS, CONTRAST_ARMS
from clue_jax.errors import UserInputError

METHODS, CONTRAST_METHODS = ARMS, CONTRAST_ARMS  # CONTRAST_METHODS rank by d = s_large - s_small


@dataclasses.dataclass(frozen=True)
class DropoutConfig:
    """Settings of clue dropout; hashable, so it can be a static jit argument.

    method: one of METHODS ("rate_matched" and "shuffled" take alpha, beta as contrast does).
    alpha, beta: p(r) = alpha * (1 - exp(-beta * r)); published alpha in
      {0.6, 0.7}, beta in {0.005, 0.01, 0.03, 0.05}. "random" drops with alpha.
    original_fraction: share of examples left un-dropped (per example, random).
    protected_ids: token ids never dropped; the pipelines take them from
      `clue_jax.data.tokenizer.protected_token_ids` (one rule for every vocabulary).
    pad_id: id written into the slots freed by deleted tokens.
    """

    method: str = "contrast"
    alpha: float = 0.7
    beta: float = 0.01
    original_fraction: float = 1.0 / 11.0
    protected_ids: tuple = ()
    pad_id: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise UserInputError(f"dropout.method={self.method!r} is not one of {METHODS}")
        if not 0.0 <= float(self.alpha) <= 1.0:
            raise UserInputError(f"dropout.alpha={self.alpha} must be in [0, 1]")
        if float(self.beta) < 0.0:
            raise UserInputError(f"dropout.beta={self.beta} must be >= 0")
        if not 0.0 <= float(self.original_fraction) <= 1.0:
            raise UserInputError(f"dropout.original_fraction={self.original_fraction} must be in [0, 1]")
        try:
            ids = tuple(sorted({int(i) for i in self.protected_ids}))
        except (TypeError, ValueError):
            raise UserInputError(f"dropout.protected_ids={self.protected_ids!r} must be a list of integer token ids")
        object.__setattr__(self, "protected_ids", ids)
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "beta", float(self.beta))
        object.__setattr__(self, "original_fraction", float(self.original_fraction))
        object.__setattr__(self, "pad_id", int(self.pad_id))

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "dropout") -> "DropoutConfig":
        return dataclass_config.from_dict(cls, values, where)


@jax.jit
def contrast(s_large: jax.Array, s_small: jax.Array) -> jax.Array:
    """d = s_large - s_small, raw and per token (no normalisation: only its rank is used)."""
    return (s_large - s_small).astype(jnp.float32)


@jax.jit
def descending_rank(scores: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """int32 [B, T]: 0 for the largest score among real tokens; padding ranked last; ties by position."""
    b, t = scores.shape
    pad = attention_mask <= 0
    neg = -scores.astype(jnp.float32)
    neg = jnp.where(pad | (neg == 0), 0.0, neg)  # -0.0 and 0.0 tie; padding values are ignored
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    _, _, order = jax.lax.sort((pad.astype(jnp.int32), neg, pos), dimension=-1, num_keys=3)
    return jnp.zeros((b, t), jnp.int32).at[jnp.arange(b)[:, None], order].set(pos)


def drop_probability(rank: jax.Array, alpha, beta) -> jax.Array:
    """p(r) = alpha * (1 - exp(-beta * r)): the top-ranked tokens are almost always kept."""
    return alpha * (1.0 - jnp.exp(-beta * jnp.asarray(rank, jnp.float32)))


@jax.jit
def protected_mask(input_ids: jax.Array, attention_mask: jax.Array, protected_ids: jax.Array) -> jax.Array:
    """bool [B, T]: token is in `protected_ids` or is padding."""
    return jnp.isin(input_ids, jnp.asarray(protected_ids, input_ids.dtype)) | (attention_mask <= 0)


@functools.partial(jax.jit, static_argnames=("method",))
def keep_probabilities(scores, attention_mask, protected_mask, alpha, beta, method: str) -> jax.Array:
    """float32 [B, T] keep probability; 1 at protected tokens and padding.

    `scores` is what the method ranks by (s_large for "attention", d for
    "contrast", "rate_matched" and "shuffled"; "shuffled" expects d already
    taken from other rows, see `ranking_scores`); "plain" and "random" ignore
    it (it may be None).
    """
    if method not in METHODS:
        raise UserInputError(f"dropout.method={method!r} is not one of {METHODS}")
    shape = attention_mask.shape
    if method == "plain":
        keep = jnp.ones(shape, jnp.float32)
    elif method == "random":
        keep = jnp.full(shape, 1.0, jnp.float32) - jnp.asarray(alpha, jnp.float32)
    else:
        keep = 1.0 - drop_probability(descending_rank(scores, attention_mask), alpha, beta)
    free = ~protected_mask & (attention_mask > 0)
    if method == "rate_matched":  # contrast's expected drops per document, spread evenly over its free tokens
        expected = jnp.sum(jnp.where(free, 1.0 - keep, 0.0), axis=-1, keepdims=True)
        rate = expected / jnp.maximum(jnp.sum(free, axis=-1, keepdims=True), 1)
        keep = jnp.broadcast_to(1.0 - rate, shape)
    return jnp.where(free, keep, 1.0).astype(jnp.float32)


def _compact(kept: jax.Array, arrays: dict, fills: dict) -> dict:
    """Moves kept positions to the front in their order (stable sort on dropped-ness); fills the rest."""
    order = jnp.argsort((~kept).astype(jnp.int32), axis=-1, stable=True)
    kept_sorted = jnp.take_along_axis(kept, order, axis=-1)
    out = {}
    for name, x in arrays.items():
        moved = jnp.take_along_axis(x, order, axis=-1)
        out[name] = jnp.where(kept_sorted, moved, jnp.asarray(fills.get(name, 0), x.dtype))
    return out


@jax.jit
def drop_tokens(rng, input_ids, attention_mask, keep_prob, pad_id) -> tuple[jax.Array, jax.Array]:
    """Keeps each real token with probability keep_prob (Bernoulli), deletes the rest.

    The kept tokens are left-aligned in their original order and the tail is
    pad_id with mask 0; shapes do not change.
    """
    kept = jax.random.bernoulli(rng, keep_prob) & (attention_mask > 0)
    out = _compact(kept, {"ids": input_ids, "mask": attention_mask}, {"ids": pad_id})
    return out["ids"], out["mask"]


def ranking_scores(method: str, batch: dict):
    """What `method` ranks by, from the batch's teacher scores (None for plain/random).

    "shuffled" takes the contrast of the next row (the last takes the first's),
    so every document is ranked by another one's d; it needs at least 2 rows.
    """
    if method in ("plain", "random"):
        return None
    if "scores_large" not in batch:
        raise UserInputError(f"dropout.method={method!r} needs batch key 'scores_large' (teacher scores)")
    if method == "attention":
        return batch["scores_large"]
    if "scores_small" not in batch:
        raise UserInputError(f"dropout.method={method!r} needs batch key 'scores_small' (small teacher scores)")
    d = contrast(batch["scores_large"], batch["scores_small"])
    if method == "shuffled":
        if d.shape[0] < 2:
            raise UserInputError("dropout.method='shuffled' needs at least 2 documents per batch (ranks come from another one)")
        d = jnp.roll(d, -1, axis=0)
    return d


@functools.partial(jax.jit, static_argnames=("cfg",))
def augment_batch(rng, batch: dict, scores, cfg: DropoutConfig) -> dict:
    """Clue dropout on a batch dict (input_ids, attention_mask, optional scores_large/scores_small).

    `scores` is the ranking score if given; if None it comes from the batch
    (`ranking_scores`). A share
    `original_fraction` of examples is left as is. Every [B, T] entry of the
    batch (scores and labels included) is compacted with the same deletions,
    so per-token values stay with their token; other entries pass through.
    """
    if cfg.method == "plain":
        return dict(batch)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    if scores is None:
        scores = ranking_scores(cfg.method, batch)
    protected = protected_mask(ids, mask, jnp.asarray(cfg.protected_ids, jnp.int32))
    keep = keep_probabilities(scores, mask, protected, cfg.alpha, cfg.beta, cfg.method)
    k_orig, k_drop = jax.random.split(rng)
    original = jax.random.uniform(k_orig, ids.shape[:1]) < cfg.original_fraction
    keep = jnp.where(original[:, None], 1.0, keep)
    kept = jax.random.bernoulli(k_drop, keep) & (mask > 0)
    per_token = {k: v for k, v in batch.items() if getattr(v, "shape", None) == ids.shape}
    out = dict(batch)
    out.update(_compact(kept, per_token, {"input_ids": cfg.pad_id}))
    return out


@functools.partial(jax.jit, static_argnames=("cfg", "k"))
def fixed_copies(rng, input_ids, attention_mask, scores, cfg: DropoutConfig, k: int) -> tuple[jax.Array, jax.Array]:
    """The paper's offline augmentation: each example followed by k dropped copies.

    Returns (ids, mask) of shape [N * (k + 1), T]; rows n*(k+1) .. n*(k+1)+k
    belong to example n, the first of them the original. `scores` is the
    ranking score as in `augment_batch` (None for plain/random);
    cfg.original_fraction is not used (the originals are explicit).
    """
    protected = protected_mask(input_ids, attention_mask, jnp.asarray(cfg.protected_ids, jnp.int32))
    keep = keep_probabilities(scores, attention_mask, protected, cfg.alpha, cfg.beta, cfg.method)
    copies_ids, copies_mask = jax.vmap(lambda key: drop_tokens(key, input_ids, attention_mask, keep, cfg.pad_id))(
        jax.random.split(rng, k)
    )
    n, t = input_ids.shape
    ids = jnp.concatenate([input_ids[None], copies_ids]).swapaxes(0, 1).reshape(n * (k + 1), t)
    mask = jnp.concatenate([attention_mask[None], copies_mask]).swapaxes(0, 1).reshape(n * (k + 1), t)
    return ids, mask


AugmentFn = Callable[[jax.Array, dict], dict]


def make_augment(cfg: DropoutConfig) -> AugmentFn:
    """`augment(rng, batch) -> batch` with the scores taken from the batch (for the train step)."""
    return lambda rng, batch: augment_batch(rng, batch, None, cfg)
