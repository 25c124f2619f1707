"""A low-noise intrinsic metric: each discriminator's detection AUC on one fixed corrupted held-out set.

Downstream scores after a short fine-tuning are noisy (seed spread of many
points). Here the held-out text (people never in pre-training) is corrupted
ONCE, RTD-style, by one fixed reference generator (the same for every arm,
e.g. the ELECTRA arm's G of the first seed), and each arm's D only scores it:
no fine-tuning noise, the same replaced tokens for every model, and the
ranking quality (ROC AUC) rather than an accuracy that depends on the
replaced share.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from clue_jax.eval import metrics
from clue_jax.mcl import courses

__all__ = ["reference_corruption", "detection_auc"]


@nnx.jit(static_argnames=("mask_rate", "temperature", "protected", "banned"))
def _corrupt(pair, ids, mask, types, key, mask_id, mask_rate: float, temperature: float, protected, banned):
    k_mask, k_sample = jax.random.split(key)
    r = courses.rtd_corrupt(k_mask, ids, mask, mask_id, mask_rate, protected)
    logits = pair.generator_logits(r["gen_input"], mask, types)
    out = courses.replace_with_samples(k_sample, r["gen_input"], logits, r["gen_weights"], temperature,
                                       original_ids=ids, banned_ids=banned)
    scored = (~courses.protected_mask(ids, mask, protected)).astype(jnp.int32)
    return out["disc_input"], out["disc_labels"], scored


def reference_corruption(generator_pair, heldout: dict[str, np.ndarray], cfg, seed: int = 0,
                         batch_size: int = 64) -> dict[str, np.ndarray]:
    """heldout (input_ids, attention_mask, token_type_ids) with `cfg.mask_rate` of each row's free tokens
    replaced by the reference pair's generator samples (ObjectiveConfig: mask id, protected and banned ids).

    Returns the inputs with the corrupted ids, labels (1 = replaced by a different token) and scored (1 =
    real, unprotected: the tokens the AUC counts). Fixed by `seed`.
    """
    n = len(heldout["input_ids"])
    parts: dict[str, list] = {"input_ids": [], "labels": [], "scored": []}
    for lo in range(0, n, batch_size):
        sl = slice(lo, lo + batch_size)
        ids, lab, sc = _corrupt(generator_pair, *(jnp.asarray(heldout[k][sl]) for k in
                                                  ("input_ids", "attention_mask", "token_type_ids")),
                                jax.random.fold_in(jax.random.key(seed), lo), cfg.mask_id, cfg.mask_rate,
                                cfg.temperature, cfg.protected_ids or None, cfg.banned_ids)
        for k, v in zip(parts, (ids, lab, sc)):
            parts[k].append(np.asarray(v))
    out = {k: np.concatenate(v) for k, v in parts.items()}
    out.update(attention_mask=np.asarray(heldout["attention_mask"]),
               token_type_ids=np.asarray(heldout["token_type_ids"]))
    return out


@nnx.jit
def _disc_logits(pair, ids, mask, types):
    return pair.discriminator_logits(ids, mask, types)


def detection_auc(pair, reference: dict[str, np.ndarray], batch_size: int = 64) -> float:
    """ROC AUC of the pair's discriminator on the reference corruption, over the scored tokens."""
    n = len(reference["input_ids"])
    logits = np.concatenate([np.asarray(_disc_logits(pair, *(jnp.asarray(reference[k][lo:lo + batch_size]) for k in
                                                             ("input_ids", "attention_mask", "token_type_ids"))))
                             for lo in range(0, n, batch_size)])
    return metrics.detection_auc(logits, reference["labels"], reference["scored"])
