"""The frequency-shock report: the tables, the verdicts and the markdown report, from summary.json's numbers.

The text states what was measured whichever way it goes: the sentences are
built from the numbers (sign and spread), never fixed in advance. Spread is
the sample standard deviation over fine-tuning seeds (ddof = 1); paired
differences between arms are taken seed by seed.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from clue_jax.eval.bootstrap import describe
from clue_jax.eval.seeds import direction
from clue_jax.eval.tables import format_table
from clue_jax.extraction.seed_stats import get, paired_difference
from clue_jax.extraction.shock import BUCKETS

ARM_ORDER = ("base", "vanilla", "vanilla@matched", "best_of_base_vanilla", "mixing/interpolate", "mixing/log_linear",
             "mixture", "both/interpolate", "both/log_linear")
REMEDIES = ("mixing/interpolate", "mixing/log_linear", "mixture", "both/interpolate", "both/log_linear")
ARM_TEXT = {
    "base": "base model, k-shot",
    "vanilla": "vanilla fine-tuning, zero-shot, length chosen on dev",
    "vanilla@matched": "vanilla fine-tuning as many steps as the mixture arm",
    "best_of_base_vanilla": "base or vanilla, whichever is better on dev (per seed)",
    "mixing/interpolate": "vanilla FT + base, probability interpolation",
    "mixing/log_linear": "vanilla FT + base, log-linear",
    "mixture": "mixture fine-tuning, zero-shot",
    "both/interpolate": "mixture FT + base, probability interpolation",
    "both/log_linear": "mixture FT + base, log-linear",
}


# ------------------------------------------------------------------ text
def _pm(mean: float, std: float, n: int, digits: int = 3) -> str:
    if not math.isfinite(mean):
        return "n/a"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if n > 1 else "")


def _arm_cell(entry: Mapping, path: str, digits: int = 3) -> str:
    return _pm(get(entry["mean"], path), get(entry["std"], path), entry["n"], digits)


def _lambdas(entry: Mapping) -> str:
    lams = [r.get("lambda") for r in entry["per_seed"].values() if r.get("lambda") is not None]
    return ", ".join(f"{l:g}" for l in lams) if lams else ""


def _table_entries(summary: Mapping, prefix: str = "") -> list[tuple[str, Mapping]]:
    """(row name, entry) of the arms in ARM_ORDER, then the knowledge-free predictors (decoding tables only: they
    answer the same way whatever the decoding)."""
    rows = [(prefix + arm, summary["arms"][prefix + arm]) for arm in ARM_ORDER if prefix + arm in summary["arms"]]
    if not prefix:
        rows += [(f"no model: {name}", e) for name, e in (summary.get("knowledge_free") or {}).items()]
    return rows


def gate_lines(summary: Mapping) -> list[str]:
    """The extraction gate's result in words, whichever way it went."""
    g = summary.get("gate")
    if not g:
        return ["- The extraction gate was not taken."]
    if "difference" not in g:
        return [f"- The extraction gate did not pass: {g.get('reason', 'not measured')}."]
    verdict = "passed" if g["passed"] else "did NOT pass"
    return [f"- The extraction gate {verdict}: on the {g['questions']} test questions ({g['people']} people) whose "
            f"answer fine-tuning left out, vanilla fine-tuning scores EM {g['model_exact_match']:.3f} against "
            f"{g['best_knowledge_free_exact_match']:.3f} for the best predictor without a model "
            f"({g['best_knowledge_free']}); difference {describe(g['difference'])} (95% paired bootstrap over people "
            "x seeds).",
            "- " + ("The fine-tuned model answers questions about the test people that no knowledge-free predictor "
                    "can: the comparisons below compare extracted knowledge." if g["passed"] else
                    "Until it passes, the arms below may differ only in how they reproduce the fine-tuning answer "
                    "distribution, not in extracted knowledge; read every comparison with that in mind.")]


def _smoothing(summary: Mapping) -> str:
    return next((f"{v['smoothing']:g}" for v in (summary.get("shock_size") or {}).values()), "n/a")


def size_table(summary: Mapping) -> str:
    """The shock size (over-sampled minus left-out mean log pred/gold) overall and per stratum, 95% interval."""
    sizes = summary.get("shock_size") or {}
    strata = sorted({st for v in sizes.values() for st in v["strata"]}, key=int)
    rows = [[(arm if arm in summary["arms"] else f"no model: {arm}"), describe(v["overall"])]
            + [describe(v["strata"][st]) if st in v["strata"] else "n/a" for st in strata] for arm, v in sizes.items()]
    return format_table(rows, ["arm", "size (all strata)"] + [f"stratum {st}" for st in strata])


