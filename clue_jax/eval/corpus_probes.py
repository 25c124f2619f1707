"""Probes that memorising a user corpus can move: a cloze cut from each answer's own sentence, and the
answer's NLL in its document.

QA exact match on a user corpus asks questions in a format a base model may never have seen; it can stay at
0 however well the documents were learned. For each QA pair whose answer occurs in a document (case-sensitive),
the sentence that holds it, up to the answer, is a prompt in the documents' own words, and the NLL of the
answer's tokens read in that document (eval/value_nll.py) moves smoothly as it is learned.
"""
from __future__ import annotations

import dataclasses
import re

import numpy as np

from clue_jax.eval import value_nll

_SENTENCE_END = re.compile(r"[.!?](?=\s)|\n")


@dataclasses.dataclass(frozen=True)
class AnswerSite:
    """Where a QA pair's answer is written: document index, character span, and the cloze prompt before it
    ("" when the answer opens its sentence: no prompt is cut then, the NLL is still read)."""

    doc: int
    span: tuple[int, int]
    cloze: str


def _words(text: str) -> set[str]:
    return set(re.findall(r"\w+", text.lower()))


def answer_document(docs: list[str], question: str, answer: str) -> int | None:
    """The document holding `answer` (case-sensitive) that shares most word tokens with `question` (the first
    such on ties), or None when no document holds it."""
    holding = [i for i, doc in enumerate(docs) if answer and answer in doc]
    if not holding:
        return None
    asked = _words(question)
    return max(holding, key=lambda i: (len(asked & _words(docs[i])), -i))


def cloze_prompt(doc: str, start: int) -> str:
    """The text of the sentence holding position `start`, from its beginning up to `start` (stripped)."""
    ends = [m.end() for m in _SENTENCE_END.finditer(doc, 0, start)]
    return doc[ends[-1] if ends else 0:start].strip()


def answer_site(docs: list[str], question: str, answer: str) -> AnswerSite | None:
    """The answer's first occurrence in its document, with its cloze prompt; None when no document holds it."""
    doc = answer_document(docs, question, answer)
    if doc is None:
        return None
    start = docs[doc].index(answer)
    return AnswerSite(doc, (start, start + len(answer)), cloze_prompt(docs[doc], start))


def answer_nll(model, tokenizer, docs: list[str], sites: list[AnswerSite], attributes: list[str], seq_len: int,
               batch_size: int = 64) -> dict:
    """value_nll.per_attribute over the answers: one row per site (its document), the answer as the value."""
    rows = [docs[s.doc] for s in sites]
    spans = [{attr: s.span} for s, attr in zip(sites, attributes)]
    return value_nll.per_attribute(model, tokenizer, rows, spans, seq_len, batch_size=batch_size)


def floor_line(qa_table: dict) -> str | None:
    """The line a table of a user corpus carries when QA cannot measure anything: the base model never matches."""
    ems = [row["exact_match"] for row in qa_table.values()]
    if ems and np.max(ems) == 0:
        return "QA is at floor for the base model: its answers never match; read cloze and NLL"
    return None
