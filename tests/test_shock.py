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
    cities = {"city": ["Paris", "Rome", "Oslo"], "school": ["The Louvre"]}
    counts = shock.prediction_counts(["Rome", "rome.", "Paris", "", "Narnia", "Rome"],
                                     ["Paris", "Rome", "Oslo", "Paris", "Oslo", "Louvre"],
                                     ["city"] * 5 + ["school"], cities)
    assert counts == {  # "" abstains, "Narnia" is no object, "Rome" is no school: none of them counts
        "louvre": shock.EntityCount(0, 1),
        "oslo": shock.EntityCount(0, 2),
        "paris": shock.EntityCount(1, 2),
        "rome": shock.EntityCount(2, 1),
    }
    assert counts["rome"].predicted == 2 and counts["rome"] == (2, 1)
    with pytest.raises(UserInputError, match="2 predictions but 1 gold"):
        shock.prediction_counts(["a", "b"], ["a"], ["city"], cities)
    with pytest.raises(UserInputError, match="no object set for relation"):
        shock.prediction_counts(["a"], ["a"], ["planet"], cities)


def test_free_text_predictions_are_no_entities():
    """A model that decodes free text: only its answers that are objects of the relation enter the statistic."""
    objects = {"r": [f"object {i}" for i in range(20)]}
    golds = [f"object {i % 20}" for i in range(60)]
    preds = [f"babble {i}" if i % 3 else golds[i] for i in range(60)]
    counts = shock.prediction_counts(preds, golds, ["r"] * 60, objects)
    assert len(counts) == 20 and sum(c.predicted for c in counts.values()) == 20
    freqs = {o: shock.EntityFreq(i, 20 - i) for i, o in enumerate(objects["r"])}
    assert shock.shock_statistic(freqs, counts)["n"] == 20


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
    counts = shock.prediction_counts([names[i] for i in preds], [names[i] for i in golds], ["r"] * len(golds),
                                     {"r": names})
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


# ------------------------------------------------------------------ null and partial statistics on simulated worlds
def zipf_world(seed, skewed, n_objects=60, n_test=150, n_ft=200, n_pretrain=2000):
    """One relation with Zipf objects: pre-training counts, test golds and fine-tuning answers drawn from the same
    Zipf law; when `skewed`, a quarter of each pre-training stratum is left out of fine-tuning and a quarter
    repeated 4 times (finetune_data.stratified_skew)."""
    from clue_jax.extraction import finetune_data

    rng = np.random.default_rng(seed)
    names = [f"object {i}" for i in range(n_objects)]
    p = 1.0 / np.arange(1, n_objects + 1)
    p /= p.sum()
    pt = rng.multinomial(n_pretrain, p)
    golds = rng.choice(n_objects, n_test, p=p)
    ft = np.bincount(rng.choice(n_objects, n_ft, p=p), minlength=n_objects)
    labels = {}
    if skewed:
        ranked = [names[i] for i in np.argsort(-pt, kind="stable")]
        labels = finetune_data.stratified_skew(ranked, 3, 0.25, 0.25, rng)
        mult = {"left_out": 0, "plain": 1, "oversampled": 4}
        ft = np.array([ft[i] * mult[labels[n][1]] for i, n in enumerate(names)])
    freqs = {n: shock.EntityFreq(int(a), int(b)) for n, a, b in zip(names, pt, ft)}
    return rng, names, pt, ft, golds, freqs


def simulated(seed, skewed, errors):
    """(statistics with their calibrated null) of a predictor right 40% of the time whose errors are drawn with
    weights `errors(pt, ft)`."""
    rng, names, pt, ft, golds, freqs = zipf_world(seed, skewed)
    w = errors(pt.astype(float), ft.astype(float))
    right = rng.random(len(golds)) < 0.4
    preds = np.where(right, golds, rng.choice(len(names), len(golds), p=w / w.sum()))
    pred_s, gold_s = [names[i] for i in preds], [names[i] for i in golds]
    counts = shock.prediction_counts(pred_s, gold_s, ["r"] * len(gold_s), {"r": names})
    stat = shock.shock_statistics(freqs, counts)
    null = shock.calibrated_null(freqs, gold_s, [a == b for a, b in zip(pred_s, gold_s)], ["r"] * len(golds),
                                 draws=60, seed=seed)
    return {**shock.with_null(stat, null), "permutation_p": shock.permutation_pvalue(freqs, counts, 3, 99, seed)}


