"""The MCL report: table (mean ± std over seeds), the two measured claims, and the figures.

Everything is computed from the pipeline's summary dict, so the report can be
rebuilt from summary.json alone. The claims are stated as measured, whichever
way they go:
- "the courses beat ELECTRA at equal steps": per arm, the mean over seeds of
  the paired (same seed) difference in downstream test score against ELECTRA,
  with the number of seeds where the arm is ahead;
- "the soup reaches the mean of its ingredients": per seed, the uniform (and
  greedy) soup's test score against the mean of its ingredients' scores;
- the intrinsic comparison: per arm and step, the paired difference in
  detection AUC (each D on one fixed reference corruption of held-out text)
  against ELECTRA.
The per-course label shares are reported as measured, without a claim: STD
and ITD fix their share of changed tokens by construction (a permutation and
a count of insertions), so their steadiness says nothing about the method.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from clue_jax import workdir_fs
from clue_jax.eval.seeds import within_seed_spread
from clue_jax.eval.tables import format_table, mean_std

__all__ = ["claims", "write_figures", "render_table", "render"]

COURSE_NAMES = ("rtd", "std", "itd")


def _seed_scores(per_seed: dict, key: str = "score_test") -> dict[str, float]:
    return {seed: res[key] for seed, res in per_seed.items()}


def claims(summary: dict, arms: Sequence[str]) -> dict:
    """The two claims as numbers (see the module docstring)."""
    out: dict = {"courses_vs_electra": {}, "soups": {}}
    base = _seed_scores(summary["arms"].get("electra", {}))
    floor = _seed_scores(summary["arms"].get("random", {}))
    for arm in arms:
        mine = _seed_scores(summary["arms"].get(arm, {}))
        diffs = [mine[s] - floor[s] for s in sorted(set(mine) & set(floor))]
        if arm != "random" and diffs:  # what pre-training buys over no pre-training
            out.setdefault("vs_random_init", {})[arm] = {
                "mean_diff": float(np.mean(diffs)), "std_diff": float(np.std(diffs, ddof=1)) if len(diffs) > 1 else 0.0,
                "seeds_ahead": int(sum(d > 0 for d in diffs)), "seeds": len(diffs)}
        if arm in ("electra", "random") or not base:
            continue
        mine = _seed_scores(summary["arms"].get(arm, {}))
        seeds = sorted(set(mine) & set(base))
        diffs = [mine[s] - base[s] for s in seeds]
        if not diffs:
            continue
        out["courses_vs_electra"][arm] = {
            "mean_diff": float(np.mean(diffs)), "std_diff": float(np.std(diffs, ddof=1)) if len(diffs) > 1 else 0.0,
            "seeds_ahead": int(sum(d > 0 for d in diffs)), "seeds": len(diffs),
            "beats": bool(np.mean(diffs) > 0),
        }
    base_auc = summary.get("intrinsic", {}).get("electra", {})
    for arm in arms:
        mine = summary.get("intrinsic", {}).get(arm, {})
        if arm == "electra" or not base_auc or not mine:
            continue
        steps = sorted({s for per in mine.values() for s in per} & {s for per in base_auc.values() for s in per},
                       key=int)
        for step in steps:
            diffs = [mine[sd][step] - base_auc[sd][step] for sd in sorted(set(mine) & set(base_auc))
                     if step in mine[sd] and step in base_auc[sd]]
            out.setdefault("auc_vs_electra", {}).setdefault(arm, {})[step] = {
                "mean_diff": float(np.mean(diffs)),
                "std_diff": float(np.std(diffs, ddof=1)) if len(diffs) > 1 else 0.0,
                "seeds_ahead": int(sum(d > 0 for d in diffs)), "seeds": len(diffs)}
    for seed, soup in summary.get("soups", {}).items():
        ing = {n: r["score_test"] for n, r in soup["ingredients"].items()}
        entry = {"ingredient_mean": float(np.mean(list(ing.values()))), "best_ingredient": max(ing.values())}
        for kind in ("uniform", "greedy", "weighted"):
            if kind in soup:
                entry[kind] = soup[kind]["score_test"]
                entry[f"{kind}_reaches_mean"] = bool(soup[kind]["score_test"] >= entry["ingredient_mean"])
        out["soups"][seed] = entry
    if out["soups"]:
        rows = list(out["soups"].values())
        for kind in ("uniform", "greedy", "weighted"):
            if all(kind in r for r in rows):
                out[f"{kind}_soup_reaches_mean"] = {
                    "seeds": len(rows), "seeds_reaching": int(sum(r[f"{kind}_reaches_mean"] for r in rows)),
                    "mean_gap": float(np.mean([r[kind] - r["ingredient_mean"] for r in rows])),
                }
    return out


# ----------------------------------------------------------------------------- figures


def _probe_series(per_seed: dict, key: str) -> tuple[list[int], list[float]]:
    by_step: dict[int, list[float]] = {}
    for records in per_seed.values():
        for rec in records:
            if key in rec:
                by_step.setdefault(int(rec["step"]), []).append(rec[key])
    steps = sorted(by_step)
    return steps, [float(np.mean(by_step[s])) for s in steps]


def write_figures(summary: dict, workdir: str, arms: Sequence[str]) -> list[str]:
    """replaced_share.png (per course, per arm, over steps) and score_vs_steps.png; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    probes = summary.get("probes", {})
    if probes:
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), sharey=True)
        for ax, course in zip(axes, COURSE_NAMES):
            for arm in [a for a in arms if a in probes] + [a for a in probes if a.startswith("ing_")]:
                steps, values = _probe_series(probes[arm], f"{course}/replaced_share")
                if steps:
                    ax.plot(steps, values, marker=".", label=arm, linestyle="--" if arm.startswith("ing_") else "-")
            ax.set_title(f"{course.upper()} course: share of 'replaced' labels")
            ax.set_xlabel("pre-training step")
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("share of real tokens (probe batch)")
        axes[-1].legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(workdir, "replaced_share.png")
        workdir_fs.savefig(fig, path, dpi=110)
        plt.close(fig)
        paths.append(path)
    curves = summary.get("curves", {})
    if curves:
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        for arm, per_seed in curves.items():
            steps = sorted({int(s) for pts in per_seed.values() for s in pts})
            means = [np.mean([pts[str(s)] for pts in per_seed.values() if str(s) in pts]) for s in steps]
            stds = [np.std([pts[str(s)] for pts in per_seed.values() if str(s) in pts]) for s in steps]
            ax.errorbar(steps, means, yerr=stds, marker="o", capsize=3, label=arm)
        ax.set_xlabel("pre-training steps")
        ax.set_ylabel("downstream score (test, %)")
        ax.set_title("downstream score against pre-training steps")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = os.path.join(workdir, "score_vs_steps.png")
        workdir_fs.savefig(fig, path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------- tables


def _task_columns(summary: dict) -> list[tuple[str, str, str]]:
    """(header, task, metric) for every task in the results."""
    example = None
    for per_seed in summary["arms"].values():
        example = next(iter(per_seed.values()), None)
        if example:
            break
    if example is None:
        return []
    cols = []
    for task, res in example["tasks"].items():
        test = res["test"]
        if "f1" in test and "no_ans_accuracy" in test:
            cols += [(f"{task} EM", task, "exact_match"), (f"{task} F1", task, "f1"),
                     (f"{task} HasAns F1", task, "has_ans_f1"), (f"{task} NoAns acc", task, "no_ans_accuracy")]
            if "answerable_f1" in test:  # the best span on the answerable questions, never abstaining
                cols.append((f"{task} answerable-only F1", task, "answerable_f1"))
        else:  # a pair task: its GLUE metric(s)
            cols += [(f"{task} {m}", task, m) for m in ("accuracy", "f1", "matthews", "pearson", "spearman")
                     if m in test]
    return cols


def _row(label: str, results: list[dict], cols) -> list[str]:
    row = [label]
    for _, task, metric in cols:
        row.append(mean_std([100.0 * r["tasks"][task]["test"][metric] for r in results if task in r["tasks"]], 1))
    row.append(mean_std([r["score_test"] for r in results], 1))
    row.append(mean_std([r["score_dev"] for r in results], 1))
    row.append(str(len(results)))
    return row


def render_table(summary: dict, arms: Sequence[str], labels: dict | None = None) -> str:
    labels = labels or {}
    cols = _task_columns(summary)
    header = ["model"] + [c[0] for c in cols] + ["score (test)", "score (dev)", "seeds", "D rows / step"]
    rows = []
    d_rows = summary.get("discriminator_rows", {})
    for arm in arms:
        per_seed = summary["arms"].get(arm, {})
        if per_seed:
            rows.append(_row(labels.get(arm, arm), list(per_seed.values()), cols) + [rows_cell(d_rows.get(arm))])
    soups = summary.get("soups", {})
    if soups:
        names = sorted({n for s in soups.values() for n in s["ingredients"]})
        for name in names:
            rows.append(_row(f"ingredient {name}", [s["ingredients"][name] for s in soups.values()
                                                    if name in s["ingredients"]], cols))
        ing_mean = [float(np.mean([r["score_test"] for r in s["ingredients"].values()])) for s in soups.values()]
        rows.append(["ingredient mean"] + [""] * len(cols) + [mean_std(ing_mean, 1), "", str(len(ing_mean))])
        for kind in ("uniform", "greedy", "weighted"):
            res = [s[kind] for s in soups.values() if kind in s]
            if res:
                rows.append(_row(f"{kind} soup", res, cols))
    rows = [r + [""] * (len(header) - len(r)) for r in rows]
    return ("Downstream test scores in %, mean ± std over seeds (score = mean over tasks of QA F1 / the task's "
            "GLUE score; D rows / step: the discriminator's rows per optimizer step, main pass + re-discrimination "
            "pass):\n"
            + format_table(rows, header))


def rows_cell(rows: dict | None) -> str:
    """'96 (6.0x batch)' from mcl/accounting.discriminator_rows, '' when not counted (random init)."""
    if not rows:
        return ""
    return f"{rows['total']:g} ({rows['relative_to_batch']:.1f}x batch)"


def gate_lines(summary: dict, labels: dict) -> list[str]:
    """The downstream gate's result in words, whichever way it went."""
    g = summary.get("gate")
    if not g or "difference" not in g:
        return [f"- The downstream gate was not taken: {(g or {}).get('reason', 'no gate in this summary')}. "
                "Differences between arms below are not known to measure pre-training."]
    d = g["difference"]
    head = (f"- The downstream gate {'passed' if g['passed'] else 'did NOT pass'}: pre-trained "
            f"{labels.get(g['arm'], g['arm'])} scores {g['metric'].upper()} {100 * g['pretrained']:.1f} on the "
            f"{g['questions']} {g['task']} test questions against {100 * g['random_init']:.1f} for random init; "
            f"difference {100 * d['mean']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}] points (95% paired "
            f"bootstrap over questions x {len(g['seeds'])} seed(s)).")
    tail = ("- Pre-training helps this task, so the arms below can be compared on it." if g["passed"] else
            "- Pre-training is not shown to help this task: the downstream comparisons between arms below measure "
            "noise around the task's floor and are not read as evidence for any arm.")
    return [head, tail]


def _claim_lines(summary: dict, arms: Sequence[str], labels: dict) -> list[str]:
    c = summary.get("claims", {})
    lines = []
    steps = summary.get("setup", {}).get("pretrain_steps")
    for arm, r in c.get("courses_vs_electra", {}).items():
        if within_seed_spread(r["mean_diff"], r["std_diff"], r["seeds"]):
            verdict = "is not clearly different from (the mean difference is within the seed spread)"
        else:
            verdict = "beats" if r["beats"] else "does not beat"
        lines.append(f"- {labels.get(arm, arm)} {verdict} ELECTRA at equal steps ({steps}): mean paired difference "
                     f"{r['mean_diff']:+.2f} ± {r['std_diff']:.2f} points, ahead on {r['seeds_ahead']} of "
                     f"{r['seeds']} seeds.")
    for arm, r in c.get("vs_random_init", {}).items():
        verdict = ("is not clearly above" if within_seed_spread(r["mean_diff"], r["std_diff"], r["seeds"])
                   else "is above" if r["mean_diff"] > 0 else "is below")
        lines.append(f"- {labels.get(arm, arm)} {verdict} the random-init reference downstream: mean paired "
                     f"difference {r['mean_diff']:+.2f} ± {r['std_diff']:.2f} points, ahead on {r['seeds_ahead']} "
                     f"of {r['seeds']} seeds.")
    for arm, per_step in c.get("auc_vs_electra", {}).items():
        for step, r in per_step.items():
            if within_seed_spread(r["mean_diff"], r["std_diff"], r["seeds"]):
                verdict = "is not clearly different from"
            else:
                verdict = "detects better than" if r["mean_diff"] > 0 else "detects worse than"
            lines.append(f"- Detection AUC at step {step}: {labels.get(arm, arm)} {verdict} ELECTRA: mean paired "
                         f"difference {r['mean_diff']:+.4f} ± {r['std_diff']:.4f}, ahead on {r['seeds_ahead']} of "
                         f"{r['seeds']} seeds.")
    for kind in ("uniform", "greedy", "weighted"):
        r = c.get(f"{kind}_soup_reaches_mean")
        if r:
            verdict = "reaches" if r["seeds_reaching"] == r["seeds"] else (
                "does not reach" if r["seeds_reaching"] == 0 else "does not always reach")
            lines.append(f"- The {kind} soup {verdict} the mean of its ingredients: it does on {r['seeds_reaching']} "
                         f"of {r['seeds']} seeds, mean gap {r['mean_gap']:+.2f} points.")
    return lines


def _probe_table(summary: dict, arms: Sequence[str], labels: dict) -> str:
    probes = summary.get("probes", {})
    header = ["model"] + [f"{c.upper()} first -> last" for c in COURSE_NAMES]
    rows = []
    for arm in [a for a in arms if a in probes] + [a for a in probes if a.startswith("ing_")]:
        row = [labels.get(arm, arm)]
        for course in COURSE_NAMES:
            steps, values = _probe_series(probes[arm], f"{course}/replaced_share")
            row.append(f"{values[0]:.3f} (step {steps[0]}) -> {values[-1]:.3f} (step {steps[-1]})" if steps else "")
        rows.append(row)
    return format_table(rows, header) if rows else ""


def rtd_share_target(summary: dict, target: float = 0.10) -> str:
    """Whether ELECTRA's generator engaged: its RTD replaced share at the last probe against `target`."""
    steps, values = _probe_series(summary.get("probes", {}).get("electra", {}), "rtd/replaced_share")
    if not steps:
        return ""
    verdict = "below" if values[-1] < target else "NOT below"
    return (f"Generator check: ELECTRA's RTD replaced share fell from {values[0]:.3f} (step {steps[0]}) to "
            f"{values[-1]:.3f} (step {steps[-1]}), {verdict} the {target:.2f} this comparison needs for the "
            "generator to have engaged.")


def render(summary: dict, arms: Sequence[str], labels: dict | None = None) -> str:
    labels = labels or {}
    setup = summary.get("setup", {})
    rt = summary.get("runtime", {})
    lines = ["# MCL report", "", "## Gate: does pre-training help downstream?", "", *gate_lines(summary, labels), ""]
    lines += [
        f"Pre-training: {setup.get('pretrain_steps')} steps for every model (batch {setup.get('batch_size')}, "
        f"sequence length {setup.get('seq_len')}, {setup.get('corpus_docs')} biographies), seeds "
        f"{setup.get('seeds')}. Discriminator hidden {setup.get('discriminator', {}).get('hidden_size')} x "
        f"{setup.get('discriminator', {}).get('num_layers')} layers, generator hidden "
        f"{setup.get('generator', {}).get('hidden_size')}."
        + (f" Soup ingredients branch from the {labels.get('all3', 'all3')} run at step {setup.get('warmup_step')}."
           if summary.get("soups") else "")
        + " Course sampling "
        f"{setup.get('objective', {}).get('sampling')!r}; {setup.get('segments', 1)} segment(s) per row (segment B "
        f"token type 1); ITD rows with less padding than their insertions (those get fewer): "
        f"{100 * setup.get('itd_capped_share', float('nan')):.1f}%.",
        f"Downstream: {', '.join(summary.get('tasks', []))}; sizes {setup.get('task_sizes')}; "
        f"{setup.get('finetune_steps')} fine-tuning steps per task.", "",
        "## Results", "", render_table(summary, arms, labels), "",
        "## Claims, as measured", "", *(_claim_lines(summary, arms, labels) or ["- (no comparisons available)"]), "",
    ]
    soups = summary.get("soups", {})
    if soups:
        lines += ["### Soups per seed", ""]
        header = ["seed", "ingredients (test)", "ingredient mean", "uniform", "greedy (chosen)"]
        rows = []
        for seed, s in soups.items():
            ing = ", ".join(f"{n} {r['score_test']:.1f}" for n, r in s["ingredients"].items())
            mean = np.mean([r["score_test"] for r in s["ingredients"].values()])
            uni = f"{s['uniform']['score_test']:.1f}" if "uniform" in s else ""
            gre = f"{s['greedy']['score_test']:.1f} ({'+'.join(s['greedy']['chosen'])})" if "greedy" in s else ""
            rows.append([seed, ing, f"{mean:.1f}", uni, gre])
        lines += [format_table(rows, header), ""]
    curves = summary.get("curves", {})
    if curves:
        lines += ["## Downstream score against pre-training steps", ""]
        steps = sorted({int(s) for per in curves.values() for pts in per.values() for s in pts})
        header = ["model"] + [f"step {s}" for s in steps]
        rows = [[labels.get(arm, arm)] + [mean_std([pts[str(s)] for pts in per.values() if str(s) in pts], 1)
                                          for s in steps] for arm, per in curves.items()]
        lines += [format_table(rows, header), "", "![score against steps](score_vs_steps.png)", ""]
    intr = summary.get("intrinsic", {})
    if intr:
        lines += ["## Detection AUC on a fixed reference corruption", "",
                  f"Held-out biographies ({setup.get('heldout_rows')} rows, people never in pre-training) corrupted "
                  "once by one fixed reference generator; each discriminator scores the same tokens (ROC AUC, "
                  "mean ± std over seeds; 0.5 = chance).", ""]
        steps = sorted({s for per in intr.values() for pts in per.values() for s in pts}, key=int)
        header = ["model"] + [f"step {s}" for s in steps]
        rows = [[labels.get(arm, arm)] + [mean_std([pts[s] for pts in per.values() if s in pts], 4) for s in steps]
                for arm, per in intr.items()]
        lines += [format_table(rows, header), ""]
    probe = _probe_table(summary, arms, labels)
    target = rtd_share_target(summary)
    if target:
        lines += [target, ""]
    if probe:
        lines += ["## Share of 'replaced' labels over training, per course", "",
                  "Measured on a fixed probe batch with fixed corruption draws (only G changes), for every course "
                  "whether or not the model trains with it; mean over seeds. STD's and ITD's shares are fixed by "
                  "construction, so only RTD's tracks the generator.", "", probe, "",
                  "![replaced share](replaced_share.png)", ""]
    if summary.get("notes"):
        lines += ["## Notes", "", *[f"- {n}" for n in summary["notes"]], ""]
    if rt:
        sampled = rt.get("load_avg_sampled") or {}
        during = (f"; 1-minute load average during the run: mean {sampled['mean']}, max {sampled['max']} "
                  f"({sampled['samples']} samples)") if sampled else ""
        lines += ["## Runtime", "",
                  f"Wall {rt.get('wall_s')} s, CPU (user+sys) {rt.get('cpu_s')} s on {rt.get('cpu_count')} cores; "
                  f"load average at start {rt.get('load_avg_start')}, at end {rt.get('load_avg_end')}{during} "
                  "(other processes may share the machine; a load above the core count slows the wall time)."
                  + (" All stages were reused from an earlier run." if rt.get("all_stages_reused") else ""), ""]
    return "\n".join(lines)
