"""Pluggable training objectives: what a step minimises, without copying the loop.

An objective is `loss_fn(model, batch, rng) -> (loss_sum, aux)` where
`loss_sum` is summed over the tokens that count and `aux["weight"]` is how
many counted; the loop divides by the weight over all micro-batches, so
gradient accumulation gives the same result as one big batch.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

Objective = Callable[..., tuple[jax.Array, dict]]


def token_cross_entropy(logits, targets, weights):
    """Summed next-token cross entropy and the number of weighted tokens."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    weights = weights.astype(jnp.float32)
    return jnp.sum(losses * weights), jnp.sum(weights)


def causal_lm(model, batch, rng=None):
    """Causal LM loss on every real token (padding masked), as continual pre-training uses.

    batch: input_ids [B, T], attention_mask [B, T]; optional loss_mask [B, T]
    restricts which target tokens count (e.g. answers only in QA fine-tuning).
    """
    ids, mask = batch["input_ids"], batch["attention_mask"]
    logits = model(ids, mask)
    # Targets shifted left, the last position weighted 0: the loss reads the
    # full [B, T, V] logits, so XLA need not slice them (and pad their gradient).
    targets = _shift_left(ids)
    weights = _shift_left(mask)
    if "loss_mask" in batch:
        weights = weights * _shift_left(batch["loss_mask"])
    loss_sum, count = token_cross_entropy(logits, targets, weights)
    correct = jnp.sum((jnp.argmax(logits, -1) == targets) * weights)
    return loss_sum, {"weight": count, "correct": correct}


def _shift_left(x):
    """x[:, 1:] followed by a zero column: position t holds what position t predicts."""
    return jnp.concatenate([x[:, 1:], jnp.zeros_like(x[:, :1])], axis=1)
