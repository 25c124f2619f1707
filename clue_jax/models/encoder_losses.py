"""The encoder's training losses: ELECTRA's MLM and replaced-token detection, span QA and classification.

Each is a weighted mean over the positions or rows that count, so padding and rows a course leaves out add
nothing (and a batch with none of them gives 0, not NaN)."""
from __future__ import annotations

import jax.numpy as jnp
import optax

_NEG = -1e9  # logit for positions a span can never start or end at (padding)


def _weighted_mean(values, weights):
    """sum(w * v) / sum(w), and 0 (not NaN) when every weight is 0."""
    w = weights.astype(jnp.float32)
    total = jnp.sum(w)
    return jnp.where(total > 0, jnp.sum(values * w) / jnp.where(total > 0, total, 1.0), 0.0)


def mlm_loss(logits, targets, weights):
    """Mean cross-entropy over the weighted (masked) positions; logits [B,T,V], targets/weights [B,T]."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    return _weighted_mean(ce, weights)


def rtd_loss(disc_logits, labels, mask):
    """Sigmoid binary cross-entropy per real token (labels 1 = replaced), averaged over `mask`."""
    bce = optax.sigmoid_binary_cross_entropy(disc_logits.astype(jnp.float32), labels.astype(jnp.float32))
    return _weighted_mean(bce, mask)


def electra_loss(gen_logits, mlm_targets, mlm_weights, disc_logits, rtd_labels, mask, disc_weight: float = 50.0):
    """ELECTRA's objective: mlm + disc_weight * rtd. Returns (total, {"mlm": ..., "rtd": ...})."""
    mlm = mlm_loss(gen_logits, mlm_targets, mlm_weights)
    rtd = rtd_loss(disc_logits, rtd_labels, mask)
    return mlm + disc_weight * rtd, {"mlm": mlm, "rtd": rtd}


def span_qa_loss(start_logits, end_logits, start_positions, end_positions, attention_mask=None, weights=None):
    """(CE(start) + CE(end)) / 2, averaged over examples; padded positions can never be chosen.

    Unanswerable SQuAD 2.0 questions have start = end = 0 ([CLS]). `weights`
    [B] drops filler examples of a fixed-shape batch.
    """
    if attention_mask is not None:
        real = attention_mask > 0
        start_logits = jnp.where(real, start_logits, _NEG)
        end_logits = jnp.where(real, end_logits, _NEG)
    ce_start = optax.softmax_cross_entropy_with_integer_labels(start_logits.astype(jnp.float32), start_positions)
    ce_end = optax.softmax_cross_entropy_with_integer_labels(end_logits.astype(jnp.float32), end_positions)
    if weights is None:
        weights = jnp.ones(ce_start.shape, jnp.float32)
    return _weighted_mean((ce_start + ce_end) / 2, weights)


def classification_loss(logits, labels, weights=None):
    """Cross-entropy for [B, num_labels] logits; squared error when num_labels == 1 (regression)."""
    if logits.shape[-1] == 1:
        per_example = (logits[:, 0].astype(jnp.float32) - labels.astype(jnp.float32)) ** 2
    else:
        per_example = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    if weights is None:
        weights = jnp.ones(per_example.shape, jnp.float32)
    return _weighted_mean(per_example, weights)
