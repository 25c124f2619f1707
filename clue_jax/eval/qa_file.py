"""QA files: the user's questions with their gold answers, and the rule a gold answer must meet.

A gold answer is scored after SQuAD normalisation (eval/metrics.py: case,
punctuation and the articles a/an/the dropped). An answer that normalises to
nothing ("", "the", ".") would be matched by any prediction that normalises to
nothing too ("::::", an empty decode): every model would score exact match and
F1 of 1.0 on it. So such an answer is refused where a QA file is read, and the
built-in world's probes are held to the same rule (`qa_eval.Probe`).
"""
from __future__ import annotations

import os

from clue_jax.data.corpus import json_objects, string_field
from clue_jax.errors import UserInputError
from clue_jax.eval.metrics import normalize_answer

REQUIRED = ("question", "answer")
OPTIONAL = ("attribute", "name")


def answer_problem(answer: str) -> str | None:
    """Why `answer` cannot be a gold answer, or None when it can."""
    if normalize_answer(answer):
        return None
    return (f"answer {answer!r} normalises to nothing (case, punctuation and the articles a/an/the are dropped "
            "before scoring), so any empty prediction would match it: a gold answer needs a word")


def read_qa_file(path: str | os.PathLike) -> list[dict[str, str]]:
    """QA pairs from JSONL: each line {"question", "answer"[, "attribute", "name"]} (strings).

    Other keys are ignored; optional keys are kept only when present. A blank
    question or an answer that normalises to nothing is refused, naming file and line.
    """
    items = []
    for lineno, obj in json_objects(path):
        item = {k: string_field(path, lineno, obj, k) for k in REQUIRED}
        item.update({k: string_field(path, lineno, obj, k) for k in OPTIONAL if k in obj})
        if not item["question"].strip():
            raise UserInputError(f"{path}:{lineno}: empty question; every line needs a question")
        problem = answer_problem(item["answer"])
        if problem:
            raise UserInputError(f"{path}:{lineno}: {problem}")
        items.append(item)
    if not items:
        raise UserInputError(f"empty QA file: {path}")
    return items
