"""Replication of the clue-dropout paper's Table 2 on the biography world.

The four arms (plain, random, attention, contrast) train a small and a large
student (each from its own base model; the contrast always comes from the
large - small teacher pair) with several seeds. alpha/beta are chosen per
method on held-out dev people with the small student, then fixed for the
test people. Writes replication.md (mean ± std EM/F1 per attribute, the grid,
the clue analysis) and em_vs_distance.png.
"""
from __future__ import annotations

import itertools
import os

import jax
import numpy as np

from clue_jax.eval.seeds import direction
from clue_jax.pipelines import common, knowledge, validate
from clue_jax.train import logging_utils

DROP_ARMS = {"random": ("alpha",), "attention": ("alpha", "beta"), "contrast": ("alpha", "beta")}


def grid_search(ctx, arm: str) -> tuple[dict, list[dict]]:
    """Best (alpha, beta) for `arm` by dev-people QA exact match (all attributes)."""
    grid = ctx.config.grid
    names = DROP_ARMS[arm]
    values = [tuple(grid.alphas)] + ([tuple(grid.betas)] if "beta" in names else [])
    trials = []
    for combo in itertools.product(*values):
        drop = dict(zip(names, combo))
        tag = "_" + "_".join(f"{k}{v}" for k, v in drop.items())
        res = knowledge.train_and_evaluate(ctx, "small", arm, ctx.config.grid.seed, split="dev", drop=drop, tag=tag)
        trials.append({**drop, "dev_em": res[ctx.config.eval.primary]["all"]["exact_match"]})
    best = max(trials, key=lambda t: t["dev_em"])
    return {k: best[k] for k in names}, trials


def run(config, workdir: str) -> dict:
    validate.check_config(config)  # incl. the grid's need for dev people, before any stage runs
    arms = list(config.clues.arms)
    ctx = knowledge.prepare(config, workdir, need_scores=True)
    chosen, trials = {}, {}
    for arm in arms:
        if arm in DROP_ARMS:
            chosen[arm], trials[arm] = grid_search(ctx, arm) if config.grid.enabled else ({}, [])
    results: dict[str, dict[str, list[dict]]] = {}
    for student in config.students:
        results[student] = {"base": [knowledge.evaluate(ctx, f"base_{student}", ctx.bases[student])]}
        for arm in arms:
            results[student][arm] = [
                knowledge.train_and_evaluate(ctx, student, arm, seed, drop=chosen.get(arm, {}))
                for seed in config.seeds
            ]
    distances = knowledge.name_distances(ctx)
    summary = {
        "primary": reported_probe(config, results),
        "chosen": chosen, "grid": trials, "results": results, "distance_from_name": distances,
        "clue_analysis": knowledge.clue_analysis(ctx), "data": knowledge.data_description(ctx),
        "clue_views": knowledge.render_clue_examples(ctx, config.clues.render_examples),
        "stages_reused": ctx.stages.reused, "stages_ran": ctx.stages.ran,
    }
    common.write_json(os.path.join(workdir, "summary.json"), summary)
    logging_utils.write_eval_scalars(workdir, {f"{student}_{arm}": runs for student, arms in results.items()
                                               for arm, runs in arms.items()})
    if jax.process_index() == 0:
        report = render_report(summary, config)
        with open(os.path.join(workdir, "replication.md"), "w") as f:
            f.write(report)
        plot_em_vs_distance(summary, os.path.join(workdir, "em_vs_distance.png"))
        print(report)
    return summary


def reported_probe(config, results: dict) -> str:
    """eval.primary, or "qa" when the runs have no such table (a user corpus comes with QA pairs, no cloze)."""
    first = next(iter(results.values()))["base"][0]
    return config.eval.primary if config.eval.primary in first else "qa"


def _attrs(summary):
    dist = summary["distance_from_name"]
    first = next(iter(summary["results"].values()))["base"][0][summary["primary"]]
    return sorted((a for a in first if a != "all"), key=lambda a: dist.get(a, 0.0))


def _cell(runs, probe, attr, metric):
    return knowledge.mean_std([r[probe][attr][metric] for r in runs])


