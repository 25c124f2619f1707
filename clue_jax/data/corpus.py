"""User corpora: text / JSONL files and QA files.

Every problem with a user's file is a `UserInputError` with one line naming the
file, the line number and (where relevant) the field, so the CLI can print it.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterator

from clue_jax.errors import UserInputError


def _lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """(1-based line number, line) of a UTF-8 file; unreadable files name the path."""
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                yield lineno, line
    except UnicodeDecodeError as e:
        raise UserInputError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    except OSError as e:
        raise UserInputError(f"cannot read {path}: {e.strerror or e}") from e


def _json_objects(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """Non-blank lines of a JSONL file, each parsed to a JSON object."""
    for lineno, line in _lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserInputError(
                f"{path}:{lineno}: malformed JSON ({e.msg}, column {e.colno})") from e
        if not isinstance(obj, dict):
            raise UserInputError(
                f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        yield lineno, obj


def _string_field(path, lineno: int, obj: dict[str, Any], field: str) -> str:
    if field not in obj:
        raise UserInputError(f"{path}:{lineno}: missing field {field!r} (has {sorted(obj)})")
    value = obj[field]
    if not isinstance(value, str):
        raise UserInputError(
            f"{path}:{lineno}: field {field!r} must be a string, got {type(value).__name__}")
    return value


def read_jsonl(path: str | os.PathLike, field: str = "text") -> list[str]:
    """The string `field` of each JSON object line (blank lines are skipped)."""
    return [doc for _, doc in _jsonl_documents(path, field)]


def _jsonl_documents(path, field: str) -> list[tuple[int, str]]:
    docs = [(n, _string_field(path, n, obj, field)) for n, obj in _json_objects(path)]
    if not docs:
        raise UserInputError(f"empty corpus: {path}")
    return docs


def corpus_documents(path: str | os.PathLike, field: str = "text") -> list[tuple[int, str]]:
    """(1-based first line, document) of a `.txt` or `.jsonl` corpus, so a later check can name the line.

    `.txt`: one document per paragraph, paragraphs separated by one or more blank
    lines (whitespace-only lines count as blank); a paragraph keeps its inner line
    breaks and loses surrounding whitespace. Paragraphs rather than lines because a
    biography or article is usually several lines long. `.jsonl`: the string `field`
    of each JSON object line.
    """
    suffix = os.path.splitext(os.fspath(path))[1].lower()
    if suffix == ".jsonl":
        return _jsonl_documents(path, field)
    if suffix != ".txt":
        raise UserInputError(f"unsupported corpus format {suffix or '(none)'!r}: {path} "
                             "(expected .txt or .jsonl)")
    docs, paragraph, start = [], [], 0
    for lineno, line in _lines(path):
        if line.strip():
            start = start or lineno
            paragraph.append(line.rstrip("\r\n"))
        elif paragraph:
            docs.append((start, "\n".join(paragraph).strip()))
            paragraph, start = [], 0
    if paragraph:
        docs.append((start, "\n".join(paragraph).strip()))
    if not docs:
        raise UserInputError(f"empty corpus: {path}")
    return docs


QA_REQUIRED = ("question", "answer")
QA_OPTIONAL = ("attribute", "name")


def read_qa_jsonl(path: str | os.PathLike) -> list[dict[str, str]]:
    """QA pairs from JSONL: each line {"question", "answer"[, "attribute", "name"]} (strings).

    Other keys are ignored; optional keys are kept only when present.
    """
    items = []
    for lineno, obj in _json_objects(path):
        item = {k: _string_field(path, lineno, obj, k) for k in QA_REQUIRED}
        item.update({k: _string_field(path, lineno, obj, k) for k in QA_OPTIONAL if k in obj})
        items.append(item)
    if not items:
        raise UserInputError(f"empty QA file: {path}")
    return items

