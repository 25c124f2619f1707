"""The teacher gate on constructed teachers: one that favours the targets passes, a same-size pair does not."""
import numpy as np

from clue_jax.clues import analysis, gate, gate_stats


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


# The calibrated gate (clues/gate_stats.py): seeds per size, the same-size null, a permutation test.

TARGETS = slice(2, 5)


def _teachers(n_seeds: int, bump: float, n_docs=40, t=24):
    """Scores of n_seeds "large" and "small" teachers: one recipe (shared base) plus seed noise;
    the large ones add `bump` on the target tokens."""
    base = np.random.default_rng(99).random((n_docs, t))
    def one(seed, extra):
        s = base + np.random.default_rng(seed).normal(0, 0.05, base.shape)
        s[:, TARGETS] += extra
        return s
    return [one(100 + i, bump) for i in range(n_seeds)], [one(200 + i, 0.0) for i in range(n_seeds)]


def _calibrated(n_seeds, bump):
    large, small = _teachers(n_seeds, bump)
    mask = np.ones_like(large[0], np.int32)
    targets = np.zeros_like(mask)
    targets[:, TARGETS] = 1
    stat = lambda a, b: gate_stats.method_statistic(a, b, mask, targets, k=5)["top_k_share"]
    chance = gate_stats.method_statistic(large[0], small[0], mask, targets, k=5)["chance"]
    return gate_stats.calibrate(stat, large, small, chance)


def test_method_statistic_ranks_as_the_method_does():
    s_large = np.array([[0.0, 0.5, 0.1, 0.4, 0.0, 9.0]])
    mask = np.array([[1, 1, 1, 1, 1, 0]])  # the padding's score is ignored
    targets = np.array([[0, 1, 0, 1, 0, 0]])
    out = gate_stats.method_statistic(s_large, np.zeros_like(s_large), mask, targets, k=2)
    assert gate_stats.method_ranks(s_large, np.zeros_like(s_large), mask).tolist() == [[3, 0, 2, 1, 4, 5]]
    assert out["top_k_share"] == 1.0 and out["mean_rank"] == 0.125 and out["chance"] == 0.4
    none = gate_stats.method_statistic(s_large, np.zeros_like(s_large), mask, np.zeros_like(targets))
    assert none["documents"] == 0 and np.isnan(none["top_k_share"])


def test_far_query_statistic_counts_targets_before_the_query():
    large = np.array([[0.1, 0.6, 0.3, 0.0], [0.5, 0.5, 0.0, 0.0]])
    small = np.array([[0.4, 0.2, 0.4, 0.0], [0.5, 0.5, 0.0, 0.0]])
    targets = np.array([[0, 1, 1, 0], [0, 0, 1, 0]])
    out = gate_stats.far_query_statistic(large, small, targets, [2, 2])  # doc 2's target is not before q
    assert out["documents"] == 1 and abs(out["mass_difference"] - 0.4) < 1e-12


def test_permutation_p_on_a_hand_checked_case():
    assert abs(gate_stats.permutation_p([3.0, 4.0], [1.0, 2.0]) - 1 / 6) < 1e-12  # 1 of C(4,2) labellings
    assert abs(gate_stats.permutation_p([1.0, 4.0], [2.0, 3.0]) - 4 / 6) < 1e-12  # sums 5, 6, 7, 5 of 3..7
    assert gate_stats.permutation_p([1.0], [1.0]) == 1.0


def test_a_pair_that_favours_the_targets_passes_the_calibrated_gate():
    g = _calibrated(2, bump=0.3)
    assert len(g["cross"]) == 4 and len(g["null"]) == 4 and g["pairs"]["null"][0] == ["small0", "small1"]
    assert min(g["cross"]) > max(g["null"]) and g["statistic"] > g["chance"]
    assert abs(g["p"] - 1 / 70) < 1e-12 and g["passed"] is True  # the best of C(8, 4) labellings


def test_a_same_size_pair_does_not_pass():
    g = _calibrated(2, bump=0.0)
    assert g["p"] > 0.05 and g["passed"] is False and "not beyond" in g["reason"]


def test_one_seed_per_size_has_no_null_and_never_passes():
    g = _calibrated(1, bump=0.3)
    assert g["passed"] is None and g["null"] == [] and "no null" in g["reason"] and g["beyond_chance"]
    assert gate_stats.verdict({"method": g, "far": None}) == (None, g["reason"])


def test_negative_control_and_verdict():
    large, small = _teachers(2, bump=0.3)
    untrained = [np.random.default_rng(5).random(large[0].shape)]
    mask = np.ones_like(large[0], np.int32)
    targets = np.zeros_like(mask)
    targets[:, TARGETS] = 1
    stat = lambda a, b: gate_stats.method_statistic(a, b, mask, targets, k=5)["top_k_share"]
    g = gate_stats.calibrate(stat, large, small, chance=3 / 24)
    control = gate_stats.negative_control(stat, large, untrained, g)
    assert len(control["values"]) == 2 and control["statistic"] < g["statistic"] and control["pair_exceeds_control"]
    rank = gate_stats.calibrate(lambda a, b: gate_stats.method_statistic(a, b, mask, targets, k=5)["mean_rank"],
                                large, small, chance=0.5, higher_is_more=False)
    assert rank["passed"] and gate_stats.negative_control(
        lambda a, b: gate_stats.method_statistic(a, b, mask, targets, k=5)["mean_rank"], large, untrained,
        rank)["pair_exceeds_control"]  # a lower mean rank is more
    failed = {**g, "passed": False, "reason": "not beyond the same-size null"}
    assert gate_stats.verdict({"method": g, "far": failed})[0] is False
    assert gate_stats.verdict({"method": g})[0] is True
