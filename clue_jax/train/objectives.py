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


LOSS_CHUNK = 512  # sequence positions whose logits are live at once in the loss


def causal_lm(model, batch, rng=None):
    """Causal LM loss on every real token (padding masked), as continual pre-training uses.

    batch: input_ids [B, T], attention_mask [B, T]; optional loss_mask [B, T]
    restricts which target tokens count (e.g. answers only in QA fine-tuning).
    """
    ids, mask = batch["input_ids"], batch["attention_mask"]
    # Targets shifted left, the last position weighted 0: every chunk reads
    # whole [B, C, V] logits, so XLA need not slice them (and pad their gradient).
    targets = _shift_left(ids)
    weights = _shift_left(mask)
    if "loss_mask" in batch:
        weights = weights * _shift_left(batch["loss_mask"])
    loss_sum, count, correct = chunked_cross_entropy(model.logits, model.hidden_states(ids, mask), targets, weights)
    return loss_sum, {"weight": count, "correct": correct}


def chunked_cross_entropy(logits_fn, hidden, targets, weights, chunk: int = LOSS_CHUNK):
    """(summed cross entropy, weighted token count, weighted correct argmaxes) of `logits_fn(hidden)`.

    The [B, T, V] float32 logits (8 GB for a LLaMA-3 batch of 8 x 2048) never
    exist whole: the sequence is scanned in chunks of at most `chunk`
    positions (the largest divisor of T that fits), each chunk's logits are
    recomputed in the backward pass instead of kept, and the batch stays
    split over the devices (clue_jax.parallel.rules.constrain in the head).
    """
    b, t = targets.shape
    size = max(c for c in range(1, min(chunk, t) + 1) if t % c == 0)

    def split(x):  # [B, T, ...] -> [T / size, B, size, ...]; every device keeps its rows
        return jnp.swapaxes(x.reshape(b, t // size, size, *x.shape[2:]), 0, 1)

    @jax.checkpoint
    def one(carry, xs):
        h, tgt, w = xs
        logits = logits_fn(h)
        loss_sum, count = token_cross_entropy(logits, tgt, w)
        correct = jnp.sum((jnp.argmax(logits, -1) == tgt) * w.astype(jnp.float32))
        return jax.tree.map(jnp.add, carry, (loss_sum, count, correct)), None

    zero = jnp.zeros((), jnp.float32)
    totals, _ = jax.lax.scan(one, (zero, zero, zero), (split(hidden), split(targets), split(weights)))
    return totals


def _shift_left(x):
    """x[:, 1:] followed by a zero column: position t holds what position t predicts."""
    return jnp.concatenate([x[:, 1:], jnp.zeros_like(x[:, :1])], axis=1)
