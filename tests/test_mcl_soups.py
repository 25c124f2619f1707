"""Course soups: uniform, weighted and greedy averaging of pytrees and nnx.State."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from clue_jax.errors import UserInputError
from clue_jax.mcl import soups


def _tree(seed, dtype=jnp.float32):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {
        "enc": {"w": jax.random.normal(k1, (3, 4)).astype(dtype), "b": jax.random.normal(k2, (4,)).astype(dtype)},
        "step": jnp.array(seed, jnp.int32),
    }


def _close(a, b, **kw):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), **kw), a, b)


def test_soup_of_identical_models_is_the_model():
    t = _tree(0)
    _close(soups.uniform_soup([t, t, t]), t, rtol=1e-6)
    _close(soups.weighted_soup([t, t], [0.2, 0.9]), t, rtol=1e-6)


def test_uniform_soup_is_the_parameter_mean():
    trees = [_tree(i) for i in range(3)]
    soup = soups.uniform_soup(trees)
    for key in ("w", "b"):
        mean = np.mean([np.asarray(t["enc"][key]) for t in trees], axis=0)
        np.testing.assert_allclose(soup["enc"][key], mean, rtol=1e-6, atol=1e-7)
    assert int(soup["step"]) == 0  # integer leaves come from the first ingredient


def test_weighted_soup_normalises_and_one_hot_picks_an_ingredient():
    trees = [_tree(i) for i in range(3)]
    _close(soups.weighted_soup(trees, [0, 5.0, 0]), {**trees[1], "step": trees[0]["step"]}, rtol=0, atol=0)
    soup = soups.weighted_soup(trees, [1.0, 3.0, 0.0])  # = 0.25 t0 + 0.75 t1
    expect = 0.25 * np.asarray(trees[0]["enc"]["w"]) + 0.75 * np.asarray(trees[1]["enc"]["w"])
    np.testing.assert_allclose(soup["enc"]["w"], expect, rtol=1e-6, atol=1e-7)
    for bad, msg in (([1.0, 2.0], "2 weights"), ([1.0, -1.0, 1.0], "weight 1"), ([0, 0, 0], "sum to 0"),
                     ([1.0, float("nan"), 1.0], "weight 1")):
        with pytest.raises(UserInputError, match=msg):
            soups.weighted_soup(trees, bad)


def test_bf16_leaves_keep_dtype():
    trees = [_tree(i, jnp.bfloat16) for i in range(2)]
    soup = soups.uniform_soup(trees)
    assert soup["enc"]["w"].dtype == jnp.bfloat16
    mean = (np.asarray(trees[0]["enc"]["w"], np.float32) + np.asarray(trees[1]["enc"]["w"], np.float32)) / 2
    np.testing.assert_allclose(np.asarray(soup["enc"]["w"], np.float32), mean, rtol=1e-2)


def test_nnx_state_soup_loads_back_into_a_model():
    models = [nnx.Linear(3, 2, rngs=nnx.Rngs(i)) for i in range(2)]
    states = [nnx.state(m, nnx.Param) for m in models]
    soup = soups.uniform_soup(states)
    assert isinstance(soup, nnx.State)
    target = nnx.Linear(3, 2, rngs=nnx.Rngs(9))
    nnx.update(target, soup)
    mean = (models[0].kernel[...] + models[1].kernel[...]) / 2
    np.testing.assert_allclose(target.kernel[...], mean, rtol=1e-6)
    x = jnp.ones((1, 3))
    np.testing.assert_allclose(target(x), (models[0](x) + models[1](x)) / 2, rtol=1e-5)  # linear: soup = mean output


def test_mismatched_trees_name_the_path():
    a = _tree(0)
    b = {"enc": {"w": a["enc"]["w"], "bias": a["enc"]["b"]}, "step": a["step"]}
    with pytest.raises(UserInputError, match=r"ingredient 1 .*\['enc'\]\['b"):
        soups.uniform_soup([a, b])
    c = {"enc": {"w": a["enc"]["w"][:2], "b": a["enc"]["b"]}, "step": a["step"]}
    with pytest.raises(UserInputError, match=r"shape \(2, 4\) at path \['enc'\]\['w'\]"):
        soups.uniform_soup([a, a, c])
    with pytest.raises(UserInputError, match="no ingredients"):
        soups.uniform_soup([])


def test_greedy_soup_picks_the_expected_set():
    # Score = -|p - target|^2. Ingredients 0 and 1 sit on opposite sides of the target
    # (their mean is the target), ingredient 2 is far away, ingredient 3 duplicates
    # ingredient 0's direction and pulls the mean off the target.
    target = np.array([1.0, 1.0], np.float32)
    ing = [
        {"p": jnp.array(target + [0.3, 0.0])},
        {"p": jnp.array(target - [0.3, 0.1])},
        {"p": jnp.array(target + [3.0, -3.0])},
        {"p": jnp.array(target + [0.6, 0.0])},
    ]
    calls = []

    def score(tree):
        calls.append(1)
        return -float(np.sum((np.asarray(tree["p"]) - target) ** 2))

    res = soups.greedy_soup(ing, score)
    own = [score(t) for t in ing]
    assert res.scores.ingredients == pytest.approx(own)
    assert res.chosen == [0, 1]  # best first, then 1 helps; 3 and 2 would hurt
    np.testing.assert_allclose(res.soup["p"], (ing[0]["p"] + ing[1]["p"]) / 2, rtol=1e-6)
    assert res.scores.soup == pytest.approx(score(res.soup))
    assert res.scores.soup >= max(own)
    assert [(i, kept) for i, _, kept in res.scores.trials] == [(1, True), (3, False), (2, False)]

    # Given order_by, ingredients are not scored one by one (1 start score + 3 trials).
    calls.clear()
    res2 = soups.greedy_soup(ing, score, order_by=own)
    assert res2.chosen == [0, 1] and len(calls) == 4
    with pytest.raises(UserInputError, match="order_by"):
        soups.greedy_soup(ing, score, order_by=own[:2])


def test_score_weights_differ():
    scores = [46.0, 48.0, 50.0]  # raw dev scores as weights would be ~uniform (0.32, 0.33, 0.35)
    w = soups.score_weights(scores, "softmax", tau=1.0)
    assert sum(w) == pytest.approx(1.0) and w[0] < w[1] < w[2]
    assert w[2] / w[1] == pytest.approx(math.e ** 2) and w[2] > 0.85
    assert soups.score_weights(scores, "softmax", tau=1e6) == pytest.approx([1 / 3] * 3, abs=1e-5)
    assert soups.score_weights(scores, "min_subtracted") == pytest.approx([0.0, 1 / 3, 2 / 3])
    assert soups.score_weights([5.0, 5.0], "min_subtracted") == [0.5, 0.5]
    a, b = {"x": jnp.zeros(2)}, {"x": jnp.ones(2)}
    soup = soups.weighted_soup([a, b], soups.score_weights([40.0, 42.0], "min_subtracted"))
    np.testing.assert_allclose(soup["x"], [1.0, 1.0])
    with pytest.raises(UserInputError, match="tau=0"):
        soups.score_weights(scores, "softmax", tau=0)
    with pytest.raises(UserInputError, match="weighting 'raw'"):
        soups.score_weights(scores, "raw")
