"""The teacher gate on synthetic attention: a large teacher that favours the name passes, one that does not fails."""
import numpy as np

from clue_jax.clues import analysis, gate


def _attention(favour_name: bool, n=60, t=30, seed=0):
    """Rows of the far query (position t - 1) for both teachers; name tokens at 1..3, BOS at 0."""
    rng = np.random.default_rng(seed)
    mask = np.ones((n, t), np.int32)
    names = np.zeros((n, t), np.int32)
    names[:, 1:4] = 1
    small = rng.dirichlet(np.ones(t), size=n)
    large = small + rng.normal(0, 0.01, (n, t))
    if favour_name:
        large[:, 1:4] += 0.2
    bos = np.zeros_like(mask)
    bos[:, 0] = 1
    return large, small, mask, names, bos, np.full(n, t - 1)


def _gate(favour_name, em_large):
    large, small, mask, names, bos, query = _attention(favour_name)
    far = analysis.top_tokens_from_query(large, small, mask, query, k=10, name_token_mask=names, exclude_mask=bos)
    chance = analysis.chance_per_example(mask * (1 - bos), names, query)
    em_small = {"birth_date": 0.5, "company": 0.1, "all": 0.3}
    return gate.teacher_gate(em_small, em_large, far["shares"], chance, min_gap=0.1, n_boot=500)


def test_gate_passes_when_the_large_teacher_is_stronger_and_favours_the_name():
    g = _gate(True, {"birth_date": 0.9, "company": 0.4, "all": 0.65})
    assert g["passed"] and abs(g["capability"]["mean_gap"] - 0.35) < 1e-12
    far = g["far_clue"]
    assert abs(far["name_share"] - 0.3) < 1e-12  # all 3 name tokens among the top 10
    assert abs(far["chance"] - 3 / 28) < 1e-9  # 3 name tokens among 28 candidates (no BOS, before the query)
    assert far["excess"]["low"] > 0
    assert gate.describe(g)[0].startswith("Teacher gate PASSED")


def test_gate_fails_without_the_far_clue_or_the_capability_gap():
    g = _gate(False, {"birth_date": 0.9, "company": 0.4, "all": 0.65})
    assert not g["far_clue"]["passed"] and not g["passed"]
    assert g["far_clue"]["excess"]["low"] < 0 < g["far_clue"]["excess"]["high"]  # at chance
    assert "does not favour the name" in gate.describe(g)[0]
    weak = _gate(True, {"birth_date": 0.55, "company": 0.1, "all": 0.33})
    assert weak["far_clue"]["passed"] and not weak["capability"]["passed"] and not weak["passed"]
    assert "not clearly stronger" in gate.describe(weak)[0] and "FAILED" in gate.describe(weak)[0]


def test_far_clue_not_measured_on_documents_without_names():
    g = gate.teacher_gate({"all": 0.1, "a": 0.1}, {"all": 0.5, "a": 0.5}, [], [])
    assert g["far_clue"]["passed"] is None and g["passed"]
    assert "not measured" in gate.describe(g)[-1]
