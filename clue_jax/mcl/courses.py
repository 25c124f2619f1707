"""MCL self-supervision courses: RTD, STD and ITD corruptions (docs/methods.md, "MCL").

Every function here is pure JAX with fixed shapes [B, T], so a training step
can jit it together with the models. Conventions shared by all of them:

- `input_ids` int32 [B, T]; `attention_mask` int32 [B, T], 1 = real token,
  right padding (real tokens first, then padding).
- `rng` is an explicit `jax.random` key; the same key gives the same output.
- Padding and protected tokens are never chosen, masked, moved or displaced
  by an insertion in front of them. `protected` is either
  * None: only padding is protected;
  * a sequence (tuple/list) of token ids, or a 0-/1-D integer array of ids,
    e.g. `(cls_id, sep_id, pad_id)`: every position holding one of them;
  * a 2-D boolean/int array [B, T]: True/1 = protected position.
- How many positions a course corrupts: exactly `round(rate * n)` per row,
  with n the number of real, unprotected tokens (as ELECTRA does, rather than
  an independent coin per token, so short sequences get a predictable share).
  A positive rate corrupts at least the minimum that makes sense (1 mask, 2
  swapped tokens, 1 insertion) when the row has room for it.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from clue_jax.errors import UserInputError

Protected = jax.Array | Sequence[int] | None

__all__ = [
    "protected_mask",
    "rtd_corrupt",
    "replace_with_samples",
    "std_corrupt",
    "itd_corrupt",
    "fill_inserted",
    "sample_tokens",
]


def _check_2d(name: str, x: jax.Array) -> None:
    if jnp.ndim(x) != 2:
        raise UserInputError(f"{name}: expected shape [batch, length], got shape {jnp.shape(x)}")


def protected_mask(input_ids: jax.Array, attention_mask: jax.Array, protected: Protected = None) -> jax.Array:
    """Boolean [B, T]: positions no course may touch (padding plus `protected`)."""
    _check_2d("input_ids", input_ids)
    _check_2d("attention_mask", attention_mask)
    if jnp.shape(input_ids) != jnp.shape(attention_mask):
        raise UserInputError(
            f"attention_mask: shape {jnp.shape(attention_mask)} differs from input_ids shape {jnp.shape(input_ids)}"
        )
    pad = attention_mask == 0
    if protected is None:
        return pad
    if isinstance(protected, (list, tuple)):
        if len(protected) == 0:
            return pad
        protected = jnp.asarray(protected, dtype=jnp.int32)
    protected = jnp.asarray(protected)
    if protected.ndim <= 1:
        return pad | jnp.isin(input_ids, jnp.atleast_1d(protected))
    if protected.shape != jnp.shape(input_ids):
        raise UserInputError(
            f"protected: mask shape {protected.shape} differs from input_ids shape {jnp.shape(input_ids)}"
        )
    return pad | protected.astype(bool)


def _count(rate: float | jax.Array, n: jax.Array, minimum: int, room: jax.Array) -> jax.Array:
    """round(rate * n), raised to `minimum` for a positive rate, capped by `room`. Int32 [B]."""
    k = jnp.round(rate * n.astype(jnp.float32)).astype(jnp.int32)
    k = jnp.where((rate > 0) & (room >= minimum), jnp.maximum(k, minimum), k)
    return jnp.clip(k, 0, room)


def _random_order(rng: jax.Array, allowed: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A random order of each row's allowed positions first, then the rest.

    Returns (order, rank): order[b, i] = position with rank i, rank = inverse
    permutation. Choosing `rank < k` picks k allowed positions uniformly.
    """
    u = jax.random.uniform(rng, allowed.shape)
    scores = jnp.where(allowed, u, 2.0)  # uniform is in [0, 1): disallowed sort last
    order = jnp.argsort(scores, axis=-1)
    rank = jnp.argsort(order, axis=-1)
    return order, rank


def rtd_corrupt(
    rng: jax.Array,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    mask_id: int | jax.Array,
    mask_rate: float = 0.15,
    protected: Protected = None,
) -> dict[str, jax.Array]:
    """Replaced-token-detection input for G: [MASK] at round(mask_rate * n) random positions.

    Returns gen_input (ids with [MASK] at the chosen positions), gen_targets
    (the original ids, everywhere) and gen_weights (float32, 1.0 at the masked
    positions: the MLM loss positions). All chosen positions become [MASK]
    (no BERT-style 10% random / 10% kept), as the method card describes.
    """
    frozen = protected_mask(input_ids, attention_mask, protected)
    free = ~frozen
    n = free.sum(-1)
    k = _count(mask_rate, n, 1, n)
    _, rank = _random_order(rng, free)
    chosen = (rank < k[:, None]) & free
    gen_input = jnp.where(chosen, jnp.asarray(mask_id, input_ids.dtype), input_ids)
    return {
        "gen_input": gen_input,
        "gen_targets": input_ids,
        "gen_weights": chosen.astype(jnp.float32),
    }


