"""Clue dropout: ranks, keep probabilities, deletion with compaction, statistics of the drops."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clue_jax.clues import dropout as D
from clue_jax.errors import UserInputError


def test_contrast_and_rank_with_ties_and_padding():
    s_large = jnp.array([[0.3, 0.9, 0.9, 0.1, 0.5, 7.0], [1.0, 1.0, 0.0, -0.0, 2.0, 3.0]])
    s_small = jnp.array([[0.2, 0.4, 0.4, 0.3, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    mask = jnp.array([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    d = D.contrast(s_large, s_small)
    np.testing.assert_allclose(d, np.asarray(s_large) - np.asarray(s_small))
    rank = np.asarray(D.descending_rank(d, mask))
    # row 0: d = .1 .5 .5 -.2 0 (pad): ties broken by position, padding last despite d=7
    np.testing.assert_array_equal(rank[0], [2, 0, 1, 4, 3, 5])
    # row 1: d = 1 1 0 -0 2 3: -0.0 and 0.0 tie, the earlier first
    np.testing.assert_array_equal(rank[1], [2, 3, 4, 5, 1, 0])
    # left padding: padding still ranked last
    rank = np.asarray(D.descending_rank(jnp.array([[9.0, 1.0, 2.0]]), jnp.array([[0, 1, 1]])))
    np.testing.assert_array_equal(rank[0], [2, 1, 0])


def test_keep_probabilities_per_method():
    mask = jnp.array([[1, 1, 1, 1, 0]])
    ids = jnp.array([[5, 6, 7, 8, 0]])
    scores = jnp.array([[0.1, 0.4, 0.3, 0.2, 0.0]])  # ranks 3 0 1 2
    prot = D.protected_mask(ids, mask, jnp.array([7]))
    np.testing.assert_array_equal(prot[0], [False, False, True, False, True])
    a, b = 0.6, 0.5
    keep = np.asarray(D.keep_probabilities(scores, mask, prot, a, b, "contrast"))
    p = lambda r: a * (1 - np.exp(-b * r))
    np.testing.assert_allclose(keep[0], [1 - p(3), 1 - p(0), 1.0, 1 - p(2), 1.0], rtol=1e-6)
    assert keep[0, 1] == 1.0  # rank 0 is never dropped
    keep = np.asarray(D.keep_probabilities(None, mask, prot, a, b, "random"))
    np.testing.assert_allclose(keep[0], [0.4, 0.4, 1.0, 0.4, 1.0], rtol=1e-6)
    keep = np.asarray(D.keep_probabilities(None, mask, prot, a, b, "plain"))
    np.testing.assert_array_equal(keep, 1.0)
    np.testing.assert_allclose(D.drop_probability(jnp.arange(3), 0.7, 0.1), 0.7 * (1 - np.exp(-0.1 * np.arange(3))), rtol=1e-6)


def test_drop_tokens_exact_compaction():
    ids = jnp.array([[11, 12, 13, 14, 15, 0], [0, 0, 21, 22, 23, 24]])
    mask = jnp.array([[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]])
    keep = jnp.array([[1.0, 0.0, 1.0, 0.0, 1.0, 1.0], [1.0, 1.0, 0.0, 1.0, 1.0, 0.0]])
    out_ids, out_mask = D.drop_tokens(jax.random.key(0), ids, mask, keep, -1)
    np.testing.assert_array_equal(out_ids, [[11, 13, 15, -1, -1, -1], [22, 23, -1, -1, -1, -1]])
    np.testing.assert_array_equal(out_mask, [[1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]])
    assert out_ids.shape == ids.shape


def _ranked_batch(b, t, seed=0):
    """ids = position + 1 (so survivors tell which positions were kept); random distinct scores."""
    rng = np.random.default_rng(seed)
    ids = np.tile(np.arange(1, t + 1, dtype=np.int32), (b, 1))
    scores = rng.standard_normal((b, t)).astype(np.float32)
    return jnp.asarray(ids), jnp.ones((b, t), jnp.int32), jnp.asarray(scores)


def _kept_positions(in_ids, out_ids):
    out = np.asarray(out_ids)
    return np.stack([np.isin(np.asarray(in_ids)[i], out[i]) for i in range(out.shape[0])])


def test_drop_rate_per_rank_matches_p_of_r():
    b, t = 3000, 48
    alpha, beta = 0.7, 0.08
    ids, mask, scores = _ranked_batch(b, t)
    cfg = D.DropoutConfig(method="contrast", alpha=alpha, beta=beta, original_fraction=0.0)
    out = D.augment_batch(jax.random.key(1), {"input_ids": ids, "attention_mask": mask}, scores, cfg)
    dropped = ~_kept_positions(ids, out["input_ids"])
    rank = np.asarray(D.descending_rank(scores, mask))
    rate = np.array([dropped[rank == r].mean() for r in range(t)])
    p = alpha * (1 - np.exp(-beta * np.arange(t)))
    sigma = np.sqrt(np.maximum(p * (1 - p), 1e-12) / b)
    assert np.all(np.abs(rate - p) <= 4.5 * sigma + 1e-9), np.max(np.abs(rate - p) / np.maximum(sigma, 1e-9))
    assert rate[0] == 0.0
    # the survivors keep their order and the mask counts them
    out_ids, out_mask = np.asarray(out["input_ids"]), np.asarray(out["attention_mask"])
    for i in range(5):
        n = out_mask[i].sum()
        assert np.all(np.diff(out_ids[i, :n]) > 0) and np.all(out_ids[i, n:] == 0)
    np.testing.assert_array_equal(out_mask.sum(-1), (~dropped).sum(-1))


def test_random_baseline_rate_protected_and_plain():
    b, t = 2000, 32
    ids, mask, _ = _ranked_batch(b, t)
    cfg = D.DropoutConfig(method="random", alpha=0.6, original_fraction=0.0, protected_ids=(1, 5))
    out = D.augment_batch(jax.random.key(2), {"input_ids": ids, "attention_mask": mask}, None, cfg)
    kept = _kept_positions(ids, out["input_ids"])
    assert kept[:, 0].all() and kept[:, 4].all()  # ids 1 and 5 are protected
    free = np.delete(kept, [0, 4], axis=1)
    n = free.size
    assert abs((1 - free.mean()) - 0.6) < 4.5 * np.sqrt(0.6 * 0.4 / n)
    plain = D.augment_batch(jax.random.key(2), {"input_ids": ids, "attention_mask": mask}, None,
                            D.DropoutConfig(method="plain"))
    np.testing.assert_array_equal(plain["input_ids"], ids)
    np.testing.assert_array_equal(plain["attention_mask"], mask)


def test_protected_kept_under_heavy_dropout_and_batch_keys():
    b, t = 64, 16
    ids, mask, scores = _ranked_batch(b, t, seed=3)
    mask = mask.at[:, 12:].set(0)
    # make the protected tokens rank last so they would be dropped with probability ~alpha
    scores = scores.at[:, 2].set(-100.0).at[:, 7].set(-100.0)
    batch = {"input_ids": ids, "attention_mask": mask, "scores_large": scores, "scores_small": jnp.zeros_like(scores),
             "labels": ids * 10, "example_id": jnp.arange(b)}
    cfg = D.DropoutConfig(method="contrast", alpha=1.0, beta=5.0, original_fraction=0.0, protected_ids=(3, 8))
    out = D.augment_batch(jax.random.key(4), batch, None, cfg)
    kept = _kept_positions(ids, out["input_ids"]) & np.asarray(mask > 0)
    assert kept[:, 2].all() and kept[:, 7].all()
    # with beta this large everything but rank 0 and the protected tokens goes
    assert (kept.sum(-1) == 3).all()
    np.testing.assert_array_equal(out["labels"], out["input_ids"] * 10)  # per-token keys move with their token
    np.testing.assert_array_equal(out["example_id"], np.arange(b))  # other keys pass through
    with pytest.raises(UserInputError, match="scores_small"):
        D.augment_batch(jax.random.key(0), {"input_ids": ids, "attention_mask": mask, "scores_large": scores},
                        None, cfg)


def test_original_fraction_determinism_and_jit():
    b, t = 4000, 12
    ids, mask, scores = _ranked_batch(b, t, seed=5)
    batch = {"input_ids": ids, "attention_mask": mask, "scores_large": scores}
    cfg = D.DropoutConfig(method="attention", alpha=0.7, beta=1.0, original_fraction=0.3)

    @jax.jit
    def step(rng, batch):  # inside a jitted step: no concretization errors
        return D.augment_batch(rng, batch, None, cfg)

    out1 = step(jax.random.key(6), batch)
    out2 = step(jax.random.key(6), batch)
    out3 = step(jax.random.key(7), batch)
    np.testing.assert_array_equal(out1["input_ids"], out2["input_ids"])
    assert not np.array_equal(out1["input_ids"], out3["input_ids"])
    untouched = np.asarray(out1["attention_mask"]).sum(-1) == t
    # P(no token dropped | augmented) = prod_r (1 - p(r)) is tiny here, so untouched ~ original
    assert abs(untouched.mean() - 0.3) < 4.5 * np.sqrt(0.3 * 0.7 / b)
    with pytest.raises(UserInputError, match="method"):
        D.DropoutConfig(method="nope")
    with pytest.raises(UserInputError, match="alpha"):
        D.DropoutConfig(alpha=1.5)
    with pytest.raises(UserInputError, match="unknown key"):
        D.DropoutConfig.from_dict({"alpah": 0.6})


def test_fixed_copies():
    ids = jnp.array([[1, 2, 3, 4, 5, 0], [6, 7, 8, 0, 0, 0]])
    mask = (ids > 0).astype(jnp.int32)
    scores = jnp.array([[5.0, 4, 3, 2, 1, 0], [3.0, 2, 1, 0, 0, 0]])
    cfg = D.DropoutConfig(method="contrast", alpha=0.9, beta=2.0)
    out_ids, out_mask = D.fixed_copies(jax.random.key(0), ids, mask, scores, cfg, 3)
    assert out_ids.shape == (8, 6) and out_mask.shape == (8, 6)
    np.testing.assert_array_equal(out_ids[0], ids[0])
    np.testing.assert_array_equal(out_ids[4], ids[1])
    for row in range(1, 4):  # copies of example 0 keep its rank-0 token first and draw independently
        assert out_ids[row, 0] == 1 and set(np.asarray(out_ids[row])) <= {0, 1, 2, 3, 4, 5}
    for row in range(5, 8):
        assert out_ids[row, 0] == 6 and set(np.asarray(out_ids[row])) <= {0, 6, 7, 8}
    assert len({tuple(np.asarray(out_ids[r])) for r in range(1, 4)}) > 1


def test_rate_matched_expects_contrasts_number_of_drops_per_document():
    b, t = 4, 20
    ids, mask, scores = _ranked_batch(b, t, seed=8)
    mask = mask.at[1, 14:].set(0).at[3, 6:].set(0)  # documents of different lengths
    prot = D.protected_mask(ids, mask, jnp.array([3, 9]))
    a, beta = 0.7, 0.2
    contrast_keep = np.asarray(D.keep_probabilities(scores, mask, prot, a, beta, "contrast"))
    matched = np.asarray(D.keep_probabilities(scores, mask, prot, a, beta, "rate_matched"))
    free = ~np.asarray(prot)
    np.testing.assert_allclose(((1 - matched) * free).sum(-1), ((1 - contrast_keep) * free).sum(-1), rtol=1e-5)
    for e in range(b):  # one rate per document over its droppable tokens; protected and padding always kept
        assert np.ptp(matched[e][free[e]]) < 1e-6
        assert np.all(matched[e][~free[e]] == 1.0)
    assert np.ptp(contrast_keep[0][free[0]]) > 0.1  # contrast itself is not uniform
    # drawn: the mean number of deletions per document matches contrast's expectation
    n = 3000
    big = {"input_ids": jnp.tile(ids[:1], (n, 1)), "attention_mask": jnp.tile(mask[:1], (n, 1)),
           "scores_large": jnp.tile(scores[:1], (n, 1)), "scores_small": jnp.zeros((n, t))}
    cfg = D.DropoutConfig(method="rate_matched", alpha=a, beta=beta, original_fraction=0.0, protected_ids=(3, 9))
    out = D.augment_batch(jax.random.key(9), big, None, cfg)
    drops = t - np.asarray(out["attention_mask"]).sum(-1)
    expected = ((1 - contrast_keep[0]) * free[0]).sum()
    assert abs(drops.mean() - expected) < 4.5 * drops.std() / np.sqrt(n)


def test_shuffled_ranks_each_document_by_anothers_contrast():
    b, t = 3, 10
    ids, mask, s_large = _ranked_batch(b, t, seed=10)
    s_small = jnp.asarray(np.random.default_rng(11).standard_normal((b, t)), jnp.float32)
    batch = {"input_ids": ids, "attention_mask": mask, "scores_large": s_large, "scores_small": s_small}
    d = np.asarray(s_large - s_small)
    shuffled = np.asarray(D.ranking_scores("shuffled", batch))
    np.testing.assert_allclose(shuffled, np.roll(d, -1, axis=0), rtol=1e-6)  # row i ranked by row i + 1's d
    np.testing.assert_allclose(np.asarray(D.ranking_scores("contrast", batch)), d, rtol=1e-6)
    prot = D.protected_mask(ids, mask, jnp.array([], jnp.int32))
    keep_s = np.asarray(D.keep_probabilities(jnp.asarray(shuffled), mask, prot, 0.7, 0.3, "shuffled"))
    keep_c = np.asarray(D.keep_probabilities(jnp.asarray(d), mask, prot, 0.7, 0.3, "contrast"))
    np.testing.assert_allclose(np.sort(keep_s, -1), np.sort(keep_c, -1), rtol=1e-6)  # the same drop profile
    assert not np.allclose(keep_s, keep_c)  # at other positions
    out = D.augment_batch(jax.random.key(0), batch, None, D.DropoutConfig(method="shuffled", original_fraction=0.0))
    assert out["input_ids"].shape == ids.shape
    with pytest.raises(UserInputError, match="at least 2 documents"):
        D.ranking_scores("shuffled", {k: v[:1] for k, v in batch.items()})
    # fixed copies of the whole set: each document's copies follow the next document's ranking
    cfg = D.DropoutConfig(method="shuffled", alpha=1.0, beta=50.0)  # keeps only rank 0 (of the other document)
    out_ids, out_mask = D.fixed_copies(jax.random.key(1), ids, mask, D.ranking_scores("shuffled", batch), cfg, 2)
    for e in range(b):
        top = int(np.argmax(d[(e + 1) % b]))
        np.testing.assert_array_equal(np.asarray(out_ids)[e * 3 + 1, :1], [int(ids[e, top])])
        assert int(np.asarray(out_mask)[e * 3 + 1].sum()) == 1
