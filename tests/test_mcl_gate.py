"""Discriminator-rows accounting, the compute-matched arm, the downstream gate and the answerable-only F1."""
import numpy as np
import pytest

from clue_jax.mcl import accounting, downstream, downstream_gate
from clue_jax.mcl.objective import CORRECTIONS, ObjectiveConfig
from clue_jax.pipelines import mcl_pretrain
from configs import mcl_compare


def _rows(courses, corrections=(), sampling="all", batch=16, weights=()):
    cfg = ObjectiveConfig(courses=courses, corrections=corrections, sampling=sampling, course_weights=weights)
    return accounting.discriminator_rows(cfg, batch)


def test_discriminator_rows_against_hand_counts():
    all3 = ("rtd", "std", "itd")
    assert _rows(("rtd",))["total"] == 16  # ELECTRA: one D pass over the batch
    assert _rows(all3)["total"] == 48  # three tiled course copies
    mcl = _rows(all3, CORRECTIONS)
    assert (mcl["main"], mcl["re_discrimination"], mcl["total"], mcl["relative_to_batch"]) == (48, 48, 96, 6.0)
    assert _rows(all3, ("re_rtd_disc", "re_std_disc"))["total"] == 96  # re-discrimination is what costs D rows
    assert _rows(all3, ("re_rtd_gen", "re_std_gen"))["total"] == 48  # re-generation is a G pass
    # One course per step: the re-discrimination pass runs on the steps drawing rtd or std (2 of 3 uniformly).
    assert _rows(all3, CORRECTIONS, "step")["total"] == pytest.approx(16 + 16 * 2 / 3)
    assert _rows(all3, ("re_rtd_disc",), "step", weights=(2, 1, 1))["total"] == pytest.approx(24)
    assert _rows(all3, CORRECTIONS, "example")["total"] == 32


def test_compute_matched_arm_matches_mcl():
    config = mcl_compare.get_config()  # sampling "all", batch 16
    rows = mcl_pretrain.rows_per_step(config, ["electra", "all3", "mcl", "all3_redisc", "electra_matched"])
    assert {a: r["total"] for a, r in rows.items()} == {"electra": 16, "all3": 48, "mcl": 96, "all3_redisc": 96,
                                                        "electra_matched": 96}
    assert mcl_pretrain.batch_multiplier(config, "electra_matched") == 6
    assert mcl_pretrain.batch_multiplier(config, "mcl") == 1
    config.objective.sampling = "step"  # MCL's rows are then 16 + 16 * 2/3: ELECTRA needs twice its batch
    assert mcl_pretrain.batch_multiplier(config, "electra_matched") == 2


def test_downstream_gate_passes_and_fails():
    rng = np.random.default_rng(0)
    base = rng.uniform(0.0, 0.5, size=(3, 200))
    better = {str(s): base[s] + rng.uniform(0.1, 0.3, 200) for s in range(3)}
    floor = {str(s): base[s] for s in range(3)}
    passed = downstream_gate.downstream_gate(better, floor, n_boot=300)
    assert passed["passed"] and passed["difference"]["low"] > 0 and passed["questions"] == 200
    noise = {str(s): base[s] + rng.normal(0.0, 0.05, 200) for s in range(3)}
    failed = downstream_gate.downstream_gate(noise, floor, n_boot=300)
    assert not failed["passed"] and failed["difference"]["low"] <= 0 <= failed["difference"]["high"]
    assert downstream_gate.downstream_gate({"0": [1.0]}, {"1": [0.0]})["passed"] is False


def test_answerable_only_f1_by_hand():
    # Two answerable questions (F1 1.0 and 0.5) and one unanswerable: its span F1 does not count.
    assert downstream.answerable_only_f1(np.array([1.0, 0.5, 0.0]), np.array([False, False, True])) == 0.75
    assert np.isnan(downstream.answerable_only_f1(np.array([0.0]), np.array([True])))