def arm_table(summary: Mapping, prefix: str = "") -> str:
    """Markdown table of the arms (decoding, or `prefix="rank:"` for candidate ranking)."""
    header = (["arm", "seeds", "EM", "F1"] + [f"EM {b}" for b in BUCKETS]
              + ["shock rho", "partial rho", "partial z", "pred/gold left-out", "pred/gold over-sampled",
                 "lambda (per seed)"])
    rows = []
    for key, e in _table_entries(summary, prefix):
        rows.append([key, str(e["n"]), _arm_cell(e, "exact_match"), _arm_cell(e, "f1")]
                    + [_arm_cell(e, f"buckets.{b}.exact_match") for b in BUCKETS]
                    + [_arm_cell(e, "shock.rho"), _arm_cell(e, "shock.partial_rho"), _arm_cell(e, "shock.partial_rho_z", 1),
                       _arm_cell(e, "pred_over_gold.dropped", 2),
                       _arm_cell(e, "pred_over_gold.oversampled", 2), _lambdas(e)])
    return format_table(rows, header)


def relation_table(summary: Mapping) -> str:
    relations = summary["data"]["relations"]
    rows = [[arm] + [_arm_cell(e, f"per_relation.{r}") for r in relations] for arm, e in _table_entries(summary)]
    return format_table(rows, ["arm"] + [f"EM {r}" for r in relations])


def strata_table(summary: Mapping, arms: Sequence[str] = ("base", "vanilla", "mixture", "both/log_linear")) -> str:
    """pred/gold of the left-out, plain and over-sampled objects in each pre-training stratum (0 = most frequent):
    the shock is left-out < plain < over-sampled within a stratum."""
    labels = ("left_out", "plain", "oversampled")
    rows = []
    for arm in arms:
        if arm not in summary["arms"]:
            continue
        e = summary["arms"][arm]
        for stratum in sorted(get(e["mean"], "pred_over_gold_strata", {}) or {}, key=int):
            rows.append([arm, stratum] + [_arm_cell(e, f"pred_over_gold_strata.{stratum}.{lab}.ratio", 2)
                                          for lab in labels]
                        + [str(int(get(e["mean"], f"pred_over_gold_strata.{stratum}.{lab}.gold", 0))) for lab in labels])
    return format_table(rows, ["arm", "stratum", "pred/gold left out", "pred/gold plain", "pred/gold over-sampled",
                         "gold left out", "gold plain", "gold over-sampled"])


def null_table(summary: Mapping, prefix: str = "") -> str:
    """Both statistics beside their calibrated-random null (mean ± std of the null over its draws, first seed)."""
    rows = []
    for arm in ARM_ORDER:
        runs = _per_seed_runs(summary, prefix + arm)
        if not runs or "null" not in runs[0].get("shock", {}):
            continue
        sh = runs[0]

        def cell(path, digits=3):
            return _pm(get(sh, f"shock.{path}.mean"), get(sh, f"shock.{path}.std"), 2, digits)

        def num(path, digits=3):
            value = get(sh, f"shock.{path}")
            return f"{value:.{digits}f}" if math.isfinite(value) else "n/a"

        rows.append([prefix + arm, num("rho"), cell("null.rho"), num("partial_rho"), cell("null.partial_rho"),
                     num("null.partial_rho.q95"), num("partial_rho_z", 1), num("permutation_p")])
    return format_table(rows, ["arm", "rho", "null rho", "partial rho", "null partial rho", "null q95", "partial z",
                         "permutation p"])


def steps_table(summary: Mapping) -> str:
    sweep = summary.get("steps_sweep") or {}
    steps = sorted({int(n) for per in sweep.values() for n in per})
    rows = []
    for n in steps:
        vals = {k: np.array([per[str(n)][k] for per in sweep.values() if str(n) in per])
                for k in ("dev_exact_match", "exact_match")}
        rows.append([str(n)] + [_pm(float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0, len(v))
                                for v in vals.values()])
    return format_table(rows, ["fine-tuning steps", "dev EM", "test EM"])


def render_table(summary: Mapping) -> str:
    return ("\n".join(gate_lines(summary)) + "\n\nTest exact match, buckets and shock statistic (mean ± std over seeds):\n"
            + arm_table(summary))


