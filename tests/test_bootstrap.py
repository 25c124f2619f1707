"""Paired bootstrap over people x seeds: a null world covers 0, a shifted one does not; pairing matters."""
import numpy as np
import pytest

from clue_jax.errors import UserInputError
from clue_jax.eval import bootstrap


def test_null_world_covers_zero_and_a_shift_does_not():
    rng = np.random.default_rng(0)
    people = rng.random(70) < 0.4  # person effects: who is easy
    a = (rng.random((3, 70)) < 0.3 + 0.4 * people).astype(float)
    b = (rng.random((3, 70)) < 0.3 + 0.4 * people).astype(float)  # same world: no effect
    null = bootstrap.paired_difference(a, b, n_boot=1000)
    assert null["low"] < 0 < null["high"] and (null["seeds"], null["people"]) == (3, 70)
    shifted = (rng.random((3, 70)) < 0.5 + 0.4 * people).astype(float)
    up = bootstrap.paired_difference(shifted, b, n_boot=1000)
    assert up["low"] > 0 and bootstrap.verdict(up, "ahead", "behind") == "ahead"
    assert bootstrap.verdict(bootstrap.paired_difference(b, shifted), "ahead", "behind") == "behind"
    assert bootstrap.verdict(null, "ahead", "behind") == "no clear difference"


def test_pairing_removes_person_effects():
    rng = np.random.default_rng(1)
    person = rng.normal(0, 1.0, 70)
    a = person + 0.1 + rng.normal(0, 0.05, (3, 70))
    b = person + rng.normal(0, 0.05, (3, 70))
    paired = bootstrap.paired_difference(a, b, n_boot=1000)
    assert paired["low"] > 0.05 and paired["high"] < 0.15  # person spread (sd 1) does not enter
    assert abs(paired["mean"] - (a - b).mean()) < 1e-12


def test_mean_interval_and_shapes():
    iv = bootstrap.mean_interval(np.r_[np.full(50, 0.2), np.nan], n_boot=200)
    assert iv["n"] == 50 and iv["low"] == pytest.approx(0.2) and iv["high"] == pytest.approx(0.2)
    assert bootstrap.mean_interval([np.nan])["n"] == 0
    with pytest.raises(UserInputError, match="equal shapes"):
        bootstrap.paired_difference(np.zeros((3, 5)), np.zeros((2, 5)))
    assert bootstrap.describe({"mean": 0.05, "low": -0.01, "high": 0.1}) == "+0.050 [-0.010, +0.100]"


def test_mean_interval_on_scipy_gives_the_former_intervals():
    """scipy.stats.bootstrap (percentile) against the intervals of the project's own resampling, same seeds."""
    rng = np.random.default_rng(3)
    normal, shares = rng.normal(0.1, 1, 60), rng.integers(0, 2, 70).astype(float) - 0.3
    for values, low, high in ((normal, -0.18168554318435112, 0.3438914470520645),
                              (shares, 0.15714285714285708, 0.38571428571428573),
                              ([0.2, 0.4], 0.2, 0.4)):
        iv = bootstrap.mean_interval(values)
        assert iv["low"] == pytest.approx(low, abs=1e-12) and iv["high"] == pytest.approx(high, abs=1e-12)
