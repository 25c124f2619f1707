"""Answer metrics: SQuAD exact match and token F1 per group; GLUE task metrics; token-detection AUC.

The definitions mirror the official SQuAD evaluation scripts (Rajpurkar et al.
2016, `evaluate-v1.1.py`; 2018, `evaluate-v2.0.py`) so numbers are comparable
with the published QA results:

- normalisation: lower-case, drop ASCII punctuation (`string.punctuation`),
  drop the articles a/an/the as whole words, collapse whitespace;
- exact match: the normalised strings are equal;
- token F1: harmonic mean of precision and recall of the bag of normalised
  whitespace tokens;
- several gold answers: the best score over them (`metric_max_over_ground_truths`).

One deliberate choice where v1.1 and v2.0 differ: when the prediction or the
gold normalises to no tokens, F1 is 1.0 if both are empty and 0.0 otherwise
(the v2.0 rule for no-answer questions; v1.1 would give 0.0 for both empty).
"""

from __future__ import annotations

import collections
import math
import re
import string
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence

import numpy as np
from scipy import stats
from sklearn import metrics as sklearn_metrics

from clue_jax.errors import UserInputError

PREDICTION_KEY = "prediction"
ANSWER_KEY = "answer"

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")

Gold = str | Sequence[str]


def normalize_answer(s: str) -> str:
    """SQuAD normalisation: lower, strip punctuation and articles, squeeze spaces."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCTUATION)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def gold_list(gold: Gold) -> list[str]:
    """The acceptable answers: a gold answer may be one string or a list of strings."""
    if isinstance(gold, str):
        return [gold]
    golds = list(gold)
    if not golds:
        raise UserInputError("gold answer list is empty: give at least one acceptable answer")
    return golds


def _exact_one(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def _f1_one(prediction: str, gold: str) -> float:
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    if not pred_tokens or not gold_tokens:
        # SQuAD v2.0 no-answer rule: both empty is a perfect match.
        return float(pred_tokens == gold_tokens)
    common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, gold: Gold) -> float:
    """1.0 if the normalised prediction equals a normalised gold answer, else 0.0."""
    return max(_exact_one(prediction, g) for g in gold_list(gold))


def token_f1(prediction: str, gold: Gold) -> float:
    """SQuAD token F1 against the best-matching gold answer."""
    return max(_f1_one(prediction, g) for g in gold_list(gold))


def record_field(record: Mapping, key: str, index: int):
    """record[key], or a UserInputError naming the record index and the missing key."""
    try:
        return record[key]
    except (KeyError, TypeError, IndexError):
        raise UserInputError(f"QA record {index} has no {key!r} field") from None


def _sorted_keys(keys: Iterable[Hashable]) -> list[Hashable]:
    """Sorted when the group keys are comparable (stable reports), else first-seen order."""
    keys = list(keys)
    try:
        return sorted(keys)
    except TypeError:
        return keys


def aggregate(
    records: Sequence[Mapping],
    key_fn: Callable[[Mapping], Hashable] | None = None,
    prediction_key: str = PREDICTION_KEY,
    answer_key: str = ANSWER_KEY,
) -> dict[Hashable, dict[str, float]]:
    """Mean exact match and F1 per group.

    Each record holds a prediction string and a gold answer (string or list of
    strings). `key_fn(record)` names its group (an attribute such as "company",
    a distance bucket, ...); without one every record falls in group "all".
    Returns {group: {"exact_match", "f1", "count"}}; averages are plain means
    over the records of the group (the SQuAD convention), as fractions in [0, 1].
    """
    sums: dict[Hashable, list[float]] = {}
    for i, record in enumerate(records):
        prediction = record_field(record, prediction_key, i)
        gold = record_field(record, answer_key, i)
        if not isinstance(prediction, str):
            raise UserInputError(f"QA record {i}: {prediction_key!r} must be a string, got {type(prediction).__name__}")
        group = "all" if key_fn is None else key_fn(record)
        acc = sums.setdefault(group, [0.0, 0.0, 0])
        acc[0] += exact_match(prediction, gold)
        acc[1] += token_f1(prediction, gold)
        acc[2] += 1
    return {
        g: {"exact_match": sums[g][0] / sums[g][2], "f1": sums[g][1] / sums[g][2], "count": sums[g][2]}
        for g in _sorted_keys(sums)
    }


def empty_group() -> dict[str, float]:
    """The entry for a group with no records (NaN means, count 0), for fixed report layouts."""
    return {"exact_match": math.nan, "f1": math.nan, "count": 0}


# ----------------------------------------------------------------------------- GLUE and detection metrics
# GLUE scores each task with its own metric (Wang et al. 2019): CoLA Matthews correlation, MRPC and QQP F1
# and accuracy, STS-B Pearson and Spearman, the others accuracy. The task's score is the mean of its
# metrics (the GLUE leaderboard's convention for the two-metric tasks).

GLUE_METRICS: dict[str, tuple[str, ...]] = {
    "matthews": ("matthews",), "f1": ("f1", "accuracy"), "pearson": ("pearson", "spearman"),
    "accuracy": ("accuracy",),
}


def _paired(predictions, labels, dtype) -> tuple:
    p, y = np.asarray(predictions, dtype).reshape(-1), np.asarray(labels, dtype).reshape(-1)
    if p.shape != y.shape:
        raise UserInputError(f"metrics: {p.size} predictions for {y.size} labels")
    return p, y


def accuracy(predictions, labels) -> float:
    p, y = _paired(predictions, labels, int)
    return float(sklearn_metrics.accuracy_score(y, p)) if p.size else math.nan


def binary_f1(predictions, labels, positive: int = 1) -> float:
    """F1 of the positive class; 0.0 when there are no positive predictions and no positive labels."""
    p, y = _paired(predictions, labels, int)
    return float(sklearn_metrics.f1_score(y, p, labels=[positive], average=None, zero_division=0.0)[0])


def matthews_corrcoef(predictions, labels) -> float:
    """Matthews correlation (the K-class form of Gorodkin 2004; the usual MCC for 2 classes); 0 when undefined."""
    p, y = _paired(predictions, labels, int)
    return float(sklearn_metrics.matthews_corrcoef(y, p))


def _correlation(fn, predictions, labels) -> float:
    """scipy's correlation of the pairs; NaN when it is undefined (fewer than 2 pairs, a constant side)."""
    p, y = _paired(predictions, labels, float)
    if p.size < 2 or np.all(p == p[0]) or np.all(y == y[0]):
        return math.nan
    return float(fn(p, y).statistic)


