"""The teacher gate: can this teacher pair show the effect at all? (docs/methods.md, "How every claim is tested")

Clue dropout rests on two premises about its teachers; where they fail, a
student result says nothing about the method, so the report prints the gate
first and says when it failed:

1. capability: the large teacher knows more. Both teachers are asked about
   the background people they were pre-trained on; the large one must beat
   the small one by `min_gap` exact match averaged over the attributes.
2. the far clue: from the token before the far value (the company), the keys
   the large teacher attends to more than the small one hold more name tokens
   than chance. Per document: share of name tokens among the top-k keys minus
   that document's chance share; the bootstrap interval over documents of the
   mean must lie above 0.

The bootstrap sees one fixed pair, not the spread between seeds: two teachers
of one size already differ as much. `clue_jax.clues.gate_stats` calibrates the
attention half against same-size seed pairs (`python -m clue_jax.gate`).
"""
from __future__ import annotations

import numpy as np

from clue_jax.errors import UserInputError
from clue_jax.eval import bootstrap


def capability(em_small: dict[str, float], em_large: dict[str, float], min_gap: float) -> dict:
    """Per-attribute EM of both teachers and whether the large one leads by `min_gap` on average."""
    attrs = sorted(a for a in em_small if a != "all")
    if not attrs or set(attrs) - set(em_large):
        raise UserInputError(f"gate: the teachers' EM tables must name the same attributes, got {sorted(em_small)} "
                             f"and {sorted(em_large)}")
    gap = float(np.mean([em_large[a] - em_small[a] for a in attrs]))
    return {"per_attribute": {a: {"small": em_small[a], "large": em_large[a]} for a in attrs},
            "mean_gap": gap, "min_gap": min_gap, "passed": bool(gap >= min_gap)}


def far_clue(shares, chance, n_boot: int = 2000, seed: int = 0) -> dict:
    """Name share among the top keys against chance, per document, with a bootstrap interval of the excess."""
    shares, chance = np.asarray(shares, np.float64), np.asarray(chance, np.float64)
    if shares.shape != chance.shape:
        raise UserInputError(f"gate: shares {shares.shape} and chance {chance.shape} must be per document alike")
    excess = bootstrap.mean_interval(shares - chance, n_boot=n_boot, seed=seed)
    if excess["n"] == 0:  # no document with a name and a far value (a user corpus): not measured
        return {"name_share": float("nan"), "chance": float("nan"), "excess": excess, "passed": None}
    return {"name_share": float(np.nanmean(shares)), "chance": float(np.nanmean(chance)), "excess": excess,
            "passed": bool(excess["low"] > 0)}


def teacher_gate(em_small: dict, em_large: dict, shares, chance, min_gap: float = 0.1, n_boot: int = 2000,
                 params: dict | None = None) -> dict:
    """Both checks and `passed` (both passed; the far clue counts only where measured);
    `params`: the teachers' parameter counts, reported beside."""
    cap = capability(em_small, em_large, min_gap)
    far = far_clue(shares, chance, n_boot)
    return {"capability": cap, "far_clue": far, "params": params or {},
            "passed": bool(cap["passed"] and far["passed"] is not False)}


def describe(gate: dict, far_attribute: str = "company", probe: str = "qa") -> list[str]:
    """Report lines: the verdict first, then the numbers behind it."""
    cap, far = gate["capability"], gate["far_clue"]
    head = ("Teacher gate PASSED: the large teacher is stronger and attends to the name from afar; the student "
            "results below test the method." if gate["passed"] else
            "Teacher gate FAILED: " + "; ".join(
                w for w, ok in (("the large teacher is not clearly stronger", cap["passed"]),
                                ("the large teacher does not favour the name from afar",
                                 far["passed"] is not False)) if not ok)
            + ". The student results below do not test the paper's premise.")
    p = gate.get("params") or {}
    sizes = f" (parameters: small {p['small']:,}, large {p['large']:,})" if p else ""
    lines = [head, "", f"- {probe} exact match on background people{sizes}, small / large: " + ", ".join(
        f"{a} {v['small']:.2f} / {v['large']:.2f}" for a, v in cap["per_attribute"].items())
             + f"; mean gap {cap['mean_gap']:+.3f} (needs >= {cap['min_gap']})",
             f"- name share among the top-10 keys the large teacher attends to more than the small one, from the "
             f"token before the {far_attribute}: " + (
                 f"{far['name_share']:.3f} against chance {far['chance']:.3f}; excess "
                 f"{bootstrap.describe(far['excess'])} (95% bootstrap over {far['excess']['n']} documents)"
                 if far["passed"] is not None else "not measured (the documents have no known names)")]
    return lines
