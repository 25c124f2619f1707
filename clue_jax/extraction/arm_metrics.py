"""Per-arm metrics of the frequency-shock experiment, and the choices between arms made on dev.

Every arm is scored the same way on the test people: exact match / F1
overall, per relation and per frequency bucket, the shock statistics against
their calibrated null, and predicted/gold of the objects the skew left out,
left alone or over-sampled (overall and per pre-training stratum).
"""
from __future__ import annotations

import math

import numpy as np

from clue_jax.eval import metrics, qa_eval
from clue_jax.extraction import shock


def records_of(items, preds: list[str]) -> list[dict]:
    return [{"attribute": it.attribute, "name": it.name, "question": it.question, "answer": it.answer,
             "prediction": p, "exact_match": metrics.exact_match(p, it.answer), "f1": metrics.token_f1(p, it.answer)}
            for it, p in zip(items, preds)]


def exact_match_rate(items, preds) -> float:
    return float(np.mean([metrics.exact_match(p, it.answer) for it, p in zip(items, preds)]))


def skew_ratios(items, preds, skew: dict) -> dict[str, float]:
    """(times predicted) / (times gold) for the objects the skew left out and for those it over-sampled.

    Counted per relation (an object of one relation predicted for another does not count). Below 1 means
    under-predicted; the frequency shock shows as "dropped" < 1 < "oversampled"."""
    out = {}
    for name, key in (("dropped", "dropped_objects"), ("oversampled", "rare_objects")):
        sets = {rel: set(objs) for rel, objs in skew.get(key, {}).items()}
        norm = {rel: {shock.entity_key(o) for o in objs} for rel, objs in sets.items()}
        pred = sum(1 for it, p in zip(items, preds) if shock.entity_key(p) in norm.get(it.attribute, ()))
        gold = sum(1 for it in items if it.answer in sets.get(it.attribute, ()))
        out[name] = pred / gold if gold else math.nan
    return out


def arm_metrics(items, preds, freqs, threshold: float, smoothing: float, objects: dict, skew: dict | None = None,
                null_draws: int = 0, null_seed: int = 0) -> dict:
    """Exact match / F1 overall, per relation and per bucket, the shock statistics (raw and partial, against a
    calibrated-random null of `null_draws` draws when > 0), and predicted/gold of the left-out, plain and
    over-sampled objects, overall and per pre-training stratum, on one split. `objects[relation]`: the relation's
    closed object set; only predictions in it count for the shock statistics."""
    recs = records_of(items, preds)
    skew = skew or {}
    overall = metrics.aggregate(recs)["all"]
    per_rel = {k: v["exact_match"] for k, v in qa_eval.per_attribute(recs).items() if k != "all"}
    buckets = shock.bucket_accuracy(recs, freqs, threshold)["buckets"]
    counts = shock.prediction_counts(preds, [it.answer for it in items], [it.attribute for it in items], objects)
    return {"exact_match": overall["exact_match"], "f1": overall["f1"], "per_relation": per_rel,
            "buckets": {b: {"exact_match": v["exact_match"], "count": v["count"]} for b, v in buckets.items()},
            "shock": shock_with_null(items, preds, counts, freqs, smoothing, null_draws, null_seed,
                                     int(skew.get("strata", 3))),
            "pred_over_gold": skew_ratios(items, preds, skew),
            "pred_over_gold_strata": strata_ratios(items, preds, skew)}


def shock_with_null(items, preds, counts, freqs, smoothing, draws: int, seed: int, strata: int = 3) -> dict:
    """The shock statistics; with draws > 0 also their calibrated null (z scores) and the p-value of the partial
    statistic under permutation of fine-tuning counts within `strata` pre-training strata."""
    stat = shock.shock_statistics(freqs, counts, smoothing)
    if draws <= 0:
        return stat
    golds = [it.answer for it in items]
    correct = [shock.entity_key(p) == shock.entity_key(g) for p, g in zip(preds, golds)]
    null = shock.calibrated_null(freqs, golds, correct, [it.attribute for it in items], draws, seed, smoothing)
    out = shock.with_null(stat, null)
    out["permutation_p"] = shock.permutation_pvalue(freqs, counts, strata, draws, seed, smoothing)
    return out


def strata_ratios(items, preds, skew: dict) -> dict:
    """pred/gold per (pre-training stratum, skew label); {} without a stratified skew."""
    if "stratum" not in skew:
        return {}
    stratum = {(rel, o): st for rel, objs in skew["stratum"].items() for o, st in objs.items()}
    label = {(rel, o): lab for rel, objs in skew["label"].items() for o, lab in objs.items()}
    return shock.pred_over_gold_by_stratum([it.attribute for it in items], [it.answer for it in items], preds,
                                           stratum, label, skew["strata"])


def choose_steps(dev_em: dict[int, float]) -> int:
    """The fine-tuning length with the best dev exact match (ties: the fewest steps)."""
    return min(dev_em, key=lambda n: (-dev_em[n], n))


def best_of(per_seed: dict, prefix: str, seed: str) -> dict | None:
    """Of the base model and vanilla fine-tuning, the one with the better dev exact match (ties: the base), for one
    seed: what a mixture of the two has to beat, since lambda on dev could have picked either endpoint."""
    base, vanilla = per_seed.get(prefix + "base", {}).get("-"), per_seed.get(prefix + "vanilla", {}).get(seed)
    if base is None or vanilla is None:
        return None
    pick = "vanilla" if vanilla["dev_exact_match"] > base["dev_exact_match"] else "base"
    return {**(vanilla if pick == "vanilla" else base), "choice": pick}
