"""Frequency-shock measurement: counts, the rank statistic on synthetic predictors, buckets, plot."""

import math

import numpy as np
import pytest

from clue_jax.errors import UserInputError
from clue_jax.extraction import shock


def test_entity_frequencies_and_prediction_counts():
    freqs = shock.entity_frequencies(
        ["Paris", "paris", "The Louvre", "Rome", ""], ["Louvre", "Rome", "rome", "Oslo"]
    )
    assert freqs == {
        "louvre": shock.EntityFreq(1, 1),
        "oslo": shock.EntityFreq(0, 1),
        "paris": shock.EntityFreq(2, 0),
        "rome": shock.EntityFreq(1, 2),
    }
    counts = shock.prediction_counts(["Rome", "rome.", "Paris", ""], ["Paris", "Rome", "Oslo", "Paris"])
    assert counts == {
        "oslo": shock.EntityCount(0, 1),
        "paris": shock.EntityCount(1, 2),
        "rome": shock.EntityCount(2, 1),
    }
    assert counts["rome"].predicted == 2 and counts["rome"] == (2, 1)
    with pytest.raises(UserInputError, match="2 predictions but 1 gold"):
        shock.prediction_counts(["a", "b"], ["a"])


def synthetic_world(seed=0, n_entities=200, n_test=10000):
    """Entities with independent pre-training and fine-tuning frequencies, and test golds."""
    rng = np.random.default_rng(seed)
    names = [f"entity {i}" for i in range(n_entities)]
    pt = rng.integers(0, 200, n_entities)
    ft = rng.integers(0, 30, n_entities)
    freqs = {n: shock.EntityFreq(int(p), int(f)) for n, p, f in zip(names, pt, ft)}
    golds = rng.integers(0, n_entities, n_test)
    ratio = np.log((ft + 1.0) / (pt + 1.0))
    return rng, names, freqs, golds, ratio


def predict(rng, golds, n_entities, wrong_weights):
    """Right half the time; otherwise an entity drawn with `wrong_weights`."""
    wrong = rng.choice(n_entities, size=len(golds), p=wrong_weights / wrong_weights.sum())
    return np.where(rng.random(len(golds)) < 0.5, golds, wrong)


def statistic_for(weights_from_ratio, seed=0):
    rng, names, freqs, golds, ratio = synthetic_world(seed)
    preds = predict(rng, golds, len(names), weights_from_ratio(ratio))
    counts = shock.prediction_counts([names[i] for i in preds], [names[i] for i in golds])
    return shock.shock_statistic(freqs, counts)


def test_biased_predictor_shows_the_shock():
    stat = statistic_for(lambda r: np.exp(r))  # over-predicts what fine-tuning over-represents
    assert stat["n"] == 200
    assert stat["rho"] > 0.6 and stat["p_value"] < 1e-3


def test_reverse_bias_is_negative_and_unbiased_is_near_zero():
    assert statistic_for(lambda r: np.exp(-r))["rho"] < -0.6
    for seed in (0, 1):
        assert abs(statistic_for(lambda r: np.ones_like(r), seed)["rho"]) < 0.2


def test_statistic_undefined_cases():
    freqs = {"a": shock.EntityFreq(1, 1)}
    counts = {"a": shock.EntityCount(1, 1), "b": shock.EntityCount(0, 1)}
    stat = shock.shock_statistic(freqs, counts)
    assert stat["n"] == 2 and math.isnan(stat["rho"])
    with pytest.raises(UserInputError, match="smoothing"):
        shock.shock_statistic(freqs, counts, smoothing=0.0)


def test_bucket_accuracy():
    freqs = {
        "ann": shock.EntityFreq(pretrain=10, finetune=3),  # seen / frequent
        "bo": shock.EntityFreq(pretrain=0, finetune=2),  # seen / rare
        "cy": shock.EntityFreq(pretrain=50, finetune=0),  # unseen / frequent
        "di": shock.EntityFreq(pretrain=1, finetune=0),  # unseen / rare
    }
    records = [
        {"prediction": "ann", "answer": "Ann"},
        {"prediction": "x", "answer": "ann"},
        {"prediction": "bo", "answer": "bo"},
        {"prediction": "cy", "answer": "cy"},
        {"prediction": "bo", "answer": "di"},
        {"prediction": "di", "answer": "di"},
        {"prediction": "bo", "answer": "di"},
    ]
    out = shock.bucket_accuracy(records, freqs)
    assert out["threshold"] == 5.5  # median of 10, 0, 50, 1 over the distinct tested entities
    b = out["buckets"]
    assert list(b) == list(shock.BUCKETS)
    assert b["seen/frequent"]["exact_match"] == 0.5 and b["seen/frequent"]["count"] == 2
    assert b["seen/rare"]["exact_match"] == 1.0 and b["seen/rare"]["count"] == 1
    assert b["unseen/frequent"]["exact_match"] == 1.0 and b["unseen/frequent"]["count"] == 1
    assert b["unseen/rare"]["exact_match"] == pytest.approx(1 / 3) and b["unseen/rare"]["count"] == 3
    fixed = shock.bucket_accuracy(records[:2], freqs, frequent_threshold=20)
    assert fixed["buckets"]["seen/rare"]["count"] == 2
    assert fixed["buckets"]["seen/frequent"]["count"] == 0
    assert math.isnan(fixed["buckets"]["seen/frequent"]["exact_match"])


def test_plot_shock_writes_png(tmp_path):
    freqs = {f"e{i}": shock.EntityFreq(i, 10 - i) for i in range(6)}
    counts = {f"e{i}": shock.EntityCount(10 - i, 3) for i in range(6)}
    path = tmp_path / "shock.png"
    stat = shock.plot_shock(freqs, counts, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert stat["rho"] == pytest.approx(1.0)