UNIFORM = lambda pt, ft: np.ones_like(pt)  # noqa: E731  errors ignore frequency
FREQUENT = lambda pt, ft: (pt + 1.0) ** 1.5  # noqa: E731  errors favour what pre-training made common (a base model)
SHOCKED = lambda pt, ft: ft + 0.5  # noqa: E731  errors follow the fine-tuning answer distribution


def test_raw_statistic_is_confounded_partial_is_not():
    """No skew: a uniform-random predictor has a clearly positive raw rho (the confound the partial statistic removes) but a partial
    rho inside its null; so does a predictor whose errors follow pre-training frequency."""
    seeds = range(12)
    raw = [simulated(s, False, UNIFORM) for s in seeds]
    assert np.mean([r["rho"] for r in raw]) > 0.1
    for errors in (UNIFORM, FREQUENT):
        runs = raw if errors is UNIFORM else [simulated(s, False, errors) for s in seeds]
        z = np.array([r["partial_rho_z"] for r in runs])
        assert abs(z.mean()) < 1.0 and np.sum(z > 2.5) <= 1, z
        above = [r["partial_rho"] > r["null"]["partial_rho"]["q95"] for r in runs]
        assert sum(above) <= 3
        p = np.array([r["permutation_p"] for r in runs])
        assert p.mean() > 0.3 and np.sum(p < 0.05) <= 2, p


def test_skewed_world_shows_the_shock_against_its_null():
    for seed in range(4):
        shocked = simulated(seed, True, SHOCKED)
        assert shocked["partial_rho"] > shocked["null"]["partial_rho"]["q95"] and shocked["partial_rho_z"] > 3
        assert shocked["permutation_p"] < 0.02
    # The same skewed worlds with frequency-blind errors: no shock.
    blind = [simulated(seed, True, UNIFORM) for seed in range(4)]
    assert all(b["partial_rho_z"] < 2.5 for b in blind)
    assert sum(b["permutation_p"] < 0.05 for b in blind) <= 1


def test_calibrated_null_keeps_correct_answers_and_draws_within_the_group():
    freqs = {"a": shock.EntityFreq(5, 0), "b": shock.EntityFreq(1, 3), "x": shock.EntityFreq(2, 2)}
    golds, groups = ["a", "b", "a", "x"], ["r", "r", "r", "s"]
    null = shock.calibrated_null(freqs, golds, [True, False, False, False], groups, draws=20, seed=1)
    assert null["draws"] == 20 and set(null) == {"draws", "rho", "partial_rho"}
    # The only wrong answer group "r" can give for "b" is "a", for "a" it is "b"; group "s" has no other object.
    # So every draw predicts a, a, b, "" : the null has no spread.
    assert null["rho"]["std"] == 0.0 or math.isnan(null["rho"]["std"])
    with pytest.raises(UserInputError, match="calibrated_null"):
        shock.calibrated_null(freqs, golds, [True], groups)


def test_partial_spearman_removes_a_shared_control():
    rng = np.random.default_rng(0)
    z = rng.normal(size=500)
    x, y = z + 0.3 * rng.normal(size=500), z + 0.3 * rng.normal(size=500)
    assert scipy_rho(x, y) > 0.8
    assert abs(shock.partial_spearman(x, y, [z])) < 0.15
    w = rng.normal(size=500)
    assert shock.partial_spearman(x + w, y + w, [z]) > 0.5
    assert math.isnan(shock.partial_spearman(x[:3], y[:3], [z[:3]]))


def scipy_rho(x, y):
    import scipy.stats

    return scipy.stats.spearmanr(x, y).statistic


def test_pred_over_gold_by_stratum():
    stratum = {("major", "Botany"): 0, ("major", "Law"): 0, ("major", "Art"): 1}
    label = {("major", "Botany"): "left_out", ("major", "Law"): "plain", ("major", "Art"): "oversampled"}
    table = shock.pred_over_gold_by_stratum(["major"] * 4 + ["city"], ["Botany", "Botany", "Law", "Art", "Art"],
                                            ["law", "Botany", "Art", "Art", "Botany"], stratum, label, 2)
    assert table["0"]["left_out"] == {"pred": 1, "gold": 2, "ratio": 0.5}
    assert table["0"]["plain"] == {"pred": 1, "gold": 1, "ratio": 1.0}
    assert table["1"]["oversampled"] == {"pred": 2, "gold": 1, "ratio": 2.0}  # "Botany" asked as a city: not counted
    assert math.isnan(table["1"]["left_out"]["ratio"])


