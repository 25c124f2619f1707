"""MCL self-correction courses: the "correction notebook" (docs/methods.md, "MCL").

D's verdicts against the truth (truth = corrupted != original) form four cells:
  original judged original  -> nothing to learn;
  original judged replaced  -> D was wrong: re-discriminate;
  replaced judged original  -> D was wrong: re-discriminate;
  replaced judged replaced  -> D was right ("caught"): re-generate.
Re-generation input for G: [MASK] at the caught positions, the original
everywhere else. Re-discrimination input for D: the caught positions restored
to the original, every other position as corrupted (the misjudged tokens stay).

The same functions serve re-RTD (corrupted = D's RTD input, G's samples) and
re-STD (corrupted = the swapped sequence). All are pure, integer-only JAX with
fixed shapes, so they jit inside the training step; D's verdicts arrive as a
boolean array (e.g. `disc_logits > 0`) and carry no gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from clue_jax.errors import UserInputError

__all__ = ["notebook_cells", "correction_inputs", "correction_targets"]


def _real(original_ids: jax.Array, attention_mask: jax.Array | None) -> jax.Array:
    if attention_mask is None:
        return jnp.ones(jnp.shape(original_ids), bool)
    return jnp.asarray(attention_mask).astype(bool)


def _check(original_ids, corrupted_ids, predicted_replaced, attention_mask) -> None:
    shape = jnp.shape(original_ids)
    for name, x in (("corrupted_ids", corrupted_ids), ("predicted_replaced", predicted_replaced),
                    ("attention_mask", attention_mask)):
        if x is not None and jnp.shape(x) != shape:
            raise UserInputError(f"{name}: shape {jnp.shape(x)} differs from original_ids shape {shape}")


def notebook_cells(
    original_ids: jax.Array,
    corrupted_ids: jax.Array,
    predicted_replaced: jax.Array,
    attention_mask: jax.Array | None = None,
) -> dict[str, jax.Array]:
    """The four boolean cells of the notebook; padding is in none of them.

    Keys: original_judged_original, original_judged_replaced,
    replaced_judged_original, replaced_judged_replaced (= caught), plus
    misjudged (the union of the two wrong cells).
    """
    _check(original_ids, corrupted_ids, predicted_replaced, attention_mask)
    real = _real(original_ids, attention_mask)
    truth = (corrupted_ids != original_ids) & real
    pred = jnp.asarray(predicted_replaced).astype(bool) & real
    cells = {
        "original_judged_original": real & ~truth & ~pred,
        "original_judged_replaced": real & ~truth & pred,
        "replaced_judged_original": truth & ~pred,
        "replaced_judged_replaced": truth & pred,
    }
    cells["misjudged"] = cells["original_judged_replaced"] | cells["replaced_judged_original"]
    return cells


def correction_inputs(
    original_ids: jax.Array,
    corrupted_ids: jax.Array,
    predicted_replaced: jax.Array,
    mask_id: int | jax.Array,
    attention_mask: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """(regeneration_ids, rediscrimination_ids) exactly as docs/methods.md ("MCL") defines them.

    Padding positions are left as in original_ids (which equal corrupted_ids
    there for every course).
    """
    caught = notebook_cells(original_ids, corrupted_ids, predicted_replaced, attention_mask)[
        "replaced_judged_replaced"
    ]
    regeneration = jnp.where(caught, jnp.asarray(mask_id, original_ids.dtype), original_ids)
    rediscrimination = jnp.where(caught, original_ids, corrupted_ids)
    if attention_mask is not None:
        rediscrimination = jnp.where(_real(original_ids, attention_mask), rediscrimination, original_ids)
    return regeneration, rediscrimination


def correction_targets(
    original_ids: jax.Array,
    corrupted_ids: jax.Array,
    predicted_replaced: jax.Array,
    mask_id: int | jax.Array,
    attention_mask: jax.Array | None = None,
) -> dict[str, jax.Array]:
    """Everything one self-correction course (re-RTD or re-STD) needs for its two losses.

    Re-generation (G, MLM): regen_input, regen_targets (= original ids),
    regen_weights (float32, 1 at the re-masked = caught positions).
    Re-discrimination (D): redisc_input, redisc_labels (int32, 1 where
    redisc_input != original), redisc_weights (float32, 1 at every real
    token, as ELECTRA's D loss). Also the four cells (bool) for metrics.
    When D caught nothing, regen_weights is all zero: the loss must divide by
    max(sum(weights), 1).
    """
    cells = notebook_cells(original_ids, corrupted_ids, predicted_replaced, attention_mask)
    regen, redisc = correction_inputs(original_ids, corrupted_ids, predicted_replaced, mask_id, attention_mask)
    real = _real(original_ids, attention_mask)
    out = {
        "regen_input": regen,
        "regen_targets": original_ids,
        "regen_weights": cells["replaced_judged_replaced"].astype(jnp.float32),
        "redisc_input": redisc,
        "redisc_labels": ((redisc != original_ids) & real).astype(jnp.int32),
        "redisc_weights": real.astype(jnp.float32),
    }
    out.update(cells)
    return out