def render_report(summary: dict, config) -> str:
    attrs = _attrs(summary)
    dist = summary["distance_from_name"]
    data = summary.get("data") or {"source": "bios"}
    if data["source"] == "corpus":
        title, what = data["title"], f"questions: {data['qa']}"
    else:
        title = "the biography world"
        what = f"{config.world.num_new - config.data.num_dev} test people, {config.data.num_dev} dev people"
    lines = [f"# Clue dropout on {title}", "",
             f"Students: {', '.join(config.students)}; seeds: {list(config.seeds)}; {what}; "
             f"dropout mode: {config.clues.mode}. Mean ± sample std over seeds; "
             "`base` is the student before continual pre-training.", "",
             protocol_note(config, data.get("documents") if data["source"] == "corpus" else None), ""]
    header = ["arm"] + [f"{a} ({dist.get(a, 0):.0f} tok)" for a in attrs] + ["all"]
    probes = [summary["primary"]] + [p for p in ("cloze", "qa") if p != summary["primary"]]
    for probe in probes:
        for metric, title in (("exact_match", "exact match"), ("f1", "token F1")):
            for student, arms in summary["results"].items():
                if probe not in arms["base"][0]:
                    continue
                rows = [[arm] + [_cell(runs, probe, a, metric) for a in attrs + ["all"]] for arm, runs in arms.items()]
                lines += [f"## {probe}: {title}, {student} student", "", common.format_table(rows, header), ""]
    if not config.grid.enabled:
        lines += ["## Dropout settings (set, not chosen: grid.enabled is False)", "",
                  f"- clues.alpha={config.clues.alpha}, clues.beta={config.clues.beta}"]
    else:
        lines += [f"## Dropout settings chosen on dev people (small student, {summary['primary']} exact match)", ""]
    for arm, trials in summary["grid"].items() if config.grid.enabled else ():
        tried = ", ".join(f"{ {k: v for k, v in t.items() if k != 'dev_em'} } -> {t['dev_em']:.3f}" for t in trials)
        lines.append(f"- {arm}: chose {summary['chosen'][arm]} ({tried})")
    lines += ["", "## Which tokens are clues", ""]
    for key, value in summary["clue_analysis"].items():
        lines.append(f"- {key}: {value:.3f}" if value is not None else f"- {key}: n/a")
    lines += ["", verdict(summary), ""]
    return "\n".join(lines)


def protocol_note(config, documents: int | None = None) -> str:
    """How the training budget compares with the paper's, so a reader can weigh the table.

    documents: how many documents the students learn (a user corpus); else the world's test people
    (the new people less the dev people).
    """
    test_people = config.world.num_new - int(config.data.get("num_dev", 0))
    views = config.cpt.steps * config.cpt.batch_size / max(1, documents or test_people)
    c = config.clues
    intact = 1.0 / (c.copies + 1) if c.mode == "fixed_copies" else c.original_fraction
    doc, docs = ("document", "documents") if documents else ("biography", "biographies")
    return (f"Protocol: every arm trains {config.cpt.steps} steps of {config.cpt.batch_size} {docs} (equal "
            f"compute), so plain sees each {doc} about {views:.0f} times and a dropout arm in `{c.mode}` mode "
            f"sees it intact about {views * intact:.1f} times (a share of {intact:.3f}) and dropped the rest. "
            f"The paper instead trained every arm for the same epochs over its data set, which for the dropout arms holds 10 copies plus the original: 11 times "
            f"the steps of plain.")


def verdict(summary: dict) -> str:
    """Per student: is contrast ahead of each baseline on the far attributes, beyond the seed spread?

    Runs of every arm are listed in the same seed order, so the comparison is
    seed-paired: mean ± sample std of (contrast - baseline) per seed. A mean
    inside its std is reported as no clear difference.
    """
    out = []
    far = [a for a in ("university", "major", "company") if a in _attrs(summary)] or ["all"]  # a user's QA file
    probe = summary["primary"]
    for student, arms in summary["results"].items():
        if "contrast" not in arms:
            continue
        far_em = {arm: np.array([np.mean([r[probe][a]["exact_match"] for a in far]) for r in runs])
                  for arm, runs in arms.items() if arm != "base"}
        c = far_em["contrast"]
        parts = []
        for arm, em in far_em.items():
            if arm == "contrast":
                continue
            diff = c - em
            sd = float(np.std(diff, ddof=1)) if len(diff) > 1 else 0.0
            word = direction(float(diff.mean()), sd, len(diff), "contrast ahead", "contrast behind",
                             unclear="no clear difference")
            parts.append(f"vs {arm} ({em.mean():.3f}): {diff.mean():+.3f} ± {sd:.3f}, {word}")
        out.append(f"{student} student, mean {probe} EM on far attributes ({', '.join(far)}), contrast {c.mean():.3f}; "
                   f"seed-paired difference " + "; ".join(parts) + ".")
    return "Measured: " + " ".join(out)


def plot_em_vs_distance(summary: dict, path: str) -> None:
    from matplotlib.figure import Figure

    attrs = _attrs(summary)
    dist = summary["distance_from_name"]
    students = list(summary["results"])
    fig = Figure(figsize=(5 * len(students), 4))
    for i, student in enumerate(students):
        ax = fig.add_subplot(1, len(students), i + 1)
        for arm, runs in summary["results"][student].items():
            means = [np.mean([r[summary["primary"]][a]["exact_match"] for r in runs]) for a in attrs]
            stds = [np.std([r[summary["primary"]][a]["exact_match"] for r in runs], ddof=1) if len(runs) > 1 else 0.0
                    for a in attrs]
            ax.errorbar([dist.get(a, 0) for a in attrs], means, yerr=stds, marker="o", capsize=3, label=arm)
        ax.set_xlabel("tokens between the name and the attribute value")
        ax.set_ylabel(f"{summary['primary']} exact match")
        ax.set_title(f"{student} student")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
