"""Which tokens of a document the questions rely on: the targets the teacher gate looks for.

A question is tied to the documents that hold what it asks about: its
`name` (when the QA line has one) or else its answer (case-insensitive).
A document's target words are that name's words, or else its questions'
words, stop words aside; its targets are the tokens that overlap one of
those words. Its far query is the token just before its first question's
answer: the position that predicts the answer.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import numpy as np

STOP_WORDS = frozenset(
    "a an the of in on at to for from by with and or but is are was were be been being do does did what which who "
    "whom whose when where why how that this these those it its he she they them his her their there here as "
    "into about than then so not no yes has have had will would can could should may might i you we me my your our "
    "us".split())
_WORD = re.compile(r"\w+")


def words(text: str) -> set[str]:
    """The lower-cased words of `text`, stop words aside."""
    return {w.lower() for w in _WORD.findall(text)} - STOP_WORDS


@dataclasses.dataclass
class Targets:
    """Per document: the target words, the character span of the answer (or None)."""

    words: list[set[str]]
    answer_spans: list[tuple[int, int] | None]
    questions: int
    unmatched: int  # questions tied to no document
    kind: str  # "names" or "question words"


def link_questions(docs: Sequence[str], qa: Sequence[dict]) -> Targets:
    """Ties each QA item to the documents holding its name (or answer); see the module docstring."""
    kind = "names" if qa and all("name" in item for item in qa) else "question words"
    target_words: list[set[str]] = [set() for _ in docs]
    spans: list[tuple[int, int] | None] = [None] * len(docs)
    lowered = [doc.lower() for doc in docs]
    unmatched = 0
    for item in qa:
        key = item["name"] if kind == "names" else item["answer"]
        hits = [i for i, doc in enumerate(lowered) if key.strip().lower() in doc]
        unmatched += not hits
        for i in hits:
            target_words[i] |= words(key if kind == "names" else item["question"])
            start = lowered[i].find(item["answer"].strip().lower())
            if spans[i] is None and start >= 0:
                spans[i] = (start, start + len(item["answer"].strip()))
    return Targets(target_words, spans, len(qa), unmatched, kind)


def token_masks(tokenizer, docs: Sequence[str], targets: Targets, length: int) -> tuple[np.ndarray, np.ndarray]:
    """(target mask int32 [N, length], far query index [N], -1 where none) for rows of BOS + text."""
    mask = np.zeros((len(docs), length), np.int32)
    query = np.full(len(docs), -1, np.int32)
    for i, doc in enumerate(docs):
        offsets = tokenizer(doc, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        spans = [m.span() for m in _WORD.finditer(doc) if m.group().lower() in targets.words[i]]
        for j, (a, b) in enumerate(offsets[: length - 1]):
            if any(a < we and b > ws for ws, we in spans):
                mask[i, j + 1] = 1  # +1: BOS at position 0
        if targets.answer_spans[i] is not None:
            start = targets.answer_spans[i][0]
            first = next((j for j, (a, b) in enumerate(offsets) if b > start), None)
            if first is not None and 0 < first < length:
                query[i] = first  # the row of the token just before the answer (the BOS shift cancels)
    return mask, query
