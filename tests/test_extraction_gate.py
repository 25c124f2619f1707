"""Knowledge-free predictors, the extraction gate and the shock size measure, on constructed worlds."""
import collections

import numpy as np
import pytest

from clue_jax.data.bios import QAItem
from clue_jax.extraction import baselines, gate, shock_size

CITIES = ["Paris", "Rome", "Oslo", "Lima", "Kyiv", "Baku"]
LEFT_OUT = {"birth_city": ["Oslo", "Lima"]}
OVERSAMPLED = ["Kyiv", "Baku"]


def _world(people=40):
    """Test people, each with one birth-city question; answers cycle through CITIES."""
    return [QAItem(f"P{i}", "birth_city", f"Where was P{i} born?", CITIES[i % len(CITIES)]) for i in range(people)]


def _finetune_items():
    """The skewed fine-tuning set: left-out cities absent, over-sampled ones repeated 3 times."""
    items = []
    for i, city in enumerate(CITIES * 5):
        if city in LEFT_OUT["birth_city"]:
            continue
        items += [QAItem(f"F{i}", "birth_city", "q", city)] * (3 if city in OVERSAMPLED else 1)
    return items


def test_knowledge_free_predictors():
    test, ft = _world(12), _finetune_items()
    prior = _world(60) + [QAItem("X", "birth_city", "q", "Paris")] * 5
    preds = baselines.knowledge_free_predictions(test, ft, prior, seed=0)
    assert set(preds) == set(baselines.NAMES) and all(len(p) == len(test) for p in preds.values())
    assert set(preds["majority:finetune"]) == {"Kyiv"}  # first of the repeated cities
    assert set(preds["majority:prior"]) == {"Paris"}
    assert not set(preds["sample:finetune"]) & set(LEFT_OUT["birth_city"])  # never answers a left-out city
    assert preds["sample:prior"] == baselines.knowledge_free_predictions(test, ft, prior, seed=0)["sample:prior"]
    assert preds["sample:prior"] != baselines.knowledge_free_predictions(test, ft, prior, seed=1)["sample:prior"]
    drawn = collections.Counter(baselines.sampled_predictions(_world(3000), baselines.answers_by_relation(ft), 0))
    assert drawn["Kyiv"] / drawn["Paris"] == pytest.approx(3.0, rel=0.25)  # in proportion to the counts


def test_gate_passes_for_knowledge_and_fails_for_replay():
    test, ft = _world(60), _finetune_items()
    free = {name: {s: p for s in ("0", "1")}
            for name, p in baselines.knowledge_free_predictions(test, ft, _world(60), 0).items()}
    knows = [it.answer for it in test]  # knows every person, the left-out cities included
    replay = baselines.knowledge_free_predictions(test, ft, _world(60), 7)["sample:finetune"]
    passed = gate.extraction_gate(test, {"0": knows, "1": knows}, free, LEFT_OUT, n_boot=300)
    assert passed["passed"] and passed["difference"]["low"] > 0 and passed["model_exact_match"] == 1.0
    assert passed["people"] == passed["questions"] == 20
    assert passed["best_knowledge_free"] in baselines.NAMES
    assert passed["best_knowledge_free_exact_match"] == max(passed["knowledge_free_exact_match"].values())
    failed = gate.extraction_gate(test, {"0": replay, "1": replay}, free, LEFT_OUT, n_boot=300)
    assert not failed["passed"] and failed["model_exact_match"] == 0.0
    assert failed["difference"]["high"] <= 0
    none = gate.extraction_gate(test, {"0": knows}, {}, {"birth_city": []})
    assert none["passed"] is False and none["questions"] == 0


def _skew():
    strata = {c: (0 if c in ("Paris", "Oslo", "Kyiv") else 1) for c in CITIES}
    label = {c: "left_out" if c in LEFT_OUT["birth_city"] else "oversampled" if c in OVERSAMPLED else "plain"
             for c in CITIES}
    return {"stratum": {"birth_city": strata}, "label": {"birth_city": label}}


def test_shock_size_known_values():
    test = _world(60)
    exact = shock_size.shock_size(test, {"0": [it.answer for it in test]}, _skew(), n_boot=200)
    assert exact["overall"]["mean"] == pytest.approx(0.0, abs=1e-12)
    assert exact["strata"]["0"]["low"] == exact["strata"]["0"]["high"] == 0.0
    # Only over-sampled cities predicted: each has gold 10 and is predicted 30 times; left-out ones never.
    shocked = [OVERSAMPLED[i % 2] for i in range(len(test))]
    size = shock_size.shock_size(test, {"0": shocked, "1": shocked}, _skew(), smoothing=1.0, n_boot=200)
    expected = np.log(31 / 11) - np.log(1 / 11)
    assert size["strata"]["0"]["mean"] == pytest.approx(expected)
    assert size["overall"]["mean"] == pytest.approx(expected) and size["overall"]["low"] > 1.0
    assert size["seeds"] == 2 and size["people"] == 60