def _per_seed_runs(summary: Mapping, arm: str) -> list[Mapping]:
    entry = summary["arms"].get(arm)
    if entry is None:
        return []
    return [entry["per_seed"][k] for k in [*map(str, summary["seeds"]), "-"] if k in entry["per_seed"]]


def _shocked(run: Mapping) -> bool:
    """The partial statistic above its calibrated null's 95th percentile and, where measured, its within-stratum
    permutation p-value below 0.05: both nulls reject."""
    value, q95 = get(run, "shock.partial_rho"), get(run, "shock.null.partial_rho.q95")
    p = get(run, "shock.permutation_p")
    return (math.isfinite(value) and math.isfinite(q95) and value > q95
            and (not math.isfinite(p) or p < 0.05))


def _fmt(value: float, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if math.isfinite(value) else "n/a"


def shock_verdict(summary: Mapping) -> str:
    """One sentence on the shock of vanilla fine-tuning: its partial statistic against its null and the base's."""
    runs = _per_seed_runs(summary, "vanilla")
    if not runs:
        return "Shock: no vanilla arm was run."
    arms = summary["arms"]
    above = sum(map(_shocked, runs))
    base_runs = _per_seed_runs(summary, "base")
    base_shocked = bool(base_runs) and _shocked(base_runs[0])
    m, sd = get(arms["vanilla"]["mean"], "shock.partial_rho"), get(arms["vanilla"]["std"], "shock.partial_rho")
    z = get(arms["vanilla"]["mean"], "shock.partial_rho_z")
    d, dsd, n = paired_difference(summary, "vanilla", "base", "shock.partial_rho")
    if above == len(runs) and not base_shocked:
        verdict = "vanilla fine-tuning produces the frequency shock on this world"
    elif above > 0:
        verdict = "the shock is weak or inconsistent across seeds" + (" (the base model clears the bar too)"
                                                                          if base_shocked else "")
    else:
        verdict = "no frequency shock was measured"
    base_value = get(base_runs[0], "shock.partial_rho") if base_runs else math.nan
    return (f"Shock: vanilla fine-tuning has partial rho = {_pm(m, sd, len(runs))} (mean z = {z:.1f} against "
            f"calibrated-random predictors with its own right answers; within-stratum permutation p = "
            f"{', '.join(_fmt(get(r, 'shock.permutation_p')) for r in runs)}), beyond both nulls in "
            f"{above}/{len(runs)} seed(s); the base model has {base_value:.3f} (above its null: "
            f"{'yes' if base_shocked else 'no'}); fine-tuning changes it by {d:+.3f} ± {dsd:.3f}. Verdict: {verdict}.")


def steps_findings(summary: Mapping) -> list[str]:
    """EM against fine-tuning steps: where it peaks and whether longer fine-tuning hurts, on test, over seeds."""
    sweep = summary.get("steps_sweep") or {}
    steps = sorted({int(n) for per in sweep.values() for n in per})
    if not steps:
        return []
    em = {n: np.array([per[str(n)]["exact_match"] for per in sweep.values() if str(n) in per]) for n in steps}
    mean = {n: float(v.mean()) for n, v in em.items()}
    peak = max(steps, key=lambda n: mean[n])
    last = steps[-1]
    diffs = np.array([per[str(last)]["exact_match"] - per[str(peak)]["exact_match"] for per in sweep.values()
                      if str(last) in per and str(peak) in per])
    sd = float(diffs.std(ddof=1)) if len(diffs) > 1 else 0.0
    base = get(summary["arms"].get("base", {}).get("mean", {}), "exact_match")
    out = [f"Vanilla fine-tuning length: test EM peaks at {peak} steps ({mean[peak]:.3f}); at {last} steps it is "
           f"{mean[last]:.3f}, {float(diffs.mean()):+.3f} ± {sd:.3f} against the peak (longer fine-tuning: "
           f"{direction(-float(diffs.mean()), sd, len(diffs), 'hurts', 'helps') if last != peak else 'still the best'}"
           f"); the base model has {base:.3f}."]
    chosen = [int(r["steps"]) for r in _per_seed_runs(summary, "vanilla") if "steps" in r]
    if chosen:
        out.append(f"Steps chosen on dev for the vanilla arm (per seed): {', '.join(map(str, chosen))}; the "
                   f"compute-matched vanilla arm runs {summary.get('matched_steps')} steps, as many as the mixture "
                   "arm in all.")
    return out


def findings(summary: Mapping) -> list[str]:
    """Sentences stating what was measured: the shock of vanilla fine-tuning and what each remedy changed."""
    arms, out = summary["arms"], []
    if "vanilla" in arms:
        out.append(shock_verdict(summary))
        em_d, em_s, n = paired_difference(summary, "vanilla", "base", "exact_match")
        if n:
            out.append(f"Vanilla fine-tuning vs the base model (k-shot): EM {em_d:+.3f} ± {em_s:.3f} "
                       f"({direction(em_d, em_s, n, 'helps', 'hurts')}).")
    out += steps_findings(summary)
    out += remedy_findings(summary)
    if "rank:vanilla" in arms:
        out += remedy_findings(summary, "rank:")
    return out


def remedy_findings(summary: Mapping, prefix: str = "") -> list[str]:
    """Each remedy against vanilla fine-tuning, seed by seed, and both remedies against the best single one
    (the best chosen by dev exact match, not test)."""
    arms, out = summary["arms"], []
    vanilla, best = prefix + "vanilla", prefix + "best_of_base_vanilla"
    refs = {prefix + "mixture": [vanilla, prefix + "vanilla@matched"]}
    for arm in (prefix + a for a in REMEDIES):
        if arm not in arms or vanilla not in arms:
            continue
        parts = []
        for ref in refs.get(arm, [vanilla, best]):
            em_d, em_s, n = paired_difference(summary, arm, ref, "exact_match")
            if n:
                parts.append(f"vs {ref}: EM {em_d:+.3f} ± {em_s:.3f} ({direction(em_d, em_s, n, 'helps', 'hurts')})")
        rho_d, rho_s, n = paired_difference(summary, arm, vanilla, "shock.partial_rho")
        if parts:
            out.append(f"{arm} " + "; ".join(parts) + f"; partial shock rho vs {vanilla} {rho_d:+.3f} ± {rho_s:.3f} "
                       f"({direction(-rho_d, rho_s, n, 'lowered', 'raised')}).")
    singles = [prefix + a for a in ("mixing/interpolate", "mixing/log_linear", "mixture") if prefix + a in arms]
    boths = [prefix + a for a in ("both/interpolate", "both/log_linear") if prefix + a in arms]
    if singles and boths:
        def dev(a):
            value = get(arms[a]["mean"], "dev_exact_match")
            return value if math.isfinite(value) else get(arms[a]["mean"], "exact_match")

        best_single, best_both = max(singles, key=dev), max(boths, key=dev)
        d, sd, n = paired_difference(summary, best_both, best_single, "exact_match")
        out.append(f"Both remedies together ({best_both}) vs the best single remedy ({best_single}), each picked "
                   f"by dev exact match: test EM {d:+.3f} ± {sd:.3f} "
                   f"(both together: {direction(d, sd, n, 'better', 'worse')}).")
    return out


def render_report(summary: Mapping) -> str:
    d, rt = summary["data"], summary.get("runtime", {})
    skew = summary.get("skew", {})
    lines = [
        "# Frequency shock in fine-tuning for knowledge extraction",
        "",
        "## Gate: does fine-tuning extract knowledge?",
        "",
        *gate_lines(summary),
        "",
        "Produced by `clue_jax.pipelines.extraction` (config in `config.json` beside this file). A base model is "
        "pre-trained on every person's biographies (and the QA of "
        f"{d['pretrain_qa_people']} people), fine-tuned on a deliberately skewed QA set of other people, and asked "
        "about disjoint test people; dev people choose the mixing weight lambda and the vanilla fine-tuning length.",
        "",
        f"- People: {d['people']}; relations: {', '.join(d['relations'])}.",
        f"- Fine-tuning set: {d['finetune_examples']} examples; per relation the objects are split into "
        f"{skew.get('strata', 'n/a')} pre-training-frequency strata and, within each, drawn at random to be left "
        f"out ({skew.get('dropped_items', 0)} items) or over-sampled ({skew.get('rare_items', 0)} items repeated).",
        f"- Mixture fine-tuning replays {d.get('replay_documents', 'n/a')} pre-training documents of "
        f"{d.get('replay_people', 'n/a')} people (everyone but the dev and test people).",
        f"- Dev / test questions: {d['dev_items']} / {d['test_items']}; base prompts are {d['k_shot']}-shot; "
        f"buckets split at pre-training frequency > {d['bucket_threshold']:g} (median over test answers).",
        f"- Seeds (fine-tuning): {summary['seeds']}; values are mean ± sample std over seeds; the base arm has "
        "one run.",
        "",
        "## Shock size (over-sampled minus left-out mean log pred/gold, 95% bootstrap over people x seeds)",
        "",
        size_table(summary),
        "",
        "Within each pre-training stratum: the mean over over-sampled objects of log((predicted + s) / (gold + s)) "
        f"(s = {_smoothing(summary)}) minus that over left-out objects. 0 is no shock; `no model: sample:finetune` (sampling the fine-tuning "
        "answers) is the most a predictor without knowledge shows, `no model: sample:prior` none.",
        "",
        "## Predicted / gold per pre-training stratum (decoding, mean ± std over seeds)",
        "",
        strata_table(summary),
        "",
        "Within every stratum the skew drew the left-out and over-sampled objects at random, so a frequency shock "
        "shows as pred/gold left out < plain < over-sampled in the same row, whatever the row's frequency.",
        "",
        "## Findings (as measured)",
        "",
        *[f"- {s}" for s in findings(summary)],
        "",
        "## Shock statistics against their null (decoding, first seed)",
        "",
        null_table(summary),
        "",
        "rho: Spearman correlation of y = log((predicted + 1) / (gold + 1)) with x = log((fine-tune + 1) / "
        "(pre-train + 1)) per object entity. partial rho: the same with the ranks of log(pre-train + 1) and "
        "log(gold + 1) partialled out (x falls with pre-training frequency and y with the gold count even without "
        "a skew). The null: the same statistics for predictors that keep the arm's right answers and replace each "
        "wrong one by a random gold answer of the same relation (errors that ignore frequency); z = (value - null "
        "mean) / null std. permutation p: one-sided p-value of partial rho when the fine-tuning counts are "
        "shuffled among entities of the same pre-training stratum (the randomisation the skew made).",
        "",
        "## Exact match against vanilla fine-tuning steps (zero-shot decoding)",
        "",
        steps_table(summary),
        "",
        "## Greedy decoding (mixing per decoding step)",
        "",
        arm_table(summary),
        "",
        "shock rho / partial rho / partial z: see above. pred/gold: how often the objects the skew left out of "
        "fine-tuning and those it over-sampled are predicted, divided by how often they are the answer "
        "(1 = calibrated). best_of_base_vanilla: per seed the base or the vanilla arm, whichever has the better "
        "dev EM (what mixing, with lambda strictly between 0 and 1, is compared with).",
        "",
    ]
    if any(a.startswith("rank:") for a in summary["arms"]):
        lines += ["## Candidate ranking (mixing of candidate scores)", "",
                  "Each relation's objects in the world are the candidates; the highest (mixed) score wins.", "",
                  arm_table(summary, "rank:"), ""]
    lines += ["## Exact match per relation (decoding)", "", relation_table(summary), ""]
    plots = summary.get("plots", {})
    if plots:
        lines += ["## Plots", ""] + [f"- {k}: `{v}`" for k, v in sorted(plots.items())] + [""]
    if rt:
        lines += ["## Runtime", "",
                  f"This invocation: {rt.get('seconds')} s wall, {rt.get('cpu_seconds')} s CPU time (all threads) on "
                  f"{rt.get('cpu_count')} CPU core(s), {rt.get('devices')}; "
                  f"load average at start {_load(rt.get('loadavg_start'))}, at end {_load(rt.get('loadavg_end'))} "
                  "(other processes on the machine inflate the time). Summed over the stages of this workdir "
                  f"(reused stages keep the time they took when they ran): {_sum(rt.get('stage_seconds'))} s wall, "
                  f"{_sum(rt.get('stage_cpu_seconds'))} s CPU.", "",
                  "| stage | wall s | CPU s |", "|---|---|---|",
                  *[f"| {k} | {v} | {(rt.get('stage_cpu_seconds') or {}).get(k, '')} |"
                    for k, v in (rt.get("stage_seconds") or {}).items()], ""]
    return "\n".join(lines)


def _sum(values) -> str:
    vals = [v for v in (values or {}).values() if isinstance(v, (int, float))]
    return f"{sum(vals):.0f}" if vals else "n/a"


def _load(values) -> str:
    return "/".join(f"{v:.1f}" for v in values) if values else "n/a"


# ------------------------------------------------------------------ plot
