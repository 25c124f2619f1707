"""MCL correction notebook: the worked example of docs/methods.md ("MCL") and random-input properties."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clue_jax.errors import UserInputError
from clue_jax.mcl import correction, courses

WORDS = ["[pad]", "[mask]", "the", "chef", "cooked", "meal", "a", "thanked"]
VOCAB = {w: i for i, w in enumerate(WORDS)}
MASK = VOCAB["[mask]"]


def enc(text):
    return jnp.array([[VOCAB[w] for w in text.split()]], jnp.int32)


def dec(ids):
    return " ".join(WORDS[i] for i in np.asarray(ids)[0])


def verdicts(text):
    return jnp.array([[w == "replaced" for w in text.split(", ")]])


def test_worked_example_from_methods():
    original = enc("the chef cooked the meal")
    masked = enc("[mask] chef [mask] the [mask]")
    assert ((masked == MASK) | (masked == original)).all()
    g_out = enc("a chef thanked the meal")  # G filled the three masks
    d_says = verdicts("original, original, replaced, original, replaced")
    regen, redisc = correction.correction_inputs(original, g_out, d_says, MASK)
    assert dec(regen) == "the chef [mask] the meal"
    assert dec(redisc) == "a chef cooked the meal"

    cells = correction.notebook_cells(original, g_out, d_says)
    as_list = {k: np.asarray(v)[0].astype(int).tolist() for k, v in cells.items()}
    assert as_list["replaced_judged_replaced"] == [0, 0, 1, 0, 0]  # "thanked": caught
    assert as_list["replaced_judged_original"] == [1, 0, 0, 0, 0]  # "a": missed
    assert as_list["original_judged_replaced"] == [0, 0, 0, 0, 1]  # "meal": false alarm
    assert as_list["original_judged_original"] == [0, 1, 0, 1, 0]

    t = correction.correction_targets(original, g_out, d_says, MASK)
    assert dec(t["regen_input"]) == "the chef [mask] the meal"
    np.testing.assert_array_equal(t["regen_targets"], original)
    assert np.asarray(t["regen_weights"])[0].tolist() == [0, 0, 1, 0, 0]
    assert dec(t["redisc_input"]) == "a chef cooked the meal"
    assert np.asarray(t["redisc_labels"])[0].tolist() == [1, 0, 0, 0, 0]
    assert np.asarray(t["redisc_weights"])[0].tolist() == [1, 1, 1, 1, 1]


def _reference(orig, corr, pred, real):
    truth = (corr != orig) & real
    caught = truth & pred & real
    regen = np.where(caught, MASK, orig)
    redisc = np.where(caught, orig, corr)
    redisc = np.where(real, redisc, orig)
    return caught, regen, redisc


@pytest.mark.parametrize("course", ["rtd", "std"])
def test_random_batches_match_the_definition_and_jit(course):
    rng = np.random.RandomState(0 if course == "rtd" else 1)
    B, T = 16, 24
    orig = rng.randint(10, 60, size=(B, T)).astype(np.int32)
    lengths = rng.randint(4, T + 1, size=B)
    real = np.arange(T)[None] < lengths[:, None]
    orig = np.where(real, orig, 0)
    mask = real.astype(np.int32)
    if course == "rtd":
        c = courses.rtd_corrupt(jax.random.key(0), jnp.asarray(orig), jnp.asarray(mask), MASK, 0.3)
        logits = jax.random.normal(jax.random.key(1), (B, T, 60)) * 3
        corr = courses.replace_with_samples(
            jax.random.key(2), c["gen_input"], logits, c["gen_weights"], original_ids=jnp.asarray(orig)
        )["disc_input"]
    else:
        corr = courses.std_corrupt(jax.random.key(0), jnp.asarray(orig), jnp.asarray(mask), 0.3)["disc_input"]
    corr = np.asarray(corr)
    # padding carries junk predictions: they must be ignored
    pred = rng.rand(B, T) < 0.5
    fn = jax.jit(functools.partial(correction.correction_targets, mask_id=MASK))
    t = fn(jnp.asarray(orig), jnp.asarray(corr), jnp.asarray(pred), attention_mask=jnp.asarray(mask))
    caught, regen, redisc = _reference(orig, corr, pred, real)
    assert caught.any() and ((corr != orig) & ~caught).any()  # the batch exercises both branches
    np.testing.assert_array_equal(t["regen_input"], regen)
    np.testing.assert_array_equal(t["redisc_input"], redisc)
    np.testing.assert_array_equal(t["regen_weights"], caught.astype(np.float32))
    np.testing.assert_array_equal(t["redisc_labels"], ((redisc != orig) & real).astype(np.int32))
    np.testing.assert_array_equal(t["redisc_weights"], real.astype(np.float32))
    cells = [np.asarray(t[k]) for k in ("original_judged_original", "original_judged_replaced",
                                          "replaced_judged_original", "replaced_judged_replaced")]
    np.testing.assert_array_equal(sum(c.astype(int) for c in cells), real.astype(int))  # a partition of real tokens
    np.testing.assert_array_equal(t["misjudged"], cells[1] | cells[2])
    # re-discrimination keeps exactly the misjudged replacements, nothing caught
    np.testing.assert_array_equal(np.asarray(t["redisc_labels"]).astype(bool), cells[2])


def test_shape_mismatch_raises():
    original = enc("the chef cooked the meal")
    with pytest.raises(UserInputError, match="predicted_replaced"):
        correction.correction_inputs(original, original, jnp.zeros((1, 3), bool), MASK)
