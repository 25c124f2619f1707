"""Downstream evaluation of pre-trained ELECTRA/MCL discriminators: encoded tasks, fine-tuning, metrics.

The built-in tasks (`clue_jax.mcl.bios_tasks`) and GLUE and SQuAD 2.0
(`clue_jax.data.glue_squad`) share the example types, encoders, fine-tuning
and metrics.

Fine-tuning: the discriminator's encoder (ELECTRA fine-tunes D) under a fresh
`SpanQAHead` or `ClassificationHead`, trained by the shared `Trainer` with the
span or classification objective (dropout from the encoder config). QA
prediction is SQuAD 2.0's: the best span (start <= end, inside the context,
at most `max_answer_tokens`) against the [CLS] null score; the null
threshold is chosen on dev (the best dev F1, as the official v2.0 script's
best_f1_thresh) and applied unchanged to test.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from clue_jax import workdir_fs
from clue_jax.data.batching import ArrayBatchSource
from clue_jax.data.glue_squad import SpanExample, encode_pair_examples, encode_span_examples
from clue_jax.errors import UserInputError
from clue_jax.eval import metrics as qa_metrics
from clue_jax.models.encoder import ClassificationHead, Encoder, EncoderConfig, SpanQAHead
from clue_jax.models.encoder_losses import classification_loss, span_qa_loss
from clue_jax.train.loop import Trainer

log = logging.getLogger("clue_jax")

__all__ = ["Task", "make_task", "SpanQAModel", "SequenceClassifier", "finetune_model", "span_qa_objective",
           "classification_objective", "predict_spans", "evaluate_span_task", "evaluate_pair_task", "merge_windows", "finetune",
           "evaluate", "task_score"]

_NO_ANSWER = ""


# ----------------------------------------------------------------------------- encoded tasks
@dataclasses.dataclass
class Task:
    """A downstream task, encoded: kind "span" (QA) or "pair" (classification; num_labels 1 = regression).

    Span tasks hold one array row per context window (`example_index` maps
    windows to examples); `metric` names a pair task's GLUE metric
    (`clue_jax.eval.metrics.GLUE_METRICS`).
    """

    name: str
    kind: str
    num_labels: int
    examples: dict[str, list]
    arrays: dict[str, dict[str, np.ndarray]]
    offsets: dict[str, np.ndarray]  # span tasks: [W, T, 2] character offsets per split
    metric: str = "accuracy"


def make_task(name: str, examples: dict[str, list], tokenizer, max_len: int, *, num_labels: int = 2,
              on_overflow: str = "truncate", doc_stride: int = 0, metric: str | None = None) -> Task:
    """Encodes every split; the kind follows the example type (SpanExample -> span, PairExample -> pair).

    doc_stride: span tasks' window step (0 = one window, the context cut);
    metric: a pair task's GLUE metric (default accuracy, Pearson for regression).
    """
    first = next((ex for exs in examples.values() for ex in exs), None)
    if first is None:
        raise UserInputError(f"task {name!r} has no examples")
    kind = "span" if isinstance(first, SpanExample) else "pair"
    arrays, offsets = {}, {}
    for split, exs in examples.items():
        if kind == "span":
            arrays[split], offsets[split] = encode_span_examples(tokenizer, exs, max_len, on_overflow=on_overflow,
                                                                 doc_stride=doc_stride)
        else:
            arrays[split] = encode_pair_examples(tokenizer, exs, max_len, on_overflow=on_overflow,
                                                 regression=num_labels == 1)
    metric = metric or ("pearson" if num_labels == 1 else "accuracy")
    if metric not in qa_metrics.GLUE_METRICS:
        raise UserInputError(f"task {name!r}: metric {metric!r} is not one of {sorted(qa_metrics.GLUE_METRICS)}")
    return Task(name, kind, 1 if kind == "span" else num_labels, dict(examples), arrays, offsets, metric)


# ----------------------------------------------------------------------------- models and objectives


class SpanQAModel(nnx.Module):
    """Encoder + span head -> (start, end) logits [B, T] each."""

    def __init__(self, cfg: EncoderConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.encoder = Encoder(cfg, rngs)
        self.head = SpanQAHead(cfg, rngs)

    def __call__(self, input_ids, attention_mask, token_type_ids=None, *, dropout_key=None):
        return self.head(self.encoder(input_ids, attention_mask, token_type_ids, dropout_key=dropout_key))


class SequenceClassifier(nnx.Module):
    """Encoder + ELECTRA's classification head on [CLS] -> logits [B, num_labels]."""

    def __init__(self, cfg: EncoderConfig, num_labels: int, rngs: nnx.Rngs):
        self.cfg = cfg
        self.encoder = Encoder(cfg, rngs)
        self.head = ClassificationHead(cfg, num_labels, rngs)

    def __call__(self, input_ids, attention_mask, token_type_ids=None, *, dropout_key=None):
        k1, k2 = (None, None) if dropout_key is None else tuple(jax.random.split(dropout_key))
        return self.head(self.encoder(input_ids, attention_mask, token_type_ids, dropout_key=k1), dropout_key=k2)


