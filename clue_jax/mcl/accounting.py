"""Discriminator rows per optimizer step: the compute an arm spends on the discriminator.

A detection or downstream gain bought with more discriminator rows per step
is not a gain of the objective. How `objective.make_objective` spends rows:
- the main D pass sees the batch once per course under sampling="all"
  (the batch is tiled once per enabled course), once otherwise;
- the re-discrimination pass (re_rtd_disc / re_std_disc) is a second D pass
  over every row of that (tiled) batch, run on a step when some row's course
  has its re-discrimination loss on. Under sampling="step" a step's rows all
  follow one drawn course, so the pass runs on the share of steps drawing
  such a course; under "example" and "all" some row nearly always needs it.
"""
from __future__ import annotations

import math

from clue_jax.mcl.objective import COURSES, ObjectiveConfig


def discriminator_rows(cfg: ObjectiveConfig, batch_size: int) -> dict:
    """{"main", "re_discrimination", "total"}: expected D rows per optimizer step of an arm with objective `cfg`
    and `batch_size` rows per step, and "relative_to_batch" = total / batch_size."""
    copies = len(cfg.courses) if cfg.sampling == "all" else 1
    main = batch_size * copies
    redisc = {c for c in COURSES if f"re_{c}_disc" in cfg.corrections}
    if not redisc:
        share = 0.0
    elif cfg.sampling == "step":
        probs = dict(zip(COURSES, cfg.probabilities()))
        share = sum(probs[c] for c in redisc)
    else:
        share = 1.0
    re_rows = main * share
    total = main + re_rows
    return {"main": float(main), "re_discrimination": float(re_rows), "total": float(total),
            "relative_to_batch": total / batch_size}


def matching_multiplier(target: dict, reference: dict) -> int:
    """The whole factor by which the reference arm's batch grows to spend at least the target's D rows per step."""
    ratio = target["total"] / reference["total"]
    return max(1, math.ceil(ratio - 1e-9))  # 1e-9: a ratio computed as 6.000000001 is 6

