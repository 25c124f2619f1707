"""Measuring frequency shock in fine-tuning for knowledge extraction (METHODS.md section 2).

Per object entity e (keyed by its SQuAD-normalised string, so "The Louvre" and
"louvre" are one entity, as the exact-match metric sees them):
- pretrain(e): how often e is the object of a fact in the pre-training corpus;
- finetune(e): how often e is the answer in the fine-tuning set;
- predicted(e), gold(e): on the test set, how often the model answers e and
  how often e is the right answer.

The shock statistic is Spearman's rank correlation between
  y = log((predicted + s) / (gold + s))   (over- or under-prediction) and
  x = log((finetune + s) / (pretrain + s)) (what fine-tuning over-represents)
over the entities that occur as a gold answer or a prediction; s is additive
smoothing. rho > 0 is the shock: the model over-predicts what fine-tuning
over-represents relative to pre-training and under-predicts the converse.
Ranks make the statistic indifferent to the scale of either frequency.
"""

from __future__ import annotations

import collections
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
import scipy.stats

from clue_jax.errors import UserInputError
from clue_jax.eval import metrics

BUCKETS = ("seen/frequent", "seen/rare", "unseen/frequent", "unseen/rare")


class EntityFreq(NamedTuple):
    """Pre-training and fine-tuning frequency of one object entity."""

    pretrain: int
    finetune: int


class EntityCount(NamedTuple):
    """Test-set counts of one entity: as a prediction and as the gold answer."""

    predicted: int
    gold: int


def entity_key(answer: str) -> str:
    """The entity an answer string names: its SQuAD normalisation."""
    return metrics.normalize_answer(answer)


def entity_frequencies(pretrain_answers: Sequence[str], finetune_answers: Sequence[str]) -> dict[str, EntityFreq]:
    """Counts each entity among the pre-training fact objects and the fine-tuning answers.

    `pretrain_answers` lists the object of every fact occurrence in the
    pre-training corpus (one string per occurrence); `finetune_answers` the
    answer of every fine-tuning example. Strings that normalise to nothing
    are not entities and are skipped.
    """
    pt = collections.Counter(k for k in map(entity_key, pretrain_answers) if k)
    ft = collections.Counter(k for k in map(entity_key, finetune_answers) if k)
    return {e: EntityFreq(pt[e], ft[e]) for e in sorted(pt.keys() | ft.keys())}


def prediction_counts(preds: Sequence[str], golds: Sequence[str]) -> dict[str, EntityCount]:
    """How often each entity is predicted and is the gold answer on the test set.

    Empty predictions (normalising to nothing) are abstentions, not an entity,
    and are not counted; the gold side of their question still is.
    """
    if len(preds) != len(golds):
        raise UserInputError(f"{len(preds)} predictions but {len(golds)} gold answers")
    predicted = collections.Counter(k for k in map(entity_key, preds) if k)
    gold = collections.Counter(k for k in map(entity_key, golds) if k)
    return {e: EntityCount(predicted[e], gold[e]) for e in sorted(predicted.keys() | gold.keys())}


