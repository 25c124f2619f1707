"""The downstream gate: pre-training must help the downstream task before arms are compared on it.

If pre-trained ELECTRA does not beat a randomly initialised discriminator
fine-tuned the same way, the task sits at a floor where any difference
between pre-training objectives is noise. The gate compares per-question
F1 on the test questions, paired by question and seed (the same questions,
the same fine-tuning seed), with the two-way paired bootstrap over
seeds x questions (eval/bootstrap.paired_difference); it passes when the
interval lies above 0.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from clue_jax.eval import bootstrap


def downstream_gate(pretrained: Mapping[str, Sequence[float]], random_init: Mapping[str, Sequence[float]],
                    n_boot: int = 2000, seed: int = 0) -> dict:
    """{seed: per-question scores} of the pre-trained reference arm and of random init (same questions in the
    same order) -> {"passed", "difference", "pretrained", "random_init", "seeds", "questions"}; seeds present
    in only one arm are left out."""
    seeds = sorted(set(pretrained) & set(random_init))
    if not seeds:
        return {"passed": False, "reason": "no seed has both the pre-trained and the random-init scores",
                "seeds": [], "questions": 0}
    a = np.stack([np.asarray(pretrained[s], np.float64) for s in seeds])
    b = np.stack([np.asarray(random_init[s], np.float64) for s in seeds])
    diff = bootstrap.paired_difference(a, b, n_boot=n_boot, seed=seed)
    return {"passed": bool(math.isfinite(diff["low"]) and diff["low"] > 0), "difference": diff,
            "pretrained": float(a.mean()), "random_init": float(b.mean()), "seeds": seeds,
            "questions": int(a.shape[1])}
