"""Replication of Table 2 of the clue-dropout paper (Gao et al., AAAI 2025) on the biography world.

Order of the run (every step a cached stage, so a long run resumes):
1. teacher gate (clues/gate.py): both teachers' EM on background people and
   the name's share among the keys the large teacher favours from the far
   query, with a bootstrap interval against chance; printed first.
2. grid on dev people, per student and method (settings.py's rule): plain,
   random over alphas, attention / contrast over alphas x betas, in the
   grid's protocol; rate_matched and shuffled take contrast's choice.
3. test people, each protocol (`protocol_steps`):
   paper (equal epochs over 1 original + K fixed copies: a dropout arm trains
   K + 1 times plain's steps) and equal_compute (plain's steps for every arm,
   dropout drawn fresh), and long (the paper's dropout-arm steps for every arm,
   plain included, dropout drawn fresh); see protocol.py.
   Cloze EM is measured at protocol.curve_points checkpoints of every run (EM
   against steps); EM, QA and the values' NLL at the end; contrast against
   every other arm with a paired bootstrap over people x seeds.
Writes summary.json, replication.md, em_vs_distance.png and em_vs_steps.png.
"""
from __future__ import annotations

import itertools
import os

import jax
import numpy as np

from clue_jax import workdir_fs
from clue_jax.clues import gate
from clue_jax.eval import bootstrap
from clue_jax.pipelines import continual, validate
from clue_jax.pipelines.clue_views import clue_analysis, render_clue_examples
from clue_jax.pipelines.foundations import load_people
from clue_jax.pipelines.knowledge_data import data_description, name_distances, people_knowledge, token_lengths
from clue_jax.pipelines.protocol import arm_settings, protocol_mode, protocol_steps
from clue_jax.pipelines.replicate_report import plot_curves, plot_em_vs_distance, render_report
from clue_jax.train import logging_utils

DROP_ARMS = {"random": ("alpha",), "attention": ("alpha", "beta"), "contrast": ("alpha", "beta")}
FOLLOW_CONTRAST = ("rate_matched", "shuffled")  # controls: contrast's alpha, beta
FAR = ("university", "major", "company")


def run_arm(ctx, student, arm, seed, protocol, split="test", drop=None, tag="", curve=True) -> dict:
    settings = arm_settings(ctx.config, protocol, arm, len(ctx.knowledge[split].docs), curve=curve)
    suffix = {"paper": "", "equal_compute": "_eq", "long": "_long"}[protocol]
    suffix = "" if arm == "plain" and protocol != "long" else suffix  # plain: one run for paper and equal_compute
    return continual.train_and_evaluate(ctx, student, arm, seed, split=split, drop=drop, tag=tag + suffix,
                                        **settings)


def choose(trials: list[dict], names: tuple[str, ...]) -> dict:
    """The rule (configs/replicate_bios.py): highest dev EM; a tie goes to the milder setting (smaller alpha,
    then smaller beta)."""
    best = max(trials, key=lambda t: (t["dev_em"], *(-t[k] for k in names)))
    return {k: best[k] for k in names}


def grid_search(ctx, student: str) -> tuple[dict, dict]:
    """Per method: every grid point on dev people (one seed, the grid's protocol), and the chosen one."""
    c = ctx.config
    primary = c.eval.primary
    em = lambda res: res[primary]["all"]["exact_match"]
    plain = run_arm(ctx, student, "plain", c.grid.seed, c.grid.protocol, split="dev", curve=False)
    trials = {"plain": [{"dev_em": em(plain)}]}
    chosen = {}
    for arm, names in grid_arms(c).items():
        values = [tuple(c.grid.alphas)] + ([tuple(c.grid.betas)] if "beta" in names else [])
        trials[arm] = []
        for combo in itertools.product(*values):
            drop = dict(zip(names, combo))
            tag = "_" + "_".join(f"{k}{v}" for k, v in drop.items())
            res = run_arm(ctx, student, arm, c.grid.seed, c.grid.protocol, split="dev", drop=drop, tag=tag,
                          curve=False)
            trials[arm].append({**drop, "dev_em": em(res)})
        chosen[arm] = choose(trials[arm], names)
    for arm in FOLLOW_CONTRAST:
        if arm in c.clues.arms:
            chosen[arm] = dict(chosen["contrast"])
    return chosen, trials


