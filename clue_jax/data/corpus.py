"""User corpora: text / JSONL files, QA files, tfds datasets, and per-host sharding.

Every problem with a user's file is a `UserInputError` with one line naming the
file, the line number and (where relevant) the field, so the CLI can print it.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterator, Sequence, TypeVar

import tensorflow_datasets as tfds

from clue_jax.errors import UserInputError

T = TypeVar("T")


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


def read_text_corpus(path: str | os.PathLike, field: str = "text") -> list[str]:
    """Documents of a `.txt` or `.jsonl` corpus (see `corpus_documents`)."""
    return [doc for _, doc in corpus_documents(path, field)]


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


def _decode(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if hasattr(value, "item"):  # numpy scalar / 0-d array
        return _decode(value.item())
    return str(value)


def read_data_source(source: Sequence[Any]) -> list[Any]:
    """All rows of a tfds data source, in one batched read where the source supports it."""
    if not len(source):
        return []
    try:
        return list(source.__getitems__(range(len(source))))
    except TypeError:  # tfds.testing.mock_data's source has no working batched read
        return [source[i] for i in range(len(source))]


def load_tfds_text(name: str, split: str, field: str, data_dir: str | os.PathLike | None = None,
                   *, download: bool = True) -> list[str]:
    """The text `field` of a tfds dataset split, read through a data source (no TensorFlow).

    `name` may carry a config and version ("clue_bios/tiny"). With `download`, a dataset
    not yet prepared in `data_dir` is prepared as array_record first.
    """
    data_dir = None if data_dir is None else os.fspath(data_dir)
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # DatasetNotFoundError, bad config name, ...
        raise UserInputError(f"tfds dataset {name!r}: {str(e).splitlines()[0]}") from e
    features = builder.info.features
    if field not in features:
        raise UserInputError(
            f"tfds dataset {name!r} has no field {field!r}; available fields: {sorted(features)}")
    if download and not builder.is_prepared():
        builder.download_and_prepare(file_format="array_record")
    try:
        source = builder.as_data_source(split)
    except Exception as e:  # unknown split, not prepared, wrong file format
        raise UserInputError(
            f"tfds dataset {name!r} split {split!r}: {str(e).splitlines()[0]}") from e
    return [_decode(row[field]) for row in read_data_source(source)]


def host_shard(items: Sequence[T], process_index: int, process_count: int) -> list[T]:
    """This process's contiguous share of `items`; every share has len(items) // process_count
    elements, and the last len(items) % process_count items are dropped.

    Why equal lengths: every host must run the same number of steps, or the hosts
    that run out first leave the others hanging in a collective.
    """
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(
            f"need 0 <= process_index ({process_index}) < process_count ({process_count})")
    share = len(items) // process_count
    if share == 0:
        raise UserInputError(
            f"{len(items)} examples cannot be split over {process_count} processes")
    return list(items[process_index * share:(process_index + 1) * share])


def tfds_split_for_process(split: str, process_index: int | None = None,
                           process_count: int | None = None) -> Any:
    """`tfds.split_for_jax_process` with the remainder dropped (same rule as `host_shard`).

    Defaults to `jax.process_index()` / `jax.process_count()`; the result is a split
    string / ReadInstruction for `builder.as_data_source(...)` or `tfds.data_source(...)`.
    """
    return tfds.split_for_jax_process(split, process_index=process_index,
                                      process_count=process_count, drop_remainder=True)