def pearson(predictions, labels) -> float:
    return _correlation(stats.pearsonr, predictions, labels)


def spearman(predictions, labels) -> float:
    """Pearson correlation of the ranks (ties get their average rank)."""
    return _correlation(stats.spearmanr, predictions, labels)


_METRIC_FNS = {"accuracy": accuracy, "f1": binary_f1, "matthews": matthews_corrcoef, "pearson": pearson,
               "spearman": spearman}


def glue_metrics(metric: str, predictions, labels) -> dict[str, float]:
    """The metrics GLUE reports for a task whose main metric is `metric`, plus "score" (their mean), fractions.

    predictions: class indices (classification) or scores (regression, metric "pearson").
    """
    if metric not in GLUE_METRICS:
        raise UserInputError(f"GLUE metric {metric!r} is not one of {sorted(GLUE_METRICS)}")
    out = {name: _METRIC_FNS[name](predictions, labels) for name in GLUE_METRICS[metric]}
    out["score"] = float(sum(out.values()) / len(out))
    return out


def detection_auc(scores, labels, mask=None) -> float:
    """ROC AUC of per-token detection scores (higher = "replaced") against 0/1 labels, over mask > 0.

    scikit-learn's ROC AUC: the probability that a random replaced token scores
    above a random original one, ties counting one half; a perfect detector
    gets 1.0, a constant one 0.5. NaN when one of the classes is absent.
    """
    s, y = _paired(scores, labels, float)
    keep = np.ones_like(y, bool) if mask is None else np.asarray(mask).reshape(-1) > 0
    if keep.shape != y.shape:
        raise UserInputError(f"detection_auc: mask has {keep.size} entries for {y.size} labels")
    s, y = s[keep], y[keep] > 0
    if y.all() or not y.any():
        return math.nan
    return float(sklearn_metrics.roc_auc_score(y, s))
