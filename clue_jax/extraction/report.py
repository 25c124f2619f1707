"""The frequency-shock report: mean ± std over seeds, the markdown report, the lambda-sweep plot.

The text states what was measured whichever way it goes: the sentences are
built from the numbers (sign and spread), never fixed in advance. Spread is
the sample standard deviation over fine-tuning seeds (ddof = 1); paired
differences between arms are taken seed by seed.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from clue_jax.eval.seeds import direction
from clue_jax.extraction.shock import BUCKETS

ARM_ORDER = ("base", "vanilla", "mixing/interpolate", "mixing/log_linear", "mixture", "both/interpolate",
             "both/log_linear")
ARM_TEXT = {
    "base": "base model, k-shot",
    "vanilla": "vanilla fine-tuning, zero-shot",
    "mixing/interpolate": "vanilla FT + base, probability interpolation",
    "mixing/log_linear": "vanilla FT + base, log-linear",
    "mixture": "mixture fine-tuning, zero-shot",
    "both/interpolate": "mixture FT + base, probability interpolation",
    "both/log_linear": "mixture FT + base, log-linear",
}


# ------------------------------------------------------------------ aggregation
def _flatten(value, prefix: str = "") -> dict[str, float]:
    out = {}
    if isinstance(value, Mapping):
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}{k}."))
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        out[prefix[:-1]] = float(value)
    return out


def _unflatten(flat: Mapping[str, float]) -> dict:
    out: dict = {}
    for key, v in flat.items():
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v
    return out


def mean_std(runs: Sequence[Mapping]) -> dict:
    """{"mean", "std", "n"} over runs, for every numeric leaf (NaNs ignored; std is 0 for a single run)."""
    flats = [_flatten(r) for r in runs]
    keys = sorted(set().union(*flats)) if flats else []
    mean, std = {}, {}
    for k in keys:
        vals = np.array([f.get(k, math.nan) for f in flats], dtype=np.float64)
        finite = vals[np.isfinite(vals)]
        mean[k] = float(finite.mean()) if len(finite) else math.nan
        std[k] = float(finite.std(ddof=1)) if len(finite) > 1 else (0.0 if len(finite) else math.nan)
    return {"mean": _unflatten(mean), "std": _unflatten(std), "n": len(runs)}


def _get(tree: Mapping, path: str, default=math.nan):
    node = tree
    for p in path.split("."):
        if not isinstance(node, Mapping) or p not in node:
            return default
        node = node[p]
    return node


def paired_difference(summary: Mapping, arm: str, ref: str, path: str) -> tuple[float, float, int]:
    """Mean and std over seeds of (arm - ref) for one metric, seed by seed; the base arm counts for every seed."""
    arms = summary["arms"]
    if arm not in arms or ref not in arms:
        return math.nan, math.nan, 0
    diffs = []
    for seed in summary["seeds"]:
        a = arms[arm]["per_seed"].get(str(seed), arms[arm]["per_seed"].get("-"))
        b = arms[ref]["per_seed"].get(str(seed), arms[ref]["per_seed"].get("-"))
        if a is None or b is None:
            continue
        x, y = _get(a, path), _get(b, path)
        if math.isfinite(x) and math.isfinite(y):
            diffs.append(x - y)
    if not diffs:
        return math.nan, math.nan, 0
    d = np.asarray(diffs)
    return float(d.mean()), float(d.std(ddof=1)) if len(d) > 1 else 0.0, len(d)


# ------------------------------------------------------------------ text
def _pm(mean: float, std: float, n: int, digits: int = 3) -> str:
    if not math.isfinite(mean):
        return "n/a"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if n > 1 else "")


def _arm_cell(entry: Mapping, path: str, digits: int = 3) -> str:
    return _pm(_get(entry["mean"], path), _get(entry["std"], path), entry["n"], digits)


def _table(rows: list[list[str]], header: list[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _lambdas(entry: Mapping) -> str:
    lams = [r.get("lambda") for r in entry["per_seed"].values() if r.get("lambda") is not None]
    return ", ".join(f"{l:g}" for l in lams) if lams else ""


def arm_table(summary: Mapping, prefix: str = "") -> str:
    """Markdown table of the arms (decoding, or `prefix="rank:"` for candidate ranking)."""
    header = (["arm", "seeds", "EM", "F1"] + [f"EM {b}" for b in BUCKETS]
              + ["shock rho", "pred/gold left-out", "pred/gold over-sampled", "lambda (per seed)"])
    rows = []
    for arm in ARM_ORDER:
        key = prefix + arm
        if key not in summary["arms"]:
            continue
        e = summary["arms"][key]
        rows.append([key, str(e["n"]), _arm_cell(e, "exact_match"), _arm_cell(e, "f1")]
                    + [_arm_cell(e, f"buckets.{b}.exact_match") for b in BUCKETS]
                    + [_arm_cell(e, "shock.rho"), _arm_cell(e, "pred_over_gold.dropped", 2),
                       _arm_cell(e, "pred_over_gold.oversampled", 2), _lambdas(e)])
    return _table(rows, header)


def relation_table(summary: Mapping) -> str:
    relations = summary["data"]["relations"]
    rows = []
    for arm in ARM_ORDER:
        if arm in summary["arms"]:
            e = summary["arms"][arm]
            rows.append([arm] + [_arm_cell(e, f"per_relation.{r}") for r in relations])
    return _table(rows, ["arm"] + [f"EM {r}" for r in relations])


def render_table(summary: Mapping) -> str:
    return "Test exact match, buckets and shock statistic (mean ± std over seeds):\n" + arm_table(summary)


def findings(summary: Mapping) -> list[str]:
    """Sentences stating what was measured: the shock of vanilla fine-tuning and what each remedy changed."""
    arms, out = summary["arms"], []
    if "vanilla" in arms:
        v = arms["vanilla"]
        runs = [v["per_seed"][str(sd)] for sd in summary["seeds"] if str(sd) in v["per_seed"]]
        rhos = [r["shock"]["rho"] for r in runs]
        ps = [r["shock"]["p_value"] for r in runs]
        m, s = _get(v["mean"], "shock.rho"), _get(v["std"], "shock.rho")
        significant = sum(1 for r, p in zip(rhos, ps) if math.isfinite(p) and p < 0.05 and r > 0)
        base_rho = _get(arms["base"]["mean"], "shock.rho") if "base" in arms else math.nan
        d, sd, n = paired_difference(summary, "vanilla", "base", "shock.rho")
        above_base = sum(1 for r in rhos if math.isfinite(r) and math.isfinite(base_rho) and r > base_rho)
        if rhos and significant == len(rhos) and (not math.isfinite(base_rho) or above_base == len(rhos)):
            verdict = "vanilla fine-tuning produces the frequency shock on this world"
        elif any(math.isfinite(r) and r > 0 for r in rhos) and (above_base > 0 or not math.isfinite(base_rho)):
            verdict = "the shock is weak or inconsistent across seeds"
        else:
            verdict = "no frequency shock attributable to fine-tuning was measured"
        out.append(f"Shock: vanilla fine-tuning has Spearman rho = {_pm(m, s, v['n'])} over {v['n']} seed(s) "
                   f"(positive with p < 0.05 in {significant}/{len(rhos)}); the base model (no fine-tuning) has "
                   f"rho = {base_rho:.3f}, so fine-tuning changes rho by {d:+.3f} ± {sd:.3f} (above the base in "
                   f"{above_base}/{len(rhos)} seeds). Verdict: {verdict}. (rho of a model that was never fine-tuned "
                   "need not be 0: the statistic also sees how errors relate to pre-training frequency, so the "
                   "effect of fine-tuning is the difference to the base arm.)")
        em_d, em_s, n = paired_difference(summary, "vanilla", "base", "exact_match")
        if n:
            out.append(f"Vanilla fine-tuning vs the base model (k-shot): EM {em_d:+.3f} ± {em_s:.3f}.")
    out += remedy_findings(summary)
    if "rank:vanilla" in arms:
        out += remedy_findings(summary, "rank:")
    return out


def remedy_findings(summary: Mapping, prefix: str = "") -> list[str]:
    """Each remedy against vanilla fine-tuning, seed by seed, and both remedies against the best single one
    (the best chosen by dev exact match, not test)."""
    arms, out = summary["arms"], []
    vanilla = prefix + "vanilla"
    for arm in (prefix + a for a in ARM_ORDER[2:]):
        if arm not in arms or vanilla not in arms:
            continue
        em_d, em_s, n = paired_difference(summary, arm, vanilla, "exact_match")
        rho_d, rho_s, _ = paired_difference(summary, arm, vanilla, "shock.rho")
        if n:
            out.append(f"{arm} vs {vanilla}: EM {em_d:+.3f} ± {em_s:.3f}, shock rho {rho_d:+.3f} ± {rho_s:.3f} "
                       f"(accuracy: {direction(em_d, em_s, n, 'helps', 'hurts')}; "
                       f"shock: {direction(-rho_d, rho_s, n, 'lowered', 'raised')}).")
    singles = [prefix + a for a in ("mixing/interpolate", "mixing/log_linear", "mixture") if prefix + a in arms]
    boths = [prefix + a for a in ("both/interpolate", "both/log_linear") if prefix + a in arms]
    if singles and boths:
        def dev(a):
            value = _get(arms[a]["mean"], "dev_exact_match")
            return value if math.isfinite(value) else _get(arms[a]["mean"], "exact_match")

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
        "Produced by `clue_jax.pipelines.extraction` (config in `config.json` beside this file). A base model is "
        "pre-trained on every person's biographies (and the QA of "
        f"{d['pretrain_qa_people']} people), fine-tuned on a deliberately skewed QA set of other people, and asked "
        "about disjoint test people; dev people choose the mixing weight lambda.",
        "",
        f"- People: {d['people']}; relations: {', '.join(d['relations'])}.",
        f"- Fine-tuning set: {d['finetune_examples']} examples; left out (most frequent in pre-training, per "
        f"relation): {skew.get('dropped_items', 0)} items; over-sampled (rarest objects): "
        f"{skew.get('rare_items', 0)} items repeated.",
        f"- Dev / test questions: {d['dev_items']} / {d['test_items']}; base prompts are {d['k_shot']}-shot; "
        f"buckets split at pre-training frequency > {d['bucket_threshold']:g} (median over test answers).",
        f"- Seeds (fine-tuning): {summary['seeds']}; values are mean ± sample std over seeds; the base arm has "
        "one run.",
        "",
        "## Findings (as measured)",
        "",
        *[f"- {s}" for s in findings(summary)],
        "",
        "## Greedy decoding (mixing per decoding step)",
        "",
        arm_table(summary),
        "",
        "Shock rho: Spearman correlation between log(predicted / gold) on the test set and "
        "log(fine-tune / pre-train frequency) per object entity (rho > 0: the shock). pred/gold: how often the "
        "objects the skew left out of fine-tuning (the most frequent in pre-training) and those it over-sampled "
        "(the rarest) are predicted, divided by how often they are the answer (1 = calibrated).",
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
def plot_sweep(sweeps: Mapping, path: str) -> None:
    """Dev exact match against lambda: one panel per fine-tuning kind, a line per (decode|rank, mode), mean ± std
    over seeds. `sweeps[kind][seed][method][mode][lambda] = dev EM`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    kinds = list(sweeps)
    fig = Figure(figsize=(5 * max(len(kinds), 1), 4), dpi=100)
    FigureCanvasAgg(fig)
    for i, kind in enumerate(kinds):
        ax = fig.add_subplot(1, max(len(kinds), 1), i + 1)
        per_seed = list(sweeps[kind].values())
        for method in ("decode", "rank"):
            modes = sorted({m for s in per_seed for m in s.get(method, {})})
            for mode in modes:
                lams = sorted({float(l) for s in per_seed for l in s[method].get(mode, {})})
                ys = np.array([[s[method][mode].get(str(l), s[method][mode].get(repr(l), math.nan)) for l in lams]
                               for s in per_seed if mode in s.get(method, {})], dtype=np.float64)
                mean = np.nanmean(ys, axis=0)
                ax.plot(lams, mean, marker="o", ms=3, ls="-" if method == "decode" else "--", label=f"{method}/{mode}")
                if len(ys) > 1:
                    sd = np.nanstd(ys, axis=0, ddof=1)
                    ax.fill_between(lams, mean - sd, mean + sd, alpha=0.15)
        ax.set_xlabel("lambda (weight of the fine-tuned model)")
        ax.set_ylabel("dev exact match")
        ax.set_title(f"{kind} fine-tuning + base")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, format="png")
