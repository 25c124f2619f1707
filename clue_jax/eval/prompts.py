"""k-shot QA prompts: "question answer" blocks, then the open question.

Layout (questions end with "\\nAnswer:", answers follow after one space):

    What is the birth date of Ann Lee?
    Answer: 2 May 1971

    What is the birth city of Bo Chan?
    Answer:

Blocks are separated by a blank line (`SHOT_SEPARATOR = "\\n\\n"`): the
answer then ends at a newline, which is exactly where `decode_to_text` cuts
the generated answer, and a blank line reads as "next item" to pretrained LMs.
A shot answer containing a newline would break that cut, so it is refused.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from clue_jax.errors import UserInputError

SHOT_SEPARATOR = "\n\n"
ANSWER_PREFIX = " "

Shot = tuple[str, str]


def qa_prompt(question: str, shots: Sequence[Shot] = ()) -> str:
    """The k-shot prompt for `question`; zero-shot when `shots` is empty."""
    blocks = []
    for i, (q, a) in enumerate(shots):
        if "\n" in a:
            raise UserInputError(f"shot {i} answer {a!r} contains a newline: decoded answers are cut at the first newline")
        blocks.append(f"{q}{ANSWER_PREFIX}{a.strip()}")
    blocks.append(question)
    return SHOT_SEPARATOR.join(blocks)


def choose_shots(
    pool: Sequence[Shot],
    k: int,
    rng: np.random.Generator,
    exclude_question: str | None = None,
) -> list[Shot]:
    """k distinct (question, answer) shots drawn without replacement from `pool`.

    Shots whose question equals `exclude_question` are left out, so a shot
    never gives away the answer to the question being asked.
    """
    candidates = [s for s in pool if s[0] != exclude_question]
    if k > len(candidates):
        raise UserInputError(f"asked for {k} shots but the shot pool has only {len(candidates)} usable items")
    if k <= 0:
        return []
    picks = rng.choice(len(candidates), size=k, replace=False)
    return [candidates[int(i)] for i in picks]
