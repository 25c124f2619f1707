"""Model mixing: exact endpoints, convex combination, normalisation, mixture decoding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clue_jax.errors import UserInputError
from clue_jax.eval import decode
from clue_jax.extraction import mixing

V = 7


def logp(seed, shape=(3, V)):
    return jax.nn.log_softmax(jax.random.normal(jax.random.PRNGKey(seed), shape) * 3, axis=-1)


def test_interpolate_endpoints_exact_and_convex_in_between():
    a, b = logp(0), logp(1)
    np.testing.assert_array_equal(mixing.interpolate(a, b, 1.0), a)
    np.testing.assert_array_equal(mixing.interpolate(a, b, 0.0), b)
    mixed = mixing.interpolate(a, b, 0.3)
    np.testing.assert_allclose(jnp.exp(mixed), 0.3 * jnp.exp(a) + 0.7 * jnp.exp(b), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(jax.nn.logsumexp(mixed, axis=-1), 0.0, atol=1e-6)


def test_interpolate_is_stable_for_tiny_probabilities():
    a = jnp.array([-2000.0, 0.0])
    b = jnp.array([-2001.0, 0.0])
    out = mixing.interpolate(a, b, 0.5)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out[0], -2000.0 + np.log(0.5 * (1 + np.exp(-1.0))), rtol=1e-6)


def test_log_linear_normalises_and_endpoints():
    a, b = logp(2), logp(3)
    mixed = mixing.log_linear(a, b, 0.4)
    np.testing.assert_allclose(jax.nn.logsumexp(mixed, axis=-1), 0.0, atol=1e-6)
    np.testing.assert_allclose(mixed, jax.nn.log_softmax(0.4 * a + 0.6 * b), atol=1e-6)
    np.testing.assert_allclose(mixing.log_linear(a, b, 1.0), a, atol=1e-6)
    np.testing.assert_allclose(mixing.log_linear(a, b, 0.0), b, atol=1e-6)
    # A weight of 0 removes a model exactly, even where it gives probability 0.
    masked = b.at[:, 0].set(-jnp.inf)
    assert np.isfinite(mixing.log_linear(a, masked, 1.0)).all()


def bigram(probs):
    table = jnp.log(jnp.asarray(probs, jnp.float32))

    def logits_fn(ids, mask):
        return table[ids]

    return logits_fn


# Both models, from token 0: ft prefers 1, pt prefers 3, their average prefers 2.
FT = np.full((4, 4), 0.01)
PT = np.full((4, 4), 0.01)
FT[0] = [0.01, 0.5, 0.4, 0.09]
PT[0] = [0.01, 0.09, 0.4, 0.5]
for t in (1, 2, 3):
    FT[t] = np.eye(4)[(t % 3) + 1] * 0.9 + 0.025
    PT[t] = np.eye(4)[((t + 1) % 3) + 1] * 0.9 + 0.025


def test_decode_mixture_endpoints_equal_single_models():
    fn_ft, fn_pt = bigram(FT), bigram(PT)
    ids_ft, m_ft = decode.left_pad([[0], [2, 3]], pad_id=0)
    ids_pt, m_pt = decode.left_pad([[1, 1, 0], [3]], pad_id=0)  # different prompts for the pre-trained model
    for lam, fn, ids, m in ((1.0, fn_ft, ids_ft, m_ft), (0.0, fn_pt, ids_pt, m_pt)):
        for mode in mixing.MODES:
            got = mixing.greedy_decode_mixture(fn_ft, fn_pt, ids_ft, m_ft, ids_pt, m_pt, lam, mode, max_new_tokens=4)
            np.testing.assert_array_equal(got, decode.greedy_decode(fn, ids, m, max_new_tokens=4))


def test_decode_mixture_picks_the_compromise_token():
    fn_ft, fn_pt = bigram(FT), bigram(PT)
    ids, m = decode.left_pad([[0]], pad_id=0)
    assert decode.greedy_decode(fn_ft, ids, m, max_new_tokens=1)[0, 0] == 1
    assert decode.greedy_decode(fn_pt, ids, m, max_new_tokens=1)[0, 0] == 3
    got = mixing.greedy_decode_mixture(fn_ft, fn_pt, ids, m, ids, m, 0.5, "interpolate", max_new_tokens=1)
    assert got[0, 0] == 2
    compiled = mixing._mixture_jit._cache_size()
    for lam in (0.2, 0.7):  # lambda is traced: a sweep reuses the compiled program
        mixing.greedy_decode_mixture(fn_ft, fn_pt, ids, m, ids, m, lam, "interpolate", max_new_tokens=1)
    assert mixing._mixture_jit._cache_size() == compiled
    same_input = decode.greedy_decode(mixing.mixed_logits_fn(fn_ft, fn_pt, 0.5), ids, m, max_new_tokens=1)
    assert same_input[0, 0] == 2


def test_mixed_logits_fn_endpoints_and_bad_lambda():
    fn_ft, fn_pt = bigram(FT), bigram(PT)
    ids, m = decode.left_pad([[0, 1, 2, 3]], pad_id=0)
    mixed = mixing.mixed_logits_fn(fn_ft, fn_pt, 1.0, "interpolate")
    np.testing.assert_array_equal(mixed(ids, m), jax.nn.log_softmax(fn_ft(ids, m), axis=-1))
    with pytest.raises(UserInputError, match="lambda"):
        mixing.mixed_logits_fn(fn_ft, fn_pt, 1.5)
    with pytest.raises(UserInputError, match="mode"):
        mixing.mixed_logits_fn(fn_ft, fn_pt, 0.5, "average")


def test_mix_candidate_scores():
    ft = np.log(np.array([[0.6, 0.3, 0.1]]) * 0.01)  # unnormalised sequence log-probs
    pt = np.log(np.array([[0.1, 0.2, 0.7]]) * 0.5)
    np.testing.assert_allclose(mixing.mix_candidate_scores(ft, pt, 1.0), np.log([[0.6, 0.3, 0.1]]), atol=1e-6)
    half = mixing.mix_candidate_scores(ft, pt, 0.5)
    np.testing.assert_allclose(np.exp(half), [[0.35, 0.25, 0.4]], atol=1e-6)
    assert half.argmax() == 2
    loglin = mixing.mix_candidate_scores(ft, pt, 0.5, "log_linear")
    np.testing.assert_allclose(np.exp(loglin).sum(), 1.0, atol=1e-6)
    # Without normalisation the model giving the set more mass dominates.
    raw = mixing.mix_candidate_scores(ft, pt, 0.5, normalize=False)
    assert raw.argmax() == 2 and np.exp(raw).sum() == pytest.approx(0.5 * 0.01 + 0.5 * 0.5, rel=1e-5)


def test_choose_lambda():
    best, scores = mixing.choose_lambda(lambda lam: -(lam - 0.3) ** 2)
    assert best == 0.3 and len(scores) == 11 and scores[1.0] < scores[0.3]
    best, _ = mixing.choose_lambda(lambda lam: 1.0, grid=(0.5, 0.2))
    assert best == 0.5  # ties go to the first in grid order
    with pytest.raises(UserInputError, match="NaN"):
        mixing.choose_lambda(lambda lam: float("nan"))