def finetune_model(task: Task, encoder: Encoder, seed: int) -> nnx.Module:
    """A copy of `encoder` under a fresh head for `task` (head initialised from `seed`)."""
    cfg = encoder.cfg
    rngs = nnx.Rngs(seed)
    if task.kind == "span":
        model = nnx.eval_shape(lambda: SpanQAModel(cfg, nnx.Rngs(0)))
        model.head = SpanQAHead(cfg, rngs)
    else:
        model = nnx.eval_shape(lambda: SequenceClassifier(cfg, task.num_labels, nnx.Rngs(0)))
        model.head = ClassificationHead(cfg, task.num_labels, rngs)
    # Fresh buffers: the Trainer donates the model's arrays, and `encoder` must survive for the next task.
    graphdef, state = nnx.split(encoder)
    model.encoder = nnx.merge(graphdef, copy_state(state))
    return model


@jax.jit
def copy_state(state):
    """Fresh device buffers for every array of `state` (safe from another computation's donation)."""
    return jax.tree.map(jnp.copy, state)


def _per_example(x):
    """[B] from a per-example array stored as [B] or [B, 1] (the Trainer shards batch leaves of rank >= 2)."""
    return x.reshape(x.shape[0])


def span_qa_objective(model, batch, rng):
    """Mean span cross-entropy; "correct" = share of examples with both ends right (logged as accuracy)."""
    start, end = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], dropout_key=rng)
    s_pos, e_pos = _per_example(batch["start_positions"]), _per_example(batch["end_positions"])
    loss = span_qa_loss(start, end, s_pos, e_pos, batch["attention_mask"])
    hit = (jnp.argmax(start, -1) == s_pos) & (jnp.argmax(end, -1) == e_pos)
    return loss, {"weight": jnp.float32(1.0), "correct": jnp.mean(hit.astype(jnp.float32))}


def classification_objective(model, batch, rng):
    """Mean cross-entropy (squared error for one output); "correct" = accuracy (0 for regression)."""
    logits = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], dropout_key=rng)
    labels = _per_example(batch["labels"])
    loss = classification_loss(logits, labels)
    if logits.shape[-1] == 1:
        correct = jnp.float32(0.0)
    else:
        correct = jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))
    return loss, {"weight": jnp.float32(1.0), "correct": correct}


# ----------------------------------------------------------------------------- prediction


@nnx.jit(static_argnames=("max_answer_tokens",))
def _span_scores(model, ids, mask, types, ctx_mask, max_answer_tokens: int):
    start, end = model(ids, mask, types)
    t = ids.shape[1]
    i = jnp.arange(t)
    ok = (i[:, None] <= i[None, :]) & (i[None, :] - i[:, None] < max_answer_tokens)
    in_ctx = ctx_mask > 0
    ok = ok[None] & in_ctx[:, :, None] & in_ctx[:, None, :]
    score = jnp.where(ok, start[:, :, None] + end[:, None, :], -jnp.inf)
    flat = jnp.argmax(score.reshape(score.shape[0], -1), axis=-1)
    best = jnp.max(score.reshape(score.shape[0], -1), axis=-1)
    return flat // t, flat % t, best, start[:, 0] + end[:, 0]


@nnx.jit
def _class_logits(model, ids, mask, types):
    return model(ids, mask, types)


def _batches(arrays: dict[str, np.ndarray], keys: Sequence[str], batch_size: int):
    n = len(arrays[keys[0]])
    for lo in range(0, n, batch_size):
        chunk = {k: arrays[k][lo:lo + batch_size] for k in keys}
        short = batch_size - len(chunk[keys[0]])
        if short:  # pad to a fixed shape: one compile for every batch
            chunk = {k: np.concatenate([v, np.repeat(v[-1:], short, axis=0)]) for k, v in chunk.items()}
        yield chunk, batch_size - short