# ------------------------------------------------------------------ undefined statistics are undefined, never significant
def test_a_predictor_that_names_no_object_has_no_p_value():
    """Abstaining or answering free text: pred = 0 everywhere, so y = -log(gold + 1) is a function of a control and the
    partial statistic, its z and its permutation p are undefined -- not p = 1 / (1 + draws)."""
    _, names, _, _, golds, freqs = zipf_world(0, True)
    gold_s = [names[i] for i in golds]
    for answer in ("", "I do not know"):
        counts = shock.prediction_counts([answer] * len(gold_s), gold_s, ["r"] * len(gold_s), {"r": names})
        assert math.isnan(shock.shock_statistics(freqs, counts)["partial_rho"])
        assert math.isnan(shock.permutation_pvalue(freqs, counts, 3, 99, 0))


def test_permutations_that_cannot_change_the_statistic_give_p_one():
    """Fine-tuning counts equal within every pre-training stratum: each permutation ties with the observed value."""
    rng, names, pt, _, golds, _ = zipf_world(1, False)
    preds = np.where(rng.random(len(golds)) < 0.5, golds, rng.choice(len(names), len(golds)))
    counts = shock.prediction_counts([names[i] for i in preds], [names[i] for i in golds], ["r"] * len(golds),
                                     {"r": names})
    entities = [names.index(e) for e in counts]  # the permutation's strata: these entities by pre-training count
    ft = np.zeros(len(names), int)
    for s, g in enumerate(np.array_split(np.asarray(entities)[np.argsort(-pt[entities], kind="stable")], 3)):
        ft[g] = 40 * (2 - s)  # the frequent strata fine-tuned most, so x is no function of pre-training
    freqs = {n: shock.EntityFreq(int(a), int(b)) for n, a, b in zip(names, pt, ft)}
    assert math.isfinite(shock.shock_statistics(freqs, counts)["partial_rho"])
    assert shock.permutation_pvalue(freqs, counts, 3, 50, 0) == 1.0


def test_undefined_permutation_draws_are_left_out(monkeypatch):
    _, names, _, _, golds, freqs = zipf_world(2, True)
    gold_s = [names[i] for i in golds]
    counts = shock.prediction_counts(gold_s[::-1], gold_s, ["r"] * len(gold_s), {"r": names})
    calls = []

    def partial(x, y, controls):  # the observed statistic is 0.5; the draws alternate undefined / 0.9
        calls.append(1)
        return 0.5 if len(calls) == 1 else (math.nan if len(calls) % 2 else 0.9)

    monkeypatch.setattr(shock, "partial_spearman", partial)
    assert shock.permutation_pvalue(freqs, counts, 3, 20, 0) == 1.0  # 10 defined draws, all above
    calls.clear()
    monkeypatch.setattr(shock, "partial_spearman", lambda x, y, c: 0.5 if not calls.append(1) and len(calls) == 1
                        else math.nan)
    assert math.isnan(shock.permutation_pvalue(freqs, counts, 3, 20, 0))  # no defined draw: no p-value


def test_the_explained_variable_rule_does_not_depend_on_the_number_of_entities():
    """y entirely explained by a control is undefined at every n (the old bar, 1e-9 * n on the raw scale, let rounding
    noise through from about a thousand entities on); a real partial correlation is the same at every n."""
    rng = np.random.default_rng(0)
    for n in (30, 3000, 20000):
        gold, pt = rng.integers(0, 20, n).astype(float), rng.integers(0, 50, n).astype(float)
        x = rng.normal(size=n)
        assert math.isnan(shock.partial_spearman(x, -np.log1p(gold), [np.log1p(pt), np.log1p(gold)])), n
    z = rng.normal(size=40)
    x, y, c = z + rng.normal(size=40), z + rng.normal(size=40), rng.normal(size=40)
    once = shock.partial_spearman(x, y, [c])
    assert math.isfinite(once)
    assert shock.partial_spearman(np.tile(x, 100), np.tile(y, 100), [np.tile(c, 100)]) == pytest.approx(once)
