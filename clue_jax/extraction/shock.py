"""Measuring frequency shock in fine-tuning for knowledge extraction (docs/methods.md, "Frequency shock").

Per object entity e (keyed by its SQuAD-normalised string, so "The Louvre" and
"louvre" are one entity, as the exact-match metric sees them):
- pretrain(e): how often e is the object of a fact in the pre-training corpus;
- finetune(e): how often e is the answer in the fine-tuning set;
- predicted(e), gold(e): on the test set, how often the model answers e and
  how often e is the right answer.

The shock statistic is Spearman's rank correlation between
  y = log((predicted + s) / (gold + s))   (over- or under-prediction) and
  x = log((finetune + s) / (pretrain + s)) (what fine-tuning over-represents)
over the entities that occur as a gold answer, or as a prediction that is an
object of the relation asked (`prediction_counts`); s is additive smoothing.
rho > 0 is the shock: the model over-predicts what fine-tuning over-represents
relative to pre-training and under-predicts the converse.
Ranks make the statistic indifferent to the scale of either frequency.
"""

from __future__ import annotations

import collections
import math
import warnings
from collections.abc import Collection, Mapping, Sequence
from typing import NamedTuple

import numpy as np
import scipy.stats

from clue_jax import workdir_fs
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


def prediction_counts(preds: Sequence[str], golds: Sequence[str], relations: Sequence[str],
                      objects: Mapping[str, Collection[str]]) -> dict[str, EntityCount]:
    """How often each entity is predicted and is the gold answer on the test set.

    A prediction counts only when it is an object of the relation asked
    (`relations[i]`, with `objects[relation]` its closed set): free text, an
    abstention or a university given for a city is no entity of that question,
    and counting it would fill the statistic with strings that were never
    fine-tuned or pre-trained as answers. The gold side of every question counts.
    """
    if not len(preds) == len(golds) == len(relations):
        raise UserInputError(f"{len(preds)} predictions but {len(golds)} gold answers and {len(relations)} relations")
    unknown = sorted(set(relations) - set(objects))
    if unknown:
        raise UserInputError(f"prediction_counts: no object set for relation(s) {unknown}")
    keys = {rel: {entity_key(o) for o in objs} - {""} for rel, objs in objects.items()}
    predicted = collections.Counter(k for k, rel in zip(map(entity_key, preds), relations) if k in keys[rel])
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
    workdir_fs.savefig(fig, path)
    return stat


# ------------------------------------------------------------------ statistics that separate the shock from frequency
def _ranks(values: np.ndarray) -> np.ndarray:
    return scipy.stats.rankdata(values)


def partial_spearman(x: np.ndarray, y: np.ndarray, controls: Sequence[np.ndarray]) -> float:
    """Spearman correlation of x and y with the ranks of `controls` partialled out.

    The ranks of x and of y are each residualised on [1, rank(control)...] by
    least squares, and the Pearson correlation of the residuals is returned.
    Why: x = log((ft+1)/(pt+1)) falls with pre-training frequency and
    y = log((pred+1)/(gold+1)) falls with the gold count whatever the skew;
    what is left of x after pt is what fine-tuning did.

    NaN when undefined: a variable whose ranks the controls explain (all but
    UNEXPLAINED_MIN of their variance) has no residual, only rounding noise --
    a predictor that never names an object has y = -log(gold + 1), a function of
    a control. The bar is a share of the variance, so it does not move with n.
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) < len(controls) + 3:
        return math.nan
    design = np.column_stack([np.ones(len(x))] + [_ranks(np.asarray(c, np.float64)) for c in controls])
    residuals = []
    for v in (_ranks(x), _ranks(y)):
        coef, *_ = np.linalg.lstsq(design, v, rcond=None)
        r = v - design @ coef
        spread = float(((v - v.mean()) ** 2).sum())
        if spread == 0.0 or float(r @ r) <= UNEXPLAINED_MIN * spread:
            return math.nan
        residuals.append(r)
    rx, ry = residuals
    return float(rx @ ry) / math.sqrt(float(rx @ rx) * float(ry @ ry))


UNEXPLAINED_MIN = 1e-10
"""Share of a variable's rank variance that must be left after the controls for a partial correlation to exist."""