def set_drop(config, arms) -> dict:
    """Without a grid every arm takes clues.alpha / clues.beta (random: alpha)."""
    out = {}
    for arm in arms:
        if arm in DROP_ARMS:
            out[arm] = {k: float(config.clues[k]) for k in DROP_ARMS[arm]}
        elif arm in FOLLOW_CONTRAST:
            out[arm] = {"alpha": float(config.clues.alpha), "beta": float(config.clues.beta)}
    return out


def teacher_gate(ctx) -> dict:
    """The gate's numbers: both teachers' gate.probe EM on background people, and the far-clue share."""
    c = ctx.config
    people = load_people(ctx.world_dir, "background")[: int(c.gate.people)]
    ctx.knowledge["background"] = people_knowledge(people)
    em = {}
    for size in ("small", "large"):
        res = continual.evaluate(ctx, f"teacher_{size}_background", ctx.bases[size], split="background")
        em[size] = {a: v["exact_match"] for a, v in res[c.gate.probe].items()}
    per_doc = clue_analysis(ctx).get("per_document", {"shares": [], "chance": []})  # none on a corpus
    params = {s: count_params(ctx.bases[s]["model_dir"], ctx.mesh) for s in ("small", "large")}
    out = gate.teacher_gate(em["small"], em["large"], per_doc["shares"], per_doc["chance"], min_gap=float(c.gate.min_gap),
                            n_boot=int(c.bootstrap.n_boot), params=params)
    out["probe"] = c.gate.probe
    return out


def count_params(model_dir: str, mesh) -> int:
    from flax import nnx

    from clue_jax.models import factory

    model, _ = factory.load_params(model_dir, mesh)
    return int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


def matrix(runs: list[dict], probe: str, attrs, lower_is_better: bool = False) -> np.ndarray:
    """[seeds, people]: per person the mean over `attrs` (else every attribute there is) of EM (probe
    "cloze"/"qa") or of minus NLL."""
    rows = []
    for r in runs:
        table = r["per_person"][probe]
        chosen = [a for a in attrs if a in table] or sorted(table)  # a user's QA file may name no attributes
        per = np.mean([np.asarray(table[a], np.float64) for a in chosen], axis=0)
        rows.append(-per if lower_is_better else per)
    return np.stack(rows)


def comparisons(results: dict, config) -> dict:
    """Contrast - each other arm, paired bootstrap over people x seeds: far-attribute EM and value NLL."""
    out = {}
    n_boot = int(config.bootstrap.n_boot)
    for student, arms in results.items():
        if "contrast" not in arms:
            continue
        out[student] = {}
        for arm, runs in arms.items():
            if arm in ("contrast", "base"):
                continue
            entry = {}
            for probe, lower in ((config.eval.primary, False), ("qa", False), ("value_nll", True)):
                if probe not in runs[0]["per_person"]:
                    continue
                a = matrix(arms["contrast"], probe, FAR, lower)
                b = matrix(runs, probe, FAR, lower)
                entry[probe] = bootstrap.paired_difference(a, b, n_boot=n_boot)
            out[student][arm] = entry
    return out


def grid_arms(config) -> dict[str, tuple[str, ...]]:
    """The methods the grid searches, with their settings: those run, and contrast for the controls that follow it."""
    arms = set(config.clues.arms)
    return {arm: names for arm, names in DROP_ARMS.items()
            if arm in arms or (arm == "contrast" and set(FOLLOW_CONTRAST) & arms)}