def predict_spans(model, arrays: dict[str, np.ndarray], batch_size: int = 64,
                  max_answer_tokens: int = 30) -> dict[str, np.ndarray]:
    """Per example: best span start/end (token positions), its score and the null ([CLS]) score."""
    out = {"start": [], "end": [], "best": [], "null": []}
    keys = ("input_ids", "attention_mask", "token_type_ids", "context_mask")
    for chunk, real in _batches(arrays, keys, batch_size):
        s, e, b, n = _span_scores(model, *(jnp.asarray(chunk[k]) for k in keys), max_answer_tokens=max_answer_tokens)
        for key, value in zip(("start", "end", "best", "null"), (s, e, b, n)):
            out[key].append(np.asarray(value)[:real])
    return {k: np.concatenate(v) if v else np.zeros((0,)) for k, v in out.items()}


def merge_windows(pred: dict[str, np.ndarray], example_index: np.ndarray, n: int) -> dict[str, np.ndarray]:
    """Per example, from per-window predictions: the window with the best span score (its start, end, best)
    and the minimum null score over the example's windows; "window" = the chosen window's row."""
    example_index = np.asarray(example_index).reshape(-1)
    if np.setdiff1d(np.arange(n), example_index).size:
        raise UserInputError(f"merge_windows: some of the {n} examples have no window")
    best = np.asarray(pred["best"], np.float64)
    order = np.lexsort((-best, example_index))  # by example, best window first
    first = order[np.searchsorted(example_index[order], np.arange(n))]
    null = np.full(n, np.inf)
    np.minimum.at(null, example_index, np.asarray(pred["null"], np.float64))
    return {"start": pred["start"][first], "end": pred["end"][first], "best": best[first], "null": null,
            "window": first}


def _span_text(example: SpanExample, offsets: np.ndarray, start: int, end: int) -> str:
    a, b = int(offsets[start, 0]), int(offsets[end, 1])
    if a < 0 or b < 0:
        return _NO_ANSWER
    return example.context[a:b].strip()


def _golds(example: SpanExample) -> list[str]:
    return list(example.answers) or [_NO_ANSWER]


def best_null_threshold(diffs: np.ndarray, span_em: np.ndarray, span_f1: np.ndarray,
                        impossible: np.ndarray) -> float:
    """The threshold t (predict no answer when null - best > t) with the best mean F1 (ties: best EM).

    Candidates are the observed differences and -inf (always "no answer");
    a no-answer prediction scores 1 exactly on the unanswerable questions.
    """
    candidates = np.concatenate([[-np.inf], np.sort(diffs)])
    no_ans = impossible.astype(np.float64)
    best_t, best_key = 0.0, (-1.0, -1.0)
    for t in candidates:
        abstain = diffs > t
        f1 = np.where(abstain, no_ans, span_f1).mean()
        em = np.where(abstain, no_ans, span_em).mean()
        if (f1, em) > best_key:
            best_t, best_key = float(t), (f1, em)
    return best_t


def evaluate_span_task(model, task: Task, split: str, threshold: float | None = None, batch_size: int = 64,
                       max_answer_tokens: int = 30) -> dict:
    """SQuAD 2.0 metrics on `split` (fractions): exact_match, f1, has_ans_f1, no_ans_accuracy, threshold,
    answerable_f1 (`answerable_only_f1`), and per_question_f1 (each question's F1 with abstention, in order: the
    rows a paired bootstrap over questions resamples).

    threshold None: chosen on this split (use on dev, then pass it for test).
    An example split into windows takes the span of its best-scoring window
    and its lowest null score (the usual doc-stride merge).
    """
    exs, offsets = task.examples[split], task.offsets[split]
    pred = merge_windows(predict_spans(model, task.arrays[split], batch_size, max_answer_tokens),
                         task.arrays[split]["example_index"], len(exs))
    texts = [_span_text(ex, offsets[w], int(pred["start"][i]), int(pred["end"][i]))
             for i, (ex, w) in enumerate(zip(exs, pred["window"]))]
    span_em = np.array([qa_metrics.exact_match(t, _golds(ex)) for t, ex in zip(texts, exs)])
    span_f1 = np.array([qa_metrics.token_f1(t, _golds(ex)) for t, ex in zip(texts, exs)])
    impossible = np.array([ex.is_impossible for ex in exs])
    diffs = np.asarray(pred["null"], np.float64) - np.asarray(pred["best"], np.float64)
    if threshold is None:
        threshold = best_null_threshold(diffs, span_em, span_f1, impossible)
    abstain = diffs > threshold
    records = [{"prediction": _NO_ANSWER if a else t, "answer": _golds(ex), "has_answer": not ex.is_impossible}
               for t, a, ex in zip(texts, abstain, exs)]
    groups = qa_metrics.aggregate(records, key_fn=lambda r: "has_ans" if r["has_answer"] else "no_ans")
    overall = qa_metrics.aggregate(records)["all"]
    return {
        "exact_match": overall["exact_match"], "f1": overall["f1"], "count": overall["count"],
        "has_ans_f1": groups.get("has_ans", qa_metrics.empty_group())["f1"],
        "no_ans_accuracy": groups.get("no_ans", qa_metrics.empty_group())["exact_match"],
        "threshold": float(threshold),
        "answerable_f1": answerable_only_f1(span_f1, impossible),
        "per_question_f1": [round(qa_metrics.token_f1(r["prediction"], r["answer"]), 4) for r in records],
    }