def shock_statistics(freqs: Mapping[str, EntityFreq], counts: Mapping[str, EntityCount],
                     smoothing: float = 1.0) -> dict[str, float]:
    """{"rho", "p_value", "n", "partial_rho"}: the raw statistic and its partial form controlling log(pt + 1) and
    log(gold + 1) (ranks, so the log does not matter)."""
    stat = shock_statistic(freqs, counts, smoothing)
    entities, x, y = shock_points(freqs, counts, smoothing)
    zero = EntityFreq(0, 0)
    pt = np.array([freqs.get(e, zero).pretrain for e in entities], np.float64)
    gold = np.array([counts[e].gold for e in entities], np.float64)
    stat["partial_rho"] = partial_spearman(x, y, [np.log1p(pt), np.log1p(gold)]) if len(x) else math.nan
    return stat


def calibrated_null(freqs: Mapping[str, EntityFreq], golds: Sequence[str], correct: Sequence[bool],
                    groups: Sequence[str], draws: int = 200, seed: int = 0, smoothing: float = 1.0) -> dict:
    """The statistics of predictors whose errors ignore frequency, simulated on the same test set.

    Each draw keeps which questions the model got right (`correct`) and
    replaces every wrong answer by an object drawn from the gold answers of the
    same group (relation) other than the question's own gold, in proportion to
    how often each is the gold answer: a calibrated-random error. Returns
    {"rho": {"mean", "std", "q95"}, "partial_rho": {...}, "draws"}; q95 is the
    95th percentile, the one-sided 5% bar a shock has to clear.
    """
    golds = [entity_key(g) for g in golds]
    if not len(golds) == len(correct) == len(groups):
        raise UserInputError(f"calibrated_null: {len(golds)} golds, {len(correct)} correctness flags, "
                             f"{len(groups)} groups")
    rng = np.random.default_rng([seed, 31])
    by_group: dict[str, list[str]] = collections.defaultdict(list)
    for gd, gr in zip(golds, groups):
        by_group[gr].append(gd)
    gold_counts = collections.Counter(k for k in golds if k)
    fixed = collections.Counter(gd for gd, ok in zip(golds, correct) if ok and gd)
    wrong = [(gd, gr) for gd, ok, gr in zip(golds, correct, groups) if not ok]
    # Each wrong question's pool: its group's golds (with multiplicity) other than its own; all draws at once.
    columns = []
    for gd, gr in wrong:
        pool = np.array([o for o in by_group[gr] if o != gd], dtype=object)
        columns.append(pool[rng.integers(len(pool), size=draws)] if len(pool) else np.full(draws, "", dtype=object))
    samples = {"rho": [], "partial_rho": []}
    for d in range(draws):
        predicted = fixed + collections.Counter(c[d] for c in columns if c[d])
        counts = {e: EntityCount(predicted[e], gold_counts[e]) for e in predicted.keys() | gold_counts.keys()}
        stat = shock_statistics(freqs, counts, smoothing)
        for k in samples:
            samples[k].append(stat[k])
    out: dict = {"draws": draws}
    for k, vals in samples.items():
        v = np.asarray(vals, np.float64)
        v = v[np.isfinite(v)]
        out[k] = ({"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                   "q95": float(np.quantile(v, 0.95))} if len(v) else
                  {"mean": math.nan, "std": math.nan, "q95": math.nan})
    return out


def permutation_pvalue(freqs: Mapping[str, EntityFreq], counts: Mapping[str, EntityCount], strata: int = 3,
                       draws: int = 200, seed: int = 0, smoothing: float = 1.0) -> float:
    """One-sided p-value of the partial statistic when fine-tuning counts are permuted within pre-training strata.

    The entities are split into `strata` groups by pre-training frequency and
    their fine-tuning counts shuffled within each group, predictions and gold
    fixed: the randomisation the stratified skew made, so the p-value holds
    whatever structure the model's errors have. Ties count as exceeding (a
    permutation that cannot change the statistic gives p = 1); draws whose
    statistic is undefined are left out of both counts. NaN when the observed
    statistic is undefined (e.g. a predictor that names no object) or no draw
    is defined.
    """
    entities, _, y = shock_points(freqs, counts, smoothing)
    zero = EntityFreq(0, 0)
    pt = np.array([freqs.get(e, zero).pretrain for e in entities], np.float64)
    ft = np.array([freqs.get(e, zero).finetune for e in entities], np.float64)
    gold = np.array([counts[e].gold for e in entities], np.float64)
    controls = [np.log1p(pt), np.log1p(gold)]

    def stat(ft_counts):
        return partial_spearman(np.log((ft_counts + smoothing) / (pt + smoothing)), y, controls)

    observed = stat(ft) if len(entities) else math.nan
    if not math.isfinite(observed):
        return math.nan
    rng = np.random.default_rng([seed, 37])
    groups = np.array_split(np.argsort(-pt, kind="stable"), max(1, min(strata, len(entities))))
    values = []
    for _ in range(draws):
        shuffled = ft.copy()
        for g in groups:
            shuffled[g] = ft[rng.permutation(g)]
        values.append(stat(shuffled))
    values = np.asarray(values, np.float64)
    values = values[np.isfinite(values)]  # a draw whose statistic is undefined says nothing either way
    if not len(values):
        return math.nan
    exceed = int(np.sum(values >= observed - TIE_TOLERANCE))
    return (1 + exceed) / (1 + len(values))


TIE_TOLERANCE = 1e-9
"""A permuted statistic this close below the observed one ties with it (rounding), and ties count as exceeding."""


def with_null(stat: Mapping[str, float], null: Mapping) -> dict:
    """The statistics with their null and z = (value - null mean) / null std for rho and partial_rho."""
    out = dict(stat)
    out["null"] = dict(null)
    for k in ("rho", "partial_rho"):
        m, s = null[k]["mean"], null[k]["std"]
        out[f"{k}_z"] = (stat[k] - m) / s if math.isfinite(stat[k]) and math.isfinite(s) and s > 0 else math.nan
    return out


def pred_over_gold_by_stratum(items_rel: Sequence[str], golds: Sequence[str], preds: Sequence[str],
                              stratum_of: Mapping[tuple[str, str], int], label_of: Mapping[tuple[str, str], str],
                              strata: int) -> dict[str, dict[str, dict[str, float]]]:
    """pred/gold of the objects the skew left out, over-sampled or left alone, per pre-training stratum.

    `stratum_of[(relation, object)]` (0 = most frequent in pre-training) and
    `label_of[(relation, object)]` ("left_out", "oversampled", "plain") come
    from the skew; predictions count for the relation they were asked in.
    Returns {stratum: {label: {"pred", "gold", "ratio"}}}, ratio NaN with no gold.
    """
    norm = {(rel, entity_key(o)): key for key in stratum_of for rel, o in [key]}
    table = {str(s): {lab: {"pred": 0, "gold": 0} for lab in SKEW_LABELS} for s in range(strata)}
    for rel, gold, pred in zip(items_rel, golds, preds):
        for obj, field in ((gold, "gold"), (pred, "pred")):
            key = norm.get((rel, entity_key(obj)))
            if key is not None:
                table[str(stratum_of[key])][label_of[key]][field] += 1
    for row in table.values():
        for cell in row.values():
            cell["ratio"] = cell["pred"] / cell["gold"] if cell["gold"] else math.nan
    return table


SKEW_LABELS = ("left_out", "plain", "oversampled")
