"""GLUE and SQuAD 2.0 through tensorflow-datasets (no TensorFlow), and fixed-shape encoders.

Every downstream task, real or built in (`clue_jax.mcl.downstream`), is a list
of one of two example types, so one fine-tuning and evaluation path serves all:

- `PairExample`: sentence or sentence-pair classification (GLUE); `label` is a
  class index, or a float score for the regression task STS-B.
- `SpanExample`: extractive QA; no answers = unanswerable (SQuAD 2.0).

Loading reads a prepared tfds dataset through `builder.as_data_source` (random
access over array_record files; `as_dataset` would need TensorFlow). A dataset
that is not prepared in `data_dir` raises `DataNotPrepared` (a
UserInputError), unless `download=True` prepares it first; pipelines use the
real tasks only when the data is present. Test labels of GLUE are -1 (hidden),
as tfds stores them.

Encoding (what a tokenizer without a post-processor needs, e.g. the trained
byte-level BPE): [BOS] a [EOS] (b [EOS]), token_type 0 for the first segment
and 1 for the second, right padding to `max_len`. Over-long inputs are cut
token by token from the longer segment (pairs) or from the end of the context
(QA; an answer cut off becomes "no answer" for training, and counts as
truncated), or for QA split into overlapping doc-stride windows
(`doc_stride`); `on_overflow="error"` raises instead.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Sequence

import numpy as np

from clue_jax.errors import UserInputError

log = logging.getLogger("clue_jax")

__all__ = ["PairExample", "SpanExample", "GlueTask", "GLUE_TASKS", "DataNotPrepared", "load_glue", "load_squad_v2",
           "encode_pair_examples", "encode_span_examples"]


@dataclasses.dataclass(frozen=True)
class PairExample:
    id: str
    text_a: str
    text_b: str | None  # None for single-sentence tasks
    label: float  # class index (as an int-valued number) or a regression score


@dataclasses.dataclass(frozen=True)
class SpanExample:
    id: str
    question: str
    context: str
    answers: tuple[str, ...] = ()  # empty: unanswerable
    answer_starts: tuple[int, ...] = ()  # character offsets of the answers in `context`

    @property
    def is_impossible(self) -> bool:
        return not self.answers


@dataclasses.dataclass(frozen=True)
class GlueTask:
    fields: tuple[str, str | None]
    num_labels: int  # 1 = regression
    dev_split: str = "validation"
    metric: str = "accuracy"  # reported; F1 / correlations are computed from the same predictions


GLUE_TASKS: dict[str, GlueTask] = {
    "cola": GlueTask(("sentence", None), 2, metric="matthews"),
    "sst2": GlueTask(("sentence", None), 2),
    "mrpc": GlueTask(("sentence1", "sentence2"), 2, metric="f1"),
    "qqp": GlueTask(("question1", "question2"), 2, metric="f1"),
    "stsb": GlueTask(("sentence1", "sentence2"), 1, metric="pearson"),
    "mnli": GlueTask(("premise", "hypothesis"), 3, dev_split="validation_matched"),
    "qnli": GlueTask(("question", "sentence"), 2),
    "rte": GlueTask(("sentence1", "sentence2"), 2),
    "wnli": GlueTask(("sentence1", "sentence2"), 2),
}


class DataNotPrepared(UserInputError):
    """The tfds dataset is not prepared in data_dir (and download was not asked for)."""


# ----------------------------------------------------------------------------- tfds access


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        return _text(value.item())
    return str(value)


def _rows(name: str, split: str, data_dir, download: bool, limit: int | None) -> list[dict]:
    """Rows of a tfds split through a data source, read one by one (works under tfds.testing.mock_data)."""
    import tensorflow_datasets as tfds

    if name.startswith("glue/"):
        import tensorflow_datasets.text.glue  # noqa: F401  (registers "glue": not auto-imported without TF)
    data_dir = None if data_dir is None else os.fspath(data_dir)
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # DatasetNotFoundError, bad config name
        raise UserInputError(f"tfds dataset {name!r}: {str(e).splitlines()[0]}") from e
    if download and not builder.is_prepared():
        builder.download_and_prepare(file_format="array_record")
    try:
        source = builder.as_data_source(split)
    except Exception as e:  # not prepared, unknown split, wrong file format
        raise DataNotPrepared(
            f"tfds dataset {name!r} split {split!r} is not available in {data_dir or 'the default data_dir'} "
            f"({str(e).splitlines()[0][:160]}); prepare it with `tfds build {name.split('/')[0]} "
            f"--file_format=array_record` or pass download=True") from e
    n = len(source) if limit is None else min(int(limit), len(source))
    return [source[i] for i in range(n)]


def load_glue(task: str, split: str, data_dir: str | os.PathLike | None = None, *, download: bool = False,
              limit: int | None = None) -> list[PairExample]:
    """A GLUE task's split as PairExamples (`split="dev"` means the task's validation split)."""
    if task not in GLUE_TASKS:
        raise UserInputError(f"GLUE task {task!r} is not one of {sorted(GLUE_TASKS)}")
    spec = GLUE_TASKS[task]
    if split == "dev":
        split = spec.dev_split
    rows = _rows(f"glue/{task}", split, data_dir, download, limit)
    a_key, b_key = spec.fields
    out = []
    for i, row in enumerate(rows):
        label = np.asarray(row["label"]).item()
        out.append(PairExample(
            id=f"{task}-{split}-{int(np.asarray(row.get('idx', i)).item())}",
            text_a=_text(row[a_key]), text_b=None if b_key is None else _text(row[b_key]),
            label=float(label) if spec.num_labels == 1 else int(label)))
    return out


def load_squad_v2(split: str, data_dir: str | os.PathLike | None = None, *, download: bool = False,
                  limit: int | None = None) -> list[SpanExample]:
    """SQuAD 2.0 (tfds "squad/v2.0") as SpanExamples; unanswerable questions get no answers.

    The `plausible_answers` of unanswerable questions are dropped (they are
    not correct answers). Answers whose text and start lists differ in length
    (only mock data) are paired up to the shorter one.
    """
    rows = _rows("squad/v2.0", split, data_dir, download, limit)
    out = []
    for i, row in enumerate(rows):
        impossible = bool(np.asarray(row.get("is_impossible", False)).item())
        answers = row.get("answers", {}) or {}
        texts = [_text(t) for t in np.atleast_1d(answers.get("text", []))]
        starts = [int(s) for s in np.atleast_1d(answers.get("answer_start", []))]
        n = 0 if impossible else min(len(texts), len(starts))
        out.append(SpanExample(id=_text(row.get("id", f"squad-{split}-{i}")), question=_text(row["question"]),
                               context=_text(row["context"]), answers=tuple(texts[:n]),
                               answer_starts=tuple(starts[:n])))
    return out


# ----------------------------------------------------------------------------- encoding


def _special_ids(tokenizer) -> tuple[int, int, int]:
    cls_id, sep_id, pad_id = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    if cls_id is None or sep_id is None or pad_id is None:
        raise UserInputError("tokenizer needs bos, eos and pad tokens to encode downstream examples")
    return cls_id, sep_id, pad_id


def _check_overflow(on_overflow: str) -> None:
    if on_overflow not in ("truncate", "error"):
        raise UserInputError(f"on_overflow={on_overflow!r} is not 'truncate' or 'error'")


def encode_pair_examples(tokenizer, examples: Sequence[PairExample], max_len: int, *,
                         on_overflow: str = "truncate", regression: bool = False) -> dict[str, np.ndarray]:
    """Fixed-shape arrays [N, max_len]: input_ids, attention_mask, token_type_ids; labels [N]
    (int32 class indices, float32 scores when `regression`)."""
    _check_overflow(on_overflow)
    cls_id, sep_id, pad_id = _special_ids(tokenizer)
    n = len(examples)
    ids = np.full((n, max_len), pad_id, np.int32)
    mask = np.zeros((n, max_len), np.int32)
    types = np.zeros((n, max_len), np.int32)
    labels = np.zeros((n,), np.float32 if regression else np.int32)
    texts_a = [e.text_a for e in examples]
    texts_b = [e.text_b or "" for e in examples]
    enc_a = tokenizer(texts_a, add_special_tokens=False)["input_ids"] if n else []
    enc_b = tokenizer(texts_b, add_special_tokens=False)["input_ids"] if n else []
    for i, (ex, a, b) in enumerate(zip(examples, enc_a, enc_b)):
        a, b = list(a), list(b) if ex.text_b is not None else []
        specials = 3 if ex.text_b is not None else 2
        if len(a) + len(b) + specials > max_len:
            if on_overflow == "error":
                raise UserInputError(f"example {ex.id!r} has {len(a) + len(b) + specials} tokens (max_len {max_len})")
            while len(a) + len(b) + specials > max_len:  # longest first, as BERT's pair truncation
                (a if len(a) >= len(b) else b).pop()
        first = [cls_id] + a + [sep_id]
        second = b + [sep_id] if ex.text_b is not None else []
        seq = first + second
        ids[i, :len(seq)] = seq
        mask[i, :len(seq)] = 1
        types[i, len(first):len(seq)] = 1
        labels[i] = ex.label
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "labels": labels}


def _windows(length: int, room: int, doc_stride: int) -> list[int]:
    """Start token of each context window: 0, stride, 2*stride, ... until a window reaches the end."""
    starts = [0]
    while starts[-1] + room < length:
        starts.append(starts[-1] + doc_stride)
    return starts


def encode_span_examples(tokenizer, examples: Sequence[SpanExample], max_len: int, *,
                         on_overflow: str = "truncate", doc_stride: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Arrays for span QA, one row per context window, and the character offsets to read answers back.

    doc_stride 0: one window per example, the context cut at max_len (an
    answer cut off becomes "no answer"; on_overflow="error" raises instead).
    doc_stride > 0 (BERT's doc-stride): a context longer than the room left
    by the question is split into windows starting every `doc_stride` context
    tokens (overlapping when doc_stride < room), the last one reaching the
    end; each window's target is the answer when it lies wholly inside it,
    else [CLS] (no answer), as in BERT's SQuAD fine-tuning. Predictions are
    merged per example over its windows (`example_index`).

    Returns (arrays, offsets): arrays has input_ids, attention_mask,
    token_type_ids, context_mask (1 where an answer may start or end),
    start_positions, end_positions ([W]; 0 = [CLS] = no answer), truncated
    ([W] 1 where the example has an answer that is not inside this window)
    and example_index ([W], the example each window belongs to); offsets
    [W, max_len, 2] int32 are the character span in the context of each
    context token, -1 elsewhere. The first answer found at its offset in the
    context is the training target.
    """
    _check_overflow(on_overflow)
    if doc_stride < 0:
        raise UserInputError(f"doc_stride={doc_stride} must be >= 0")
    cls_id, sep_id, pad_id = _special_ids(tokenizer)
    q_enc = tokenizer([e.question for e in examples], add_special_tokens=False)["input_ids"] if examples else []
    c_enc = (tokenizer([e.context for e in examples], add_special_tokens=False, return_offsets_mapping=True)
             if examples else {"input_ids": [], "offset_mapping": []})
    rows = []  # (example index, question ids, context ids, context offsets, window start, kept, answer tokens)
    for i, ex in enumerate(examples):
        q = list(q_enc[i])
        full_ids, full_off = list(c_enc["input_ids"][i]), [tuple(o) for o in c_enc["offset_mapping"][i]]
        room = max_len - len(q) - 3
        if room < 1:
            raise UserInputError(f"example {ex.id!r}: question alone has {len(q)} tokens (max_len {max_len})")
        if len(full_ids) > room and on_overflow == "error":
            raise UserInputError(f"example {ex.id!r} has {len(q) + len(full_ids) + 3} tokens (max_len {max_len})")
        if doc_stride > room:
            raise UserInputError(f"doc_stride={doc_stride} exceeds the {room} context tokens a window of example "
                                 f"{ex.id!r} holds: part of the context would be skipped")
        answer = None
        for text, start in zip(ex.answers, ex.answer_starts):
            end = start + len(text)
            if not text or start < 0 or ex.context[start:end] != text:
                continue  # not at its offset in this context (only seen in mock data)
            first = next((j for j, (a, b) in enumerate(full_off) if b > start), None)
            last = next((j for j in range(len(full_off) - 1, -1, -1) if full_off[j][0] < end), None)
            if first is not None and last is not None and last >= first:
                answer = (first, last)
                break
        starts = _windows(len(full_ids), room, doc_stride) if doc_stride else [0]
        for w in starts:
            rows.append((i, q, full_ids, full_off, w, min(len(full_ids) - w, room), answer))
    n = len(rows)
    ids = np.full((n, max_len), pad_id, np.int32)
    mask = np.zeros((n, max_len), np.int32)
    types = np.zeros((n, max_len), np.int32)
    ctx_mask = np.zeros((n, max_len), np.int32)
    starts_a = np.zeros((n,), np.int32)
    ends_a = np.zeros((n,), np.int32)
    truncated = np.zeros((n,), np.int32)
    example_index = np.zeros((n,), np.int32)
    offsets = np.full((n, max_len, 2), -1, np.int32)
    for r, (i, q, full_ids, full_off, w, kept, answer) in enumerate(rows):
        base = len(q) + 2  # [CLS] q [SEP]
        seq = [cls_id] + q + [sep_id] + full_ids[w:w + kept] + [sep_id]
        ids[r, :len(seq)] = seq
        mask[r, :len(seq)] = 1
        types[r, base:len(seq)] = 1
        ctx_mask[r, base:base + kept] = 1
        example_index[r] = i
        if kept:
            offsets[r, base:base + kept] = np.asarray(full_off[w:w + kept], np.int32)
        if answer is not None:
            first, last = answer
            if first >= w and last < w + kept:
                starts_a[r], ends_a[r] = base + first - w, base + last - w
            else:
                truncated[r] = 1  # the answer lies (partly) outside this window: "no answer" for training
    arrays = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "context_mask": ctx_mask,
              "start_positions": starts_a, "end_positions": ends_a, "truncated": truncated,
              "example_index": example_index}
    return arrays, offsets