def answerable_only_f1(span_f1: np.ndarray, impossible: np.ndarray) -> float:
    """Mean F1 of the best span over the answerable questions, never abstaining: what the encoder reads out of
    the passage, apart from the learned abstention that SQuAD 2.0 F1 mixes in (the always-abstain floor scores 0
    here). NaN without answerable questions."""
    answerable = ~np.asarray(impossible, bool)
    return float(np.mean(np.asarray(span_f1)[answerable])) if answerable.any() else float("nan")


def evaluate_pair_task(model, task: Task, split: str, batch_size: int = 64) -> dict:
    """The GLUE metrics of `task.metric` (fractions), their mean "score", and count."""
    keys = ("input_ids", "attention_mask", "token_type_ids")
    arrays = task.arrays[split]
    logits = [np.asarray(_class_logits(model, *(jnp.asarray(c[k]) for k in keys)))[:real]
              for c, real in _batches(arrays, keys, batch_size)]
    logits = np.concatenate(logits) if logits else np.zeros((0, task.num_labels))
    labels = arrays["labels"]
    out = qa_metrics.glue_metrics(task.metric, logits[:, 0] if task.num_labels == 1 else logits.argmax(-1), labels)
    out["count"] = int(len(labels))
    return out


def task_score(task_kind: str, result: dict) -> float:
    """One number per task, in percent: F1 for QA, else the GLUE score of the task's metric(s)."""
    if task_kind == "span":
        return 100.0 * result["f1"]
    return 100.0 * result["score"]


# ----------------------------------------------------------------------------- fine-tuning


def finetune(task: Task, encoder: Encoder, train_cfg, mesh, workdir: str, *, seed: int = 0,
             keep_checkpoints: bool = False) -> nnx.Module:
    """Fine-tunes a copy of `encoder` with a fresh head on task.arrays["train"] using the Trainer.

    The Trainer checkpoints into workdir/checkpoints (a rerun resumes);
    `keep_checkpoints=False` deletes them once training is done.
    """
    if "train" not in task.arrays:
        raise UserInputError(f"task {task.name!r} has no train split")
    model = finetune_model(task, encoder, seed)
    objective = span_qa_objective if task.kind == "span" else classification_objective
    meta = {"model": {"encoder": encoder.cfg.to_dict(), "task": task.name, "num_labels": task.num_labels}}
    trainer = Trainer(model, objective, train_cfg, mesh, workdir, meta=meta, stage=f"finetune_{task.name}")
    # Per-example arrays as [N, 1]: the Trainer's batch sharding needs rank >= 2 for every leaf.
    arrays = {k: v.reshape(len(v), -1) if v.ndim == 1 else v for k, v in task.arrays["train"].items()}
    source = ArrayBatchSource(arrays, train_cfg.batch_size, seed=seed)
    result = trainer.run(source)
    if result.status != "done":
        log.warning("fine-tuning %s preempted at step %d; rerun the same command to resume", task.name, result.step)
        raise SystemExit(0)
    if not keep_checkpoints and jax.process_index() == 0:
        workdir_fs.rmtree(os.path.join(workdir, "checkpoints"))
    return result.model


def evaluate(model, task: Task, splits: Sequence[str] = ("dev", "test"), batch_size: int = 64,
             max_answer_tokens: int = 30) -> dict[str, dict]:
    """Metrics per split; for QA the null threshold comes from the first split (dev) and is reused."""
    out = {}
    threshold = None
    for split in splits:
        if split not in task.arrays:
            continue
        if task.kind == "span":
            res = evaluate_span_task(model, task, split, threshold, batch_size, max_answer_tokens)
            threshold = res["threshold"] if threshold is None else threshold
        else:
            res = evaluate_pair_task(model, task, split, batch_size)
        res["score"] = task_score(task.kind, res)
        out[split] = res
    return out