def sample_tokens(
    rng: jax.Array,
    ids: jax.Array,
    logits: jax.Array,
    positions: jax.Array,
    temperature: float = 1.0,
    banned_ids: Sequence[int] = (),
) -> jax.Array:
    """ids with the positions where `positions` is nonzero replaced by samples from softmax(logits / T).

    Gradient-free (samples are integers; logits are stop_gradient-ed as in
    ELECTRA, where D's loss does not flow into G). temperature == 0 (a Python
    number) takes the argmax. `banned_ids` (e.g. [MASK], [PAD]) are never
    sampled, so D never sees a token that cannot occur in real text.
    """
    if jnp.ndim(logits) != 3 or jnp.shape(logits)[:2] != jnp.shape(ids):
        raise UserInputError(
            f"gen_logits: expected shape [batch, length, vocab] matching ids {jnp.shape(ids)}, got {jnp.shape(logits)}"
        )
    if isinstance(temperature, (int, float)) and temperature < 0:
        raise UserInputError(f"temperature: must be >= 0, got {temperature}")
    logits = jax.lax.stop_gradient(logits).astype(jnp.float32)
    if len(banned_ids):
        banned = jnp.zeros(logits.shape[-1], bool).at[jnp.asarray(banned_ids, jnp.int32)].set(True)
        logits = jnp.where(banned, -jnp.inf, logits)
    if isinstance(temperature, (int, float)) and temperature == 0:
        sampled = jnp.argmax(logits, axis=-1)
    else:
        sampled = jax.random.categorical(rng, logits / temperature, axis=-1)
    return jnp.where(positions.astype(bool), sampled.astype(ids.dtype), ids)


def replace_with_samples(
    rng: jax.Array,
    gen_input: jax.Array,
    gen_logits: jax.Array,
    gen_weights: jax.Array,
    temperature: float = 1.0,
    *,
    original_ids: jax.Array,
    banned_ids: Sequence[int] = (),
) -> dict[str, jax.Array]:
    """D's input for RTD/STD: G's samples at the positions where gen_weights > 0.

    original_ids (keyword, required: the labels need the truth) are the
    uncorrupted ids, i.e. rtd_corrupt's gen_targets. disc_labels (int32) = 1
    where disc_input != original_ids: ELECTRA's convention, a sampled token
    equal to the original counts as original.
    """
    disc_input = sample_tokens(rng, gen_input, gen_logits, gen_weights > 0, temperature, banned_ids)
    return {
        "disc_input": disc_input,
        "disc_labels": (disc_input != original_ids).astype(jnp.int32),
    }


def std_corrupt(
    rng: jax.Array,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    swap_rate: float = 0.15,
    protected: Protected = None,
) -> dict[str, jax.Array]:
    """Swapped-token-detection input: permute the tokens at round(swap_rate * n) random positions.

    The chosen positions (at least 2 for a positive rate, when the row has 2
    free tokens) are put in a random order p_0, ..., p_{k-1}, and the token at
    p_i moves to p_{i+1} (the last to p_0): a cyclic shift, so every chosen
    position receives another position's token and the multiset of tokens is
    kept. A position that receives an identical token (e.g. two "the") is not
    changed and counts as original.

    Returns disc_input (the swapped ids), disc_labels (int32, 1 = token
    differs from the original), swapped (bool, the chosen positions), and the
    swapped-LM task for G: gen_input (= disc_input), gen_targets (the
    originals), gen_weights (float32, 1 where swapped and changed).
    """
    frozen = protected_mask(input_ids, attention_mask, protected)
    free = ~frozen
    n = free.sum(-1)
    k = _count(swap_rate, n, 2, n)
    order, rank = _random_order(rng, free)
    T = input_ids.shape[-1]
    i = jnp.arange(T)[None, :]
    # Sorted slot i takes the token of sorted slot i - 1 (slot 0 takes slot k - 1).
    prev = jnp.where(i == 0, k[:, None] - 1, i - 1)
    prev = jnp.where(i < k[:, None], prev, i)
    src_pos = jnp.take_along_axis(order, prev, axis=-1)
    moved = jnp.take_along_axis(input_ids, src_pos, axis=-1)  # token destined for position order[:, i]
    rows = jnp.arange(input_ids.shape[0])[:, None]
    disc_input = input_ids.at[rows, order].set(moved)
    swapped = (rank < k[:, None]) & free
    changed = disc_input != input_ids
    return {
        "disc_input": disc_input,
        "disc_labels": changed.astype(jnp.int32),
        "swapped": swapped,
        "gen_input": disc_input,
        "gen_targets": input_ids,
        "gen_weights": changed.astype(jnp.float32),
    }