def planned_stages(config) -> int:
    """The stages a run visits: prepare's, the teacher gate's two evaluations, per student the grid (plain + every
    point, each trained and evaluated) and per protocol the base model's evaluation and every arm x seed."""
    grid = 0
    if config.grid.enabled:
        points = sum(len(config.grid.alphas) * (len(config.grid.betas) if "beta" in names else 1)
                     for names in grid_arms(config).values())
        grid = 2 * (1 + points)
    per_protocol = 1 + 2 * len(config.clues.arms) * len(config.seeds)
    return (continual.prepare_stage_count(config, need_scores=True) + 2
            + len(config.students) * (grid + len(config.protocol.names) * per_protocol))


def eval_entries(protocols: dict, seeds: list[int]) -> dict[str, dict]:
    """One evaluation entry per model (an arm's seed, or a base model), so each is written at the step it
    was trained to."""
    out = {}
    for protocol, p in protocols.items():
        for student, arms_ in p["results"].items():
            for arm, runs in arms_.items():
                names = [f"{protocol}_{student}_{arm}"] if arm == "base" else [
                    f"{protocol}_{student}_{arm}_s{seed}" for seed in seeds]
                out.update({name: {k: v for k, v in r.items() if k != "per_person"} for name, r in zip(names, runs)})
    return out


def run(config, workdir: str) -> dict:
    validate.check_config(config)  # incl. the grid's need for dev people, before any stage runs
    arms = list(config.clues.arms)
    ctx = continual.prepare(config, workdir, need_scores=True, planned=planned_stages(config))
    summary = {"teacher_gate": teacher_gate(ctx), "data": data_description(ctx),
               "token_lengths": token_lengths(ctx), "distance_from_name": name_distances(ctx)}
    if jax.process_index() == 0:
        print("\n".join(gate.describe(summary["teacher_gate"], probe=config.gate.probe)), flush=True)
    chosen, grid = {}, {}
    for student in config.students:
        if config.grid.enabled:
            chosen[student], grid[student] = grid_search(ctx, student)
        else:
            chosen[student], grid[student] = set_drop(config, arms), {}
    protocols = {}
    for protocol in config.protocol.names:
        results: dict[str, dict[str, list[dict]]] = {}
        for student in config.students:
            results[student] = {"base": [continual.evaluate(ctx, f"base_{student}", ctx.bases[student])]}
            for arm in arms:
                results[student][arm] = [run_arm(ctx, student, arm, seed, protocol,
                                                 drop=chosen[student].get(arm, {})) for seed in config.seeds]
        n = len(ctx.knowledge["test"].docs)
        protocols[protocol] = {
            "mode": protocol_mode(protocol),
            "steps": {arm: protocol_steps(protocol, arm, n, config.protocol.epochs, config.cpt.batch_size,
                                          int(config.clues.copies)) for arm in arms},
            "results": results, "comparisons": comparisons(results, config)}
    summary.update({
        "primary": reported_probe(config, protocols), "chosen": chosen, "grid": grid, "protocols": protocols,
        "clue_analysis": {k: v for k, v in clue_analysis(ctx).items() if k != "per_document"},
        "clue_views": render_clue_examples(ctx, config.clues.render_examples),
        "stages_reused": ctx.stages.reused, "stages_ran": ctx.stages.ran,
    })
    logging_utils.write_summary(workdir, summary)
    logging_utils.write_eval_scalars(workdir, eval_entries(protocols, list(config.seeds)))
    if jax.process_index() == 0:
        report = render_report(summary, config)
        workdir_fs.write_text(os.path.join(workdir, "replication.md"), report)
        plot_em_vs_distance(summary, os.path.join(workdir, "em_vs_distance.png"))
        plot_curves(summary, os.path.join(workdir, "em_vs_steps.png"))
        print(report)
    return summary


def reported_probe(config, protocols: dict) -> str:
    """eval.primary, or "qa" when the runs have no such table (a user corpus whose answers no document holds)."""
    first = next(iter(next(iter(protocols.values()))["results"].values()))["base"][0]
    return config.eval.primary if config.eval.primary in first else "qa"
