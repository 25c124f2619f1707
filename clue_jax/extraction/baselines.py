"""Knowledge-free predictors of the test answers: what a model can score without knowing the test people.

A fine-tuned model that has only learned the answer distribution of its
fine-tuning set scores like these predictors; its exact match means
extracted knowledge only where it beats the best of them on the same
questions. Each predictor sees the relation asked and nothing of the person:
- majority:<source>: always the most frequent answer of the relation;
- sample:<source>: an answer drawn from the relation's answers (seeded);
with <source> "finetune" (the skewed fine-tuning answers, repeats counted:
the most shock a model without knowledge can show) or "prior" (every person's
true answer in the world: no shock at all).
"""
from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence

import numpy as np

from clue_jax.errors import UserInputError

SOURCES = ("finetune", "prior")
NAMES = tuple(f"{kind}:{src}" for kind in ("majority", "sample") for src in SOURCES)


def answers_by_relation(items) -> dict[str, list[str]]:
    """The answers of `items` (objects with .attribute and .answer) grouped by relation, repeats kept."""
    out: dict[str, list[str]] = {}
    for it in items:
        out.setdefault(it.attribute, []).append(it.answer)
    return out


def _answers_for(answers: Mapping[str, Sequence[str]], relation: str, source: str) -> Sequence[str]:
    pool = answers.get(relation)
    if not pool:
        raise UserInputError(f"knowledge-free predictor: the {source} answers have none for relation {relation!r}")
    return pool


def majority_predictions(test_items, answers: Mapping[str, Sequence[str]], source: str = "answers") -> list[str]:
    """The relation's most frequent answer for every question (ties: the answer first seen)."""
    top = {}
    for it in test_items:
        if it.attribute not in top:
            top[it.attribute] = collections.Counter(_answers_for(answers, it.attribute, source)).most_common(1)[0][0]
    return [top[it.attribute] for it in test_items]


def sampled_predictions(test_items, answers: Mapping[str, Sequence[str]], seed: int,
                        source: str = "answers") -> list[str]:
    """For every question an answer drawn uniformly from the relation's answers (so in proportion to their
    counts), from a generator seeded by `seed`."""
    rng = np.random.default_rng([seed, 53])
    return [str(rng.choice(np.asarray(_answers_for(answers, it.attribute, source), dtype=object)))
            for it in test_items]


def knowledge_free_predictions(test_items, finetune_items, prior_items, seed: int) -> dict[str, list[str]]:
    """Every knowledge-free predictor's answers to `test_items` ({name: predictions}, names as in NAMES).

    `finetune_items`: the skewed fine-tuning set; `prior_items`: one question per (person, relation) of the whole
    world (the true answer prior). Only the samplers depend on `seed`."""
    pools = {"finetune": answers_by_relation(finetune_items), "prior": answers_by_relation(prior_items)}
    out = {}
    for src in SOURCES:
        out[f"majority:{src}"] = majority_predictions(test_items, pools[src], src)
        out[f"sample:{src}"] = sampled_predictions(test_items, pools[src], seed, src)
    return {name: out[name] for name in NAMES}