def itd_corrupt(
    rng: jax.Array,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    mask_id: int | jax.Array,
    insert_rate: float = 0.15,
    protected: Protected = None,
) -> dict[str, jax.Array]:
    """Inserted-token-detection input: [MASK] inserted at round(insert_rate * n) new random gaps.

    A gap is "just before token j" (j = the real length is the end of the
    text). A gap is allowed when a real unprotected token is on at least one
    side, so nothing goes before a leading [CLS] or after a trailing [SEP],
    and at most one [MASK] goes into each gap. Later tokens shift right.

    Fixed shapes: the sequence stays length T, so the insertions are capped
    by the row's free padding (T - n_real): no real token, and no final
    [SEP], is ever pushed out. A row with less padding than round(rate * n)
    gets fewer insertions (none when it is full); give the corpus a longer
    `seq_len` than its texts need. The attention mask grows to n_real + k.

    Returns gen_input (ids with the inserted masks), inserted (int32, 1 at
    inserted positions; also D's labels, disc_labels), attention_mask (the
    new one), num_inserted (int32 [B]), capped (bool [B]: fewer insertions
    than the rate asks, for lack of padding), and source_index (int32, the original position each output
    token came from, -1 for an insertion). G fills the masks with
    fill_inserted; there is no G loss (no ground truth).
    """
    frozen = protected_mask(input_ids, attention_mask, protected)
    free = ~frozen
    prev_free = jnp.pad(free[:, :-1], ((0, 0), (1, 0)))
    gap_ok = free | prev_free
    n = free.sum(-1)
    n_real = attention_mask.astype(jnp.int32).sum(-1)
    wanted = _count(insert_rate, n, 1, gap_ok.sum(-1))
    k = jnp.minimum(wanted, input_ids.shape[-1] - n_real)  # the free padding: nothing is pushed out
    _, rank = _random_order(rng, gap_ok)
    gap = (rank < k[:, None]) & gap_ok
    B, T = input_ids.shape
    j = jnp.arange(T)[None, :]
    before = jnp.cumsum(gap, axis=-1)  # insertions at or before gap j
    new_pos = j + before  # where original token j lands
    ins_pos = jnp.where(gap, j + before - 1, T)  # where gap j's [MASK] lands; T = nowhere
    rows = jnp.arange(B)[:, None]
    gen_input = jnp.zeros_like(input_ids).at[rows, new_pos].set(input_ids, mode="drop")
    gen_input = gen_input.at[rows, ins_pos].set(jnp.asarray(mask_id, input_ids.dtype), mode="drop")
    inserted = jnp.zeros_like(input_ids, dtype=jnp.int32).at[rows, ins_pos].set(1, mode="drop")
    source_index = jnp.full((B, T), -1, jnp.int32).at[rows, new_pos].set(
        jnp.broadcast_to(j, (B, T)).astype(jnp.int32), mode="drop"
    )
    new_mask = (j < (n_real + k)[:, None]).astype(attention_mask.dtype)
    return {
        "num_inserted": k,
        "capped": k < wanted,
        "gen_input": gen_input,
        "inserted": inserted,
        "disc_labels": inserted,
        "attention_mask": new_mask,
        "source_index": source_index,
    }


def fill_inserted(
    rng: jax.Array,
    gen_input: jax.Array,
    gen_logits: jax.Array,
    inserted: jax.Array,
    temperature: float = 1.0,
    banned_ids: Sequence[int] = (),
) -> dict[str, jax.Array]:
    """D's input for ITD: G's samples at the inserted positions; disc_labels = inserted.

    Unlike RTD, a sample that happens to fit still counts as inserted: the
    token was not in the text.
    """
    disc_input = sample_tokens(rng, gen_input, gen_logits, inserted, temperature, banned_ids)
    return {"disc_input": disc_input, "disc_labels": inserted.astype(jnp.int32)}
