"""Knowledge learning: pre-train base models, continual-pretrain on new facts, test recall.

Stages (each cached in workdir/stages, see stages.py):
  world -> tokenizer -> pretrain_small, pretrain_large (background people:
  rich bios + their QA, so the base models know the QA format; or HF
  checkpoints from `base_models`) -> scores (both teachers read the new
  documents once: clue dropout's cached mode) -> cpt_<student>_<arm>_s<seed>
  (a base model learns the new documents, with the arm's dropout drawn fresh
  every step) -> eval_<name> (k-shot QA and cloze on the new people, EM/F1
  per attribute). `summary.json` holds every table; the quickstart prints one.

The stages before the students train, and each arm's training, live in continual.py (shared with the
replication pipeline); this module runs the arms and prints the tables.
"""
from __future__ import annotations


import jax
import numpy as np

from clue_jax.clues import dropout
from clue_jax.eval import corpus_probes
from clue_jax.eval.tables import format_table, mean_std
from clue_jax.pipelines import protocol
from clue_jax.pipelines.clue_views import render_clue_examples
from clue_jax.pipelines.continual import (evaluate, prepare, prepare_stage_count, stage_records,
                                          train_and_evaluate)
from clue_jax.pipelines.knowledge_data import data_description, name_distances
from clue_jax.train import logging_utils


def needs_scores(config) -> bool:
    """Teacher scores: for an arm that reads them, or to render clue examples."""
    return (any(a in ("attention",) + dropout.CONTRAST_METHODS for a in config.clues.arms)
            or config.clues.render_examples > 0)


def planned_stages(config) -> int:
    """The stages a run visits: prepare's, the base model's evaluation, and per seed and arm training + evaluation."""
    arms_runs = len(config.seeds) * len(config.clues.arms)
    return prepare_stage_count(config, needs_scores(config), sizes=("small",)) + 1 + 2 * arms_runs


def run(config, workdir: str) -> dict:
    arms = list(config.clues.arms)
    ctx = prepare(config, workdir, need_scores=needs_scores(config), sizes=("small",),
                  planned=planned_stages(config))
    summary = {"models": {}, "stages": {}, "data": data_description(ctx)}
    summary["models"]["base_small"] = evaluate(ctx, "base_small", ctx.bases["small"])
    chosen = config.clues.get("chosen", {})
    for seed in config.seeds:
        for arm in arms:
            drop = dict(chosen.get(arm, {}))
            if "protocol" in config:  # each arm's steps by the protocol (paper: dropout arms K + 1 times plain's)
                settings = protocol.arm_settings(config, config.protocol.names[0], arm, len(ctx.knowledge["test"].docs))
                summary["models"][f"{arm}_s{seed}"] = train_and_evaluate(ctx, "small", arm, seed, drop=drop,
                                                                         **settings)
            else:
                summary["models"][f"{arm}_s{seed}"] = train_and_evaluate(ctx, "small", arm, seed, drop=drop)
    summary["distance_from_name"] = name_distances(ctx)
    summary["clue_views"] = render_clue_examples(ctx, config.clues.render_examples)
    summary["stages_reused"] = ctx.stages.reused
    summary["stages_ran"] = ctx.stages.ran
    summary["stages"] = stage_records(ctx.stages)
    logging_utils.write_summary(workdir, summary)
    logging_utils.write_eval_scalars(workdir, {name: {k: v for k, v in res.items() if k != "per_person"}
                                               for name, res in summary["models"].items()})
    if jax.process_index() == 0:
        print(render_table(summary, arms, list(config.seeds)))
        print(measured_sentence(summary, arms, list(config.seeds)))
    return summary


def measured_sentence(summary: dict, arms: list[str], seeds: list[int], far=("university", "major", "company")) -> str:
    """One sentence of what the run measured: each arm's mean EM on the far attributes, and its training steps."""
    probe = "cloze" if "cloze" in summary["models"]["base_small"] else "qa"
    parts = []
    for arm in arms:
        runs = [summary["models"][f"{arm}_s{s}"] for s in seeds]
        attrs = [a for a in far if a in runs[0][probe]] or ["all"]
        em = np.mean([r[probe][a]["exact_match"] for r in runs for a in attrs])
        parts.append(f"{arm} {em:.2f} ({runs[0]['train']['steps']} steps)")
    return (f"Measured: mean {probe} exact match on the far attributes ({', '.join(attrs)}) of the new people, "
            f"{len(seeds)} seed(s): " + ", ".join(parts) + ".")


def render_table(summary: dict, arms: list[str], seeds: list[int]) -> str:
    """EM per attribute (ordered by distance from the name) for each model, mean (± std) over seeds:
    one table for the cloze probes and one for k-shot QA, headed with the data they test; for a user corpus
    also the answers' NLL, and a line when QA is at floor for the base model."""
    dist = summary.get("distance_from_name") or {}
    data = summary.get("data") or {"title": "new people", "qa": "k-shot 'What is the company of {name}?'"}
    out = []
    corpus = data.get("source") == "corpus"
    cloze = data.get("cloze", "'{name} had a professional role at'")
    sections = [("cloze", "exact_match", f"Cloze exact match ({cloze})"),
                ("qa", "exact_match", f"QA exact match ({data['qa']})")]
    if corpus:
        sections.append(("value_nll", "nll", "Answer NLL in its document (nats per answer, lower is better)"))
    for probe, metric, title in sections:
        any_model = next(iter(summary["models"].values()))
        if probe not in any_model:
            continue
        attrs = sorted((a for a in any_model[probe] if a != "all"), key=lambda a: dist.get(a, 0.0))
        header = ["model"] + [f"{a} ({dist[a]:.0f} tok)" if a in dist else a for a in attrs] + ["all"]
        rows = []
        for name in ["base_small"] + arms:
            keys = [name] if name == "base_small" else [f"{name}_s{s}" for s in seeds]
            tables = [summary["models"][k][probe] for k in keys if k in summary["models"]]
            if tables:
                rows.append([name] + [mean_std([t[a][metric] for t in tables]) for a in attrs + ["all"]])
        out.append(f"{title}, {data['title']}:\n" + format_table(rows, header))
    floor = corpus_probes.floor_line(summary["models"].get("base_small", {}).get("qa", {})) if corpus else None
    return "\n\n".join(out + ([floor] if floor else []))
