"""MCL self-supervision courses: RTD, STD, ITD corruptions on fixed and random inputs."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clue_jax.errors import UserInputError
from clue_jax.mcl import courses

PAD, CLS, SEP, MASK = 0, 1, 2, 3
SPECIAL = (PAD, CLS, SEP, MASK)
VOCAB = 40


def _fixed():
    """Two rows: 6 distinct words between CLS/SEP, and 3 words + padding."""
    ids = jnp.array(
        [
            [CLS, 10, 11, 12, 13, 14, 15, SEP, PAD, PAD],
            [CLS, 20, 21, 22, SEP, PAD, PAD, PAD, PAD, PAD],
        ],
        jnp.int32,
    )
    mask = (ids != PAD).astype(jnp.int32)
    return ids, mask


def _random_batch(seed, B=64, T=64):
    """Distinct word ids per row (so any moved token is visibly changed), random real lengths."""
    rs = np.random.RandomState(seed)
    ids = np.zeros((B, T), np.int32)
    mask = np.zeros((B, T), np.int32)
    for b in range(B):
        n = rs.randint(8, T + 1)
        words = rs.choice(np.arange(10, 10 + 4 * T), size=n - 2, replace=False)
        ids[b, :n] = np.concatenate([[CLS], words, [SEP]])
        mask[b, :n] = 1
    return jnp.asarray(ids), jnp.asarray(mask)


def _free(ids, mask):
    return (np.asarray(mask) == 1) & ~np.isin(np.asarray(ids), SPECIAL)


# ---------------------------------------------------------------- RTD


def test_rtd_masks_exactly_the_weighted_positions_and_spares_protected():
    ids, mask = _fixed()
    out = courses.rtd_corrupt(jax.random.key(0), ids, mask, MASK, mask_rate=0.34, protected=SPECIAL)
    g, w = np.asarray(out["gen_input"]), np.asarray(out["gen_weights"])
    free = _free(ids, mask)
    assert out["gen_input"].dtype == jnp.int32 and out["gen_weights"].dtype == jnp.float32
    np.testing.assert_array_equal(out["gen_targets"], ids)
    np.testing.assert_array_equal(g == MASK, w == 1.0)
    np.testing.assert_array_equal(np.where(w == 1.0, np.asarray(ids), g), np.asarray(ids))
    assert not (w.astype(bool) & ~free).any()  # never CLS/SEP/PAD
    # round(0.34 * 6) = 2, round(0.34 * 3) = 1
    np.testing.assert_array_equal(w.sum(-1), np.round(0.34 * free.sum(-1)))


def test_rtd_deterministic_per_key_and_protected_as_position_mask():
    ids, mask = _fixed()
    f = functools.partial(courses.rtd_corrupt, input_ids=ids, attention_mask=mask, mask_id=MASK, mask_rate=0.5)
    a, b = f(jax.random.key(3)), f(jax.random.key(3))
    np.testing.assert_array_equal(a["gen_input"], b["gen_input"])
    keys = jax.random.split(jax.random.key(4), 8)
    outs = {tuple(np.asarray(f(k)["gen_input"]).ravel()) for k in keys}
    assert len(outs) > 1  # different keys choose different positions
    # A position mask protecting every word but position 3 leaves only that one to mask.
    prot = np.ones(ids.shape, bool)
    prot[0, 3] = False
    out = f(jax.random.key(5), protected=jnp.asarray(prot))
    assert np.asarray(out["gen_weights"]).sum() == 1 and out["gen_weights"][0, 3] == 1


def test_rtd_rate_on_large_batch_and_jit():
    ids, mask = _random_batch(0)
    fn = jax.jit(functools.partial(courses.rtd_corrupt, mask_id=MASK, mask_rate=0.15, protected=SPECIAL))
    out = fn(jax.random.key(1), ids, mask)
    eager = courses.rtd_corrupt(jax.random.key(1), ids, mask, MASK, 0.15, SPECIAL)
    np.testing.assert_array_equal(out["gen_input"], eager["gen_input"])
    rate = float(out["gen_weights"].sum() / _free(ids, mask).sum())
    assert abs(rate - 0.15) < 0.02
    assert not (np.asarray(out["gen_weights"]).astype(bool) & ~_free(ids, mask)).any()


def test_replace_with_samples_labels_follow_electra_convention():
    ids, mask = _fixed()
    out = courses.rtd_corrupt(jax.random.key(0), ids, mask, MASK, mask_rate=0.5, protected=SPECIAL)
    w = np.asarray(out["gen_weights"]).astype(bool)
    pos = np.argwhere(w)
    # G's logits: at the first masked position G "predicts" the original; at the others token 39.
    # MASK gets the highest logit everywhere but is banned, so it must never be sampled.
    logits = np.full(ids.shape + (VOCAB,), -1e9, np.float32)
    logits[..., 39] = 0.0
    logits[..., MASK] = 10.0
    b0, t0 = pos[0]
    logits[b0, t0, 39] = -1e9
    logits[b0, t0, int(ids[b0, t0])] = 0.0
    r = courses.replace_with_samples(
        jax.random.key(1), out["gen_input"], jnp.asarray(logits), out["gen_weights"],
        original_ids=ids, banned_ids=(MASK, PAD),
    )
    d, lab = np.asarray(r["disc_input"]), np.asarray(r["disc_labels"])
    expected = np.where(w, 39, np.asarray(ids))
    expected[b0, t0] = ids[b0, t0]
    np.testing.assert_array_equal(d, expected)
    np.testing.assert_array_equal(lab, (expected != np.asarray(ids)).astype(np.int32))
    assert lab[b0, t0] == 0 and lab.sum() == w.sum() - 1
    with pytest.raises(TypeError):  # the labels need the originals
        courses.replace_with_samples(jax.random.key(1), out["gen_input"], jnp.asarray(logits), out["gen_weights"])


def test_sample_tokens_temperature_zero_is_argmax_and_shape_checked():
    ids, _ = _fixed()
    logits = jax.random.normal(jax.random.key(0), ids.shape + (VOCAB,))
    pos = jnp.ones(ids.shape, bool)
    got = courses.sample_tokens(jax.random.key(1), ids, logits, pos, temperature=0.0)
    np.testing.assert_array_equal(got, jnp.argmax(logits, -1))
    with pytest.raises(UserInputError, match="gen_logits"):
        courses.sample_tokens(jax.random.key(1), ids, logits[:, :3], pos)


# ---------------------------------------------------------------- STD


def test_std_permutes_chosen_positions_only():
    ids, mask = _fixed()
    out = courses.std_corrupt(jax.random.key(2), ids, mask, swap_rate=0.5, protected=SPECIAL)
    d, lab, sw = (np.asarray(out[k]) for k in ("disc_input", "disc_labels", "swapped"))
    free = _free(ids, mask)
    for b in range(ids.shape[0]):
        np.testing.assert_array_equal(np.sort(d[b]), np.sort(np.asarray(ids[b])))  # same multiset
    np.testing.assert_array_equal(lab, (d != np.asarray(ids)).astype(np.int32))
    # distinct words: every chosen position really moves, nothing else does
    np.testing.assert_array_equal(lab.astype(bool), sw)
    assert not (sw & ~free).any()
    # round(0.5 * 6) = 3; round(0.5 * 3) = 2 (the minimum for a swap is 2)
    np.testing.assert_array_equal(sw.sum(-1), [3, 2])
    # the swapped-LM task for G: restore the originals where the token changed
    np.testing.assert_array_equal(out["gen_input"], d)
    np.testing.assert_array_equal(out["gen_targets"], ids)
    np.testing.assert_array_equal(np.asarray(out["gen_weights"]), lab.astype(np.float32))


def test_std_duplicate_tokens_count_as_original():
    # "the x the": swapping the two "the" leaves the sequence unchanged.
    ids = jnp.array([[CLS, 10, 11, 10, SEP]], jnp.int32)
    mask = jnp.ones_like(ids)
    prot = jnp.array([[True, False, True, False, True]])
    out = courses.std_corrupt(jax.random.key(0), ids, mask, swap_rate=1.0, protected=prot)
    assert np.asarray(out["swapped"]).sum() == 2
    np.testing.assert_array_equal(out["disc_input"], ids)
    assert np.asarray(out["disc_labels"]).sum() == 0 and np.asarray(out["gen_weights"]).sum() == 0


def test_std_rate_determinism_and_jit_on_large_batch():
    ids, mask = _random_batch(1)
    fn = jax.jit(functools.partial(courses.std_corrupt, swap_rate=0.2, protected=SPECIAL))
    a, b = fn(jax.random.key(7), ids, mask), fn(jax.random.key(7), ids, mask)
    np.testing.assert_array_equal(a["disc_input"], b["disc_input"])
    eager = courses.std_corrupt(jax.random.key(7), ids, mask, 0.2, SPECIAL)
    np.testing.assert_array_equal(a["disc_input"], eager["disc_input"])
    free = _free(ids, mask)
    rate = float(np.asarray(a["disc_labels"]).sum() / free.sum())
    assert abs(rate - 0.2) < 0.02
    changed = np.asarray(a["disc_input"]) != np.asarray(ids)
    assert not (changed & ~free).any()
    for r in range(ids.shape[0]):
        np.testing.assert_array_equal(np.sort(a["disc_input"][r]), np.sort(ids[r]))


# ---------------------------------------------------------------- ITD


def _check_itd(ids, mask, out):
    """Deleting the inserted positions from the output gives the original real prefix, in order."""
    g, ins, m, src = (np.asarray(out[k]) for k in ("gen_input", "inserted", "attention_mask", "source_index"))
    ids, mask = np.asarray(ids), np.asarray(mask)
    for b in range(ids.shape[0]):
        n_new = m[b].sum()
        assert (m[b, :n_new] == 1).all() and (m[b, n_new:] == 0).all()  # right padding kept
        assert (g[b][ins[b] == 1] == MASK).all()
        assert not ins[b, n_new:].any()
        kept = g[b, :n_new][ins[b, :n_new] == 0]
        n_real = mask[b].sum()
        np.testing.assert_array_equal(kept, ids[b, : len(kept)])
        assert len(kept) == min(n_real, n_new - ins[b].sum())
        np.testing.assert_array_equal(src[b][ins[b] == 0], np.arange(ids.shape[1] - ins[b].sum()))
        assert (src[b][ins[b] == 1] == -1).all()
    np.testing.assert_array_equal(out["disc_labels"], ins)


def test_itd_inserts_inside_the_text_and_shifts_tokens():
    ids, mask = _fixed()
    out = courses.itd_corrupt(jax.random.key(0), ids, mask, MASK, insert_rate=0.34, protected=SPECIAL)
    _check_itd(ids, mask, out)
    ins, m, g = np.asarray(out["inserted"]), np.asarray(out["attention_mask"]), np.asarray(out["gen_input"])
    np.testing.assert_array_equal(ins.sum(-1), [2, 1])  # round(.34 * 6), round(.34 * 3)
    np.testing.assert_array_equal(m.sum(-1), np.asarray(mask).sum(-1) + ins.sum(-1))
    # never before the leading CLS nor after the trailing SEP
    assert (g[:, 0] == CLS).all()
    for b in range(2):
        assert g[b, m[b].sum() - 1] == SEP


def test_itd_never_cuts_sep():
    """Insertions are capped by the free padding: every original token, the final [SEP] included, survives."""
    ids, mask = _random_batch(3, B=64, T=24)  # many rows with little or no padding
    ids, mask = np.array(ids), np.array(mask)
    ids[:8], mask[:8] = np.concatenate([[CLS], np.arange(10, 32), [SEP]]), 1  # full rows: no room at all
    out = courses.itd_corrupt(jax.random.key(4), jnp.asarray(ids), jnp.asarray(mask), MASK, insert_rate=0.34,
                              protected=SPECIAL)
    _check_itd(ids, mask, out)
    g, ins, m = (np.asarray(out[k]) for k in ("gen_input", "inserted", "attention_mask"))
    n_real, k = mask.sum(-1), ins.sum(-1)
    np.testing.assert_array_equal(m.sum(-1), n_real + k)  # nothing dropped
    np.testing.assert_array_equal(np.asarray(out["num_inserted"]), k)
    for b in range(len(ids)):
        kept = g[b, :m[b].sum()][ins[b, :m[b].sum()] == 0]
        np.testing.assert_array_equal(kept, ids[b, :n_real[b]])  # every real token, in order
        assert g[b, m[b].sum() - 1] == SEP
    assert (k[:8] == 0).all() and np.asarray(out["capped"])[:8].all()
    wanted = np.maximum(np.round(0.34 * _free(ids, mask).sum(-1)), 1)
    assert (k <= ids.shape[1] - n_real).all() and (k[~np.asarray(out["capped"])] == wanted[~np.asarray(out["capped"])]).all()
    assert (k > 0).sum() > 20


def test_itd_rate_determinism_and_jit_on_large_batch():
    ids, mask = _random_batch(2, B=48, T=48)
    fn = jax.jit(functools.partial(courses.itd_corrupt, mask_id=MASK, insert_rate=0.15, protected=SPECIAL))
    a, b = fn(jax.random.key(9), ids, mask), fn(jax.random.key(9), ids, mask)
    np.testing.assert_array_equal(a["gen_input"], b["gen_input"])
    _check_itd(ids, mask, a)
    # rows with room for every insertion: exactly the rate
    n_free = _free(ids, mask).sum(-1)
    k = np.round(0.15 * n_free)
    room = np.asarray(mask).sum(-1) + k <= ids.shape[1]
    got = np.asarray(a["inserted"]).sum(-1)
    assert room.sum() > 10
    np.testing.assert_array_equal(got[room], k[room])


def test_fill_inserted_labels_are_the_insertions():
    ids, mask = _fixed()
    out = courses.itd_corrupt(jax.random.key(0), ids, mask, MASK, insert_rate=0.34, protected=SPECIAL)
    logits = jnp.zeros(ids.shape + (VOCAB,)).at[..., 12].set(50.0)  # G "predicts" an existing word
    r = courses.fill_inserted(jax.random.key(1), out["gen_input"], logits, out["inserted"])
    ins = np.asarray(out["inserted"]).astype(bool)
    np.testing.assert_array_equal(np.asarray(r["disc_input"]), np.where(ins, 12, np.asarray(out["gen_input"])))
    np.testing.assert_array_equal(r["disc_labels"], out["inserted"])


def test_bad_shapes_raise_user_input_error():
    ids, mask = _fixed()
    with pytest.raises(UserInputError, match="attention_mask"):
        courses.rtd_corrupt(jax.random.key(0), ids, mask[:, :5], MASK)
    with pytest.raises(UserInputError, match="protected"):
        courses.std_corrupt(jax.random.key(0), ids, mask, 0.2, protected=jnp.zeros((2, 3), bool))