def shock_points(
    freqs: Mapping[str, EntityFreq], counts: Mapping[str, EntityCount], smoothing: float = 1.0
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(entities, x = log fine-tune/pre-train ratio, y = log predicted/gold ratio), smoothed.

    Entities absent from `freqs` count as frequency 0 in both corpora.
    """
    if not smoothing > 0:
        raise UserInputError(f"shock smoothing must be > 0, got {smoothing}")
    entities = [e for e, c in counts.items() if c.predicted > 0 or c.gold > 0]
    zero = EntityFreq(0, 0)
    x = np.array([math.log((freqs.get(e, zero).finetune + smoothing) / (freqs.get(e, zero).pretrain + smoothing))
                  for e in entities], dtype=np.float64)
    y = np.array([math.log((counts[e].predicted + smoothing) / (counts[e].gold + smoothing)) for e in entities],
                 dtype=np.float64)
    return entities, x, y


def shock_statistic(
    freqs: Mapping[str, EntityFreq], counts: Mapping[str, EntityCount], smoothing: float = 1.0
) -> dict[str, float]:
    """Spearman rho between over-prediction and fine-tune/pre-train ratio: {"rho", "p_value", "n"}.

    rho and p_value are NaN when undefined (fewer than 3 entities or a
    constant variable).
    """
    _, x, y = shock_points(freqs, counts, smoothing)
    n = len(x)
    if n < 3 or np.all(x == x[0]) or np.all(y == y[0]):
        return {"rho": math.nan, "p_value": math.nan, "n": n}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = scipy.stats.spearmanr(x, y)
    return {"rho": float(result.statistic), "p_value": float(result.pvalue), "n": n}


def _gold_entity(gold: metrics.Gold) -> str:
    """A record's entity: its gold string, or the first of a list of acceptable strings."""
    return entity_key(gold if isinstance(gold, str) else metrics.gold_list(gold)[0])


def bucket_accuracy(
    records: Sequence[Mapping],
    freqs: Mapping[str, EntityFreq],
    frequent_threshold: float | None = None,
    prediction_key: str = metrics.PREDICTION_KEY,
    answer_key: str = metrics.ANSWER_KEY,
) -> dict[str, object]:
    """Exact match / F1 in the four buckets (answer seen in fine-tuning or not) x (frequent or rare in pre-training).

    An answer is frequent when its pre-training frequency is strictly above
    `frequent_threshold`; by default the threshold is the median pre-training
    frequency of the distinct gold entities of `records` (so the split is
    about even over the entities actually tested, and with a median of 0 the
    never-seen entities are the rare ones). Returns {"threshold", "buckets":
    {bucket: {"exact_match", "f1", "count"}}}; every bucket is present, with
    NaN scores when empty.
    """
    zero = EntityFreq(0, 0)
    entities = [_gold_entity(metrics.record_field(r, answer_key, i)) for i, r in enumerate(records)]
    if frequent_threshold is None:
        distinct = sorted(set(entities))
        frequent_threshold = float(np.median([freqs.get(e, zero).pretrain for e in distinct])) if distinct else 0.0

    def bucket(entity: str) -> str:
        f = freqs.get(entity, zero)
        return f"{'seen' if f.finetune > 0 else 'unseen'}/{'frequent' if f.pretrain > frequent_threshold else 'rare'}"

    scores = metrics.aggregate(records, key_fn=lambda r: bucket(_gold_entity(r[answer_key])),
                               prediction_key=prediction_key, answer_key=answer_key)
    return {"threshold": frequent_threshold, "buckets": {b: scores.get(b, metrics.empty_group()) for b in BUCKETS}}


def plot_shock(
    freqs: Mapping[str, EntityFreq],
    counts: Mapping[str, EntityCount],
    path: str,
    smoothing: float = 1.0,
    title: str = "Frequency shock",
) -> dict[str, float]:
    """Scatter of over-prediction against the fine-tune/pre-train ratio, saved as PNG; returns the statistic.

    Draws on an Agg canvas directly (no pyplot), so it neither needs a display
    nor changes the backend of a notebook that imports it.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    _, x, y = shock_points(freqs, counts, smoothing)
    stat = shock_statistic(freqs, counts, smoothing)
    fig = Figure(figsize=(5, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.scatter(x, y, s=12, alpha=0.7)
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.axvline(0.0, color="grey", lw=0.8)
    ax.set_xlabel(f"log((fine-tune + {smoothing:g}) / (pre-train + {smoothing:g}))")
    ax.set_ylabel(f"log((predicted + {smoothing:g}) / (gold + {smoothing:g}))")
    ax.set_title(f"{title}: Spearman rho = {stat['rho']:.3f} (n = {stat['n']})")
    fig.tight_layout()
    fig.savefig(path, format="png")
    return stat
