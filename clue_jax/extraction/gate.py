"""The extraction gate: does the fine-tuned model know anything about the test people?

The questions whose answer the skew left out of fine-tuning cannot be
answered from the fine-tuning answer distribution; a model answers them
beyond a knowledge-free predictor (extraction/baselines.py) only with
knowledge of the person. The gate passes when the model's exact match on
those questions beats the best knowledge-free predictor's on the same
questions, with the paired bootstrap interval over people x seeds
(eval/bootstrap.paired_difference) above 0. Until it passes, comparisons
of remedies for frequency shock compare predictors without knowledge.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from clue_jax.eval import bootstrap, metrics


def left_out_people(test_items, left_out: Mapping[str, Sequence[str]]) -> dict[str, list[int]]:
    """{person: indices of their test questions whose gold answer the skew left out}, people without one omitted."""
    sets = {rel: set(objs) for rel, objs in left_out.items()}
    out: dict[str, list[int]] = {}
    for i, it in enumerate(test_items):
        if it.answer in sets.get(it.attribute, ()):
            out.setdefault(it.name, []).append(i)
    return out


def person_em(test_items, preds: Sequence[str], people: Mapping[str, Sequence[int]]) -> np.ndarray:
    """Per person (in `people`'s order), the mean exact match over their indexed questions."""
    return np.array([np.mean([metrics.exact_match(preds[i], test_items[i].answer) for i in idx])
                     for idx in people.values()], np.float64)


def extraction_gate(test_items, model_preds: Mapping[str, Sequence[str]],
                    knowledge_free: Mapping[str, Mapping[str, Sequence[str]]], left_out: Mapping[str, Sequence[str]],
                    n_boot: int = 2000, seed: int = 0) -> dict:
    """The gate on the left-out questions.

    model_preds: {seed: test predictions} of the fine-tuned model; knowledge_free: {predictor: {seed: test
    predictions}} with the same seeds; left_out: {relation: objects left out of fine-tuning}. The best
    knowledge-free predictor is the one with the highest mean exact match on the left-out questions. Returns
    {"passed", "difference" (mean, low, high, seeds, people), "model_exact_match", "best_knowledge_free",
    "best_knowledge_free_exact_match", "knowledge_free_exact_match", "questions", "people"}."""
    seeds = sorted(model_preds)
    people = left_out_people(test_items, left_out)
    questions = sum(len(v) for v in people.values())
    out = {"passed": False, "seeds": seeds, "questions": questions, "people": len(people)}
    if not people or not seeds:
        return {**out, "reason": "no test question has an answer left out of fine-tuning"}
    missing = [n for n, runs in knowledge_free.items() if set(runs) != set(seeds)]
    if missing:
        raise ValueError(f"extraction gate: knowledge-free predictors {missing} lack some of the seeds {seeds}")

    def scores(by_seed):
        return np.stack([person_em(test_items, by_seed[s], people) for s in seeds])

    model = scores(model_preds)
    free = {name: scores(runs) for name, runs in knowledge_free.items()}
    best = max(free, key=lambda n: (float(free[n].mean()), n))
    diff = bootstrap.paired_difference(model, free[best], n_boot=n_boot, seed=seed)
    return {**out, "passed": bool(math.isfinite(diff["low"]) and diff["low"] > 0), "difference": diff,
            "model_exact_match": float(model.mean()), "best_knowledge_free": best,
            "best_knowledge_free_exact_match": float(free[best].mean()),
            "knowledge_free_exact_match": {n: float(v.mean()) for n, v in free.items()}}
