"""User corpora: text / JSONL files, and the JSON-lines reading QA files share.

Every problem with a user's file is a `UserInputError` with one line naming the
file, the line number and (where relevant) the field, so the CLI can print it.

What a document may be, for `.txt` and `.jsonl` alike: a byte-order mark at the
start of the file is the encoding's mark, not text, and is dropped (editors on
Windows write one; `utf-8-sig` is how Python reads such files); a document with
no text besides whitespace, or with a U+FEFF inside it (files joined together),
is refused, since it would train on nothing or on an invisible character.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterator

from clue_jax.errors import UserInputError


def _lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """(1-based line number, line) of a UTF-8 file; unreadable files name the path."""
    try:
        with open(path, encoding="utf-8-sig") as f:  # a leading byte-order mark is dropped
            for lineno, line in enumerate(f, start=1):
                yield lineno, line
    except UnicodeDecodeError as e:
        raise UserInputError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    except OSError as e:
        raise UserInputError(f"cannot read {path}: {e.strerror or e}") from e


def json_objects(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
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


def string_field(path, lineno: int, obj: dict[str, Any], field: str) -> str:
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
    docs = [(n, document(path, n, string_field(path, n, obj, field))) for n, obj in json_objects(path)]
    if not docs:
        raise UserInputError(f"empty corpus: {path}")
    return docs


def document(path, lineno: int, text: str) -> str:
    """`text` when it may be a document (see the module doc), else one line naming file and line."""
    if not text.strip():
        raise UserInputError(f"{path}:{lineno}: empty document (no text besides whitespace); a document must "
                             "have text: remove the line or fill it")
    if "\ufeff" in text:
        raise UserInputError(f"{path}:{lineno}: a byte-order mark (U+FEFF) inside the document, e.g. from files "
                             "joined together; a document must not contain one: remove it")
    return text


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
            docs.append((start, document(path, start, "\n".join(paragraph).strip())))
            paragraph, start = [], 0
    if paragraph:
        docs.append((start, document(path, start, "\n".join(paragraph).strip())))
    if not docs:
        raise UserInputError(f"empty corpus: {path}")
    return docs
