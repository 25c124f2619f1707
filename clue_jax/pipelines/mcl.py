"""MCL (docs/methods.md, "MCL") end to end: ELECTRA vs course arms vs course soups, on the biography world.

Stages (each cached in workdir/stages, see stages.py):
  world -> tokenizer -> pre_<arm>_s<seed> (an ElectraPair pre-trained for
  `pretrain.steps` on rich biographies of the background people, with the
  arm's courses; every `probe_every` steps a probe records each course's share
  of "replaced" labels on a fixed batch, and at the `curve` steps the weights
  are kept) -> soup ingredients ing_<name>_s<seed> (the warm-up arm's
  checkpoint at step W = warmup_fraction * steps, copied into the
  ingredient's checkpoint folder so its Trainer resumes from it: same
  optimizer state and learning-rate schedule, then steps W..N with the
  ingredient's correction losses) -> soup_uniform_s<seed> and the greedy soup
  (candidate soups scored on dev after fine-tuning) -> ft_<model> (the
  discriminator fine-tuned on each downstream task and evaluated on dev and
  test).
Then summary.json, mcl_report.md and two PNGs (label shares, score against
pre-training steps) are written from the stage results (cheap, always redone).

Equal steps: every arm and every ingredient has taken exactly
`pretrain.steps` optimizer steps with one learning-rate schedule; the
ingredients share their first W steps (the warm-up arm's own run: the
warm-up is not trained twice). Each seed seeds the pair's initialisation,
the data order, the corruption draws, and the fine-tuning heads, so arms are
compared seed by seed.

Downstream tasks: the built-in bios_qa and bios_pair (clue_jax.mcl.downstream)
over the "new" people (never in the pre-training corpus), split by person;
plus GLUE tasks / SQuAD 2.0 (`real_tasks`) when their tfds data is prepared in
`real_tasks.data_dir`, skipped with a note in the report otherwise. The
downstream score of a model is the mean over tasks of F1 (QA) or accuracy.
"""
from __future__ import annotations

import logging
import os
import time

import jax
import numpy as np
from flax import nnx

from clue_jax import workdir_fs
from clue_jax.errors import UserInputError
from clue_jax.mcl import downstream, downstream_gate, intrinsic, objective as mcl_objective, report, soups
from clue_jax.mcl.corpus import itd_capped_share
from clue_jax.mcl.pairs import create_pair, load_pair, params_hash, save_pair
from clue_jax.pipelines import common
from clue_jax.pipelines.foundations import public
from clue_jax.pipelines.mcl_context import LOAD_SAMPLES, Context, objective_config, prepare
from clue_jax.pipelines.mcl_pretrain import (ARMS, COMPUTE_MATCHED, pretrain_arm, pretrain_ingredient, probe_steps,
                                             rows_per_step, warmup_step)
from clue_jax.pipelines.stages import fingerprint
from clue_jax.train import logging_utils

log = logging.getLogger("clue_jax")

ARM_LABELS = {"electra": "ELECTRA (RTD)", "std": "+STD", "itd": "+ITD", "all3": "RTD+STD+ITD", "mcl": "MCL",
              "all3_redisc": "RTD+STD+ITD + re-discrimination", "electra_matched": "ELECTRA, MCL's discriminator rows",
              "random": "random init (no pre-training)"}


# ------------------------------------------------------------------ fine-tuning
def finetune_and_evaluate(ctx: Context, name: str, model_dir: str, model_fp: str, seed: int) -> dict:
    """Every downstream task: fine-tune the discriminator, evaluate on dev and test; plus the mean scores."""
    config = ctx.config
    inputs = {"model": model_fp, "finetune": config.finetune.to_dict(), "tasks": ctx.tasks_fp, "seed": seed,
              "max_answer_tokens": config.downstream.max_answer_tokens,
              "scores": ["answerable_f1", "per_question_f1"]}  # results without them are recomputed

    def run(stage_dir):
        LOAD_SAMPLES.append(os.getloadavg()[0])
        encoder = load_pair(model_dir, ctx.mesh).discriminator_model().encoder
        out = {}
        for task in ctx.tasks:
            cfg = config.finetune.copy_and_resolve_references()
            cfg.seed = seed
            model = downstream.finetune(task, encoder, cfg, ctx.mesh, os.path.join(stage_dir, task.name), seed=seed)
            out[task.name] = downstream.evaluate(model, task, batch_size=config.downstream.eval_batch,
                                                 max_answer_tokens=config.downstream.max_answer_tokens)
        return {"tasks": out, "score_dev": float(np.mean([r["dev"]["score"] for r in out.values()])),
                "score_test": float(np.mean([r["test"]["score"] for r in out.values()]))}

    return public(ctx.stages.run(f"ft_{name}", inputs, run))


# ------------------------------------------------------------------ the downstream gate
GATE_ARM = "electra"


def reference_gate(summary: dict, tasks, with_random: bool) -> dict:
    """mcl/downstream_gate.py on the first QA task's test questions: pre-trained ELECTRA against random init."""
    qa = next((t.name for t in tasks if t.kind == "span"), None)
    if qa is None or not with_random or GATE_ARM not in summary["arms"]:
        return {"passed": False, "reason": "the gate needs a QA task, the electra arm and random_init = True"}

    def per_question(arm):
        return {seed: res["tasks"][qa]["test"]["per_question_f1"] for seed, res in summary["arms"][arm].items()}

    return {"task": qa, "arm": GATE_ARM, "metric": "f1",
            **downstream_gate.downstream_gate(per_question(GATE_ARM), per_question("random"))}


def strip_per_question(tree) -> None:
    """Removes the per-question scores (kept in the stage results) from the summary, which keeps the means."""
    if isinstance(tree, dict):
        tree.pop("per_question_f1", None)
        for value in tree.values():
            strip_per_question(value)
    elif isinstance(tree, list):
        for value in tree:
            strip_per_question(value)


# ------------------------------------------------------------------ soups
def soup_arms(ctx: Context, seed: int, ingredients: dict[str, dict]) -> dict:
    """Ingredient scores, the uniform soup and the greedy soup (dev-scored) for one seed."""
    config = ctx.config
    names = sorted(ingredients)
    pairs = [load_pair(ingredients[n]["model_dir"], ctx.mesh) for n in names]
    graphdef, _, rest = nnx.split(pairs[0], nnx.Param, ...)
    states = [nnx.state(p, nnx.Param) for p in pairs]
    scored = {n: finetune_and_evaluate(ctx, f"ing_{n}_s{seed}", ingredients[n]["model_dir"],
                                       ingredients[n]["_fingerprint"], seed) for n in names}
    # Evaluated models by parameters: a soup equal (to 1e-6) to an ingredient or an earlier soup reuses its
    # scores (the greedy soup's candidates average in another order than the uniform soup: last-bit noise).
    known: list[tuple[object, dict]] = [(s, scored[n]) for n, s in zip(names, states)]
    out = {"ingredients": {n: scored[n] for n in names}}

    def same(a, b) -> bool:
        return all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(jax.numpy.max(jax.numpy.abs(x - y)) <= 1e-6),
                                                a, b)))

    def evaluate_soup(state, tag):
        for other, result in known:
            if same(state, other):
                return result
        h = params_hash(state)
        model_dir = os.path.join(ctx.stages.path("soups"), f"{tag}_{h}_s{seed}")
        if not workdir_fs.exists(os.path.join(model_dir, "pair_config.json")):
            save_pair(nnx.merge(graphdef, state, rest), model_dir)
        result = finetune_and_evaluate(ctx, f"soup_{tag}_{h}_s{seed}", model_dir, h, seed)
        known.append((state, result))
        return result

    if "uniform" in config.soups.kinds:
        out["uniform"] = evaluate_soup(soups.uniform_soup(states), "uniform")
    if "greedy" in config.soups.kinds:
        greedy = soups.greedy_soup(states, lambda s: evaluate_soup(s, "greedy")["score_dev"],
                                   order_by=[scored[n]["score_dev"] for n in names])
        out["greedy"] = dict(evaluate_soup(greedy.soup, "greedy"), chosen=[names[i] for i in greedy.chosen],
                             trials=[(names[i], s, k) for i, s, k in greedy.scores.trials])
    if "weighted" in config.soups.kinds:  # weights from the ingredients' dev scores (raw ones are ~uniform)
        w = soups.score_weights([scored[n]["score_dev"] for n in names], config.soups.get("weighting", "softmax"),
                                float(config.soups.get("tau", 1.0)))
        out["weighted"] = dict(evaluate_soup(soups.weighted_soup(states, w), "weighted"), weights=w)
    return out


# ------------------------------------------------------------------ references
def random_init_arm(ctx: Context, seed: int) -> dict:
    """A freshly initialised pair (no pre-training): the floor every pre-trained arm is read against."""
    def run(d):
        save_pair(create_pair(ctx.disc_cfg, ctx.gen_cfg, seed, ctx.mesh), os.path.join(d, "model"))
        return {"model_dir": os.path.join(d, "model")}

    inputs = {"model": ctx.config.model.to_dict(), "generator": ctx.config.generator.to_dict(), "seed": seed,
              "vocab": len(ctx.tokenizer)}
    return ctx.stages.run(f"random_s{seed}", inputs, run)


def detection_aucs(ctx: Context, pre: dict, arm: str, seed: int) -> dict[str, float]:
    """{step: D's detection AUC on the reference corruption} at the arm's snapshots and its final step.

    The reference corruption is built once, by the generator of intrinsic.reference_arm at the first seed.
    """
    i = ctx.config.intrinsic
    if ctx.reference is None:
        ref_pair = load_pair(pre[i.reference_arm]["model_dir"], ctx.mesh)
        cfg = objective_config(ctx.config, ctx.tokenizer, ("rtd",), ())
        ctx.reference = intrinsic.reference_corruption(ref_pair, ctx.heldout, cfg, seed=int(i.seed))
    dirs = dict(pre[arm].get("snapshots", {}), **{str(pre[arm].get("steps", 0)): pre[arm]["model_dir"]})
    return {step: intrinsic.detection_auc(load_pair(d, ctx.mesh), ctx.reference) for step, d in dirs.items()}


# ------------------------------------------------------------------ pipeline
def _check(config) -> None:
    for arm in config.arms:
        if arm not in ARMS:
            raise UserInputError(f"arms contains {arm!r}; valid arms: {sorted(ARMS)}")
    if config.soups.enabled:
        if config.soups.warmup_arm not in ARMS:
            raise UserInputError(f"soups.warmup_arm={config.soups.warmup_arm!r} is not one of {sorted(ARMS)}")
        if len(config.soups.ingredients) < 2:
            raise UserInputError("soups.ingredients needs at least 2 ingredients")
        for name, losses in config.soups.ingredients.items():
            for loss in losses:
                if loss not in mcl_objective.CORRECTIONS:
                    raise UserInputError(f"soups.ingredients.{name} has {loss!r}; valid: {mcl_objective.CORRECTIONS}")
        for kind in config.soups.kinds:
            if kind not in ("uniform", "greedy", "weighted"):
                raise UserInputError(f"soups.kinds contains {kind!r}; valid: uniform, greedy, weighted")
        if not 0.0 < config.soups.warmup_fraction < 1.0:
            raise UserInputError(f"soups.warmup_fraction={config.soups.warmup_fraction} must be in (0, 1)")
    for arm in config.curve.arms:
        if arm not in config.arms:
            raise UserInputError(f"curve.arms contains {arm!r}, which is not in arms={tuple(config.arms)}")
    intr = config.get("intrinsic", {})
    if intr and intr.get("enabled", False) and intr.reference_arm not in config.arms:
        raise UserInputError(f"intrinsic.reference_arm={intr.reference_arm!r} is not in arms={tuple(config.arms)}")


def _enable_compile_cache(config, workdir: str) -> None:
    """Persistent XLA cache: the same step compiled for every seed and model is built once."""
    path = config.get("compile_cache_dir", "") or os.path.join(workdir, "jax_cache")
    if path != "off" and not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", workdir_fs.absolute(path))  # a bucket: as given
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def soup_stage_bound(config) -> int:
    """Fine-tuning stages of one seed's soups at most: uniform, greedy's candidates (each ingredient after the
    best), weighted. A soup equal to a model already evaluated reuses its scores, so it may take fewer."""
    kinds, n = config.soups.kinds, len(config.soups.ingredients)
    return ("uniform" in kinds) + ("greedy" in kinds) * (n - 1) + ("weighted" in kinds)


def planned_stages(config) -> int:
    """The stages a run visits: the tokenizer, and per seed each arm's pre-training and fine-tuning (and the
    soups' warm-up arm when it is no arm), the random-init reference, the curve's snapshots and the soups
    (ingredients pre-trained and fine-tuned, then at most `soup_stage_bound` soups)."""
    arms = len(config.arms)
    per_seed = 2 * arms + 2 * bool(config.get("random_init", False))
    per_seed += len(config.curve.arms) * len(probe_steps(config)[1])
    if config.soups.enabled:
        per_seed += (config.soups.warmup_arm not in config.arms) + 2 * len(config.soups.ingredients)
        per_seed += soup_stage_bound(config)
    return 1 + len(config.seeds) * per_seed


def run(config, workdir: str) -> dict:
    t_start, cpu_start, load_start = time.time(), common.cpu_seconds(), os.getloadavg()
    LOAD_SAMPLES.clear()  # this run's samples only
    _check(config)
    _enable_compile_cache(config, workdir)
    ctx = prepare(config, workdir, planned=planned_stages(config))
    seeds = [int(s) for s in config.seeds]
    summary: dict = {"arms": {}, "soups": {}, "curves": {}, "probes": {}, "intrinsic": {},
                     "notes": list(ctx.notes), "tasks": [t.name for t in ctx.tasks]}
    with_random = bool(config.get("random_init", False))
    arms = list(config.arms)
    need_warmup = config.soups.enabled and config.soups.warmup_arm not in arms
    for seed in seeds:
        pre = {arm: pretrain_arm(ctx, arm, seed) for arm in arms + ([config.soups.warmup_arm] if need_warmup else [])}
        for arm in arms:
            res = finetune_and_evaluate(ctx, f"pre_{arm}_s{seed}", pre[arm]["model_dir"], pre[arm]["_fingerprint"],
                                        seed)
            summary["arms"].setdefault(arm, {})[str(seed)] = res
            summary["probes"].setdefault(arm, {})[str(seed)] = pre[arm]["probes"]
            if ctx.heldout is not None:
                summary["intrinsic"].setdefault(arm, {})[str(seed)] = detection_aucs(ctx, pre, arm, seed)
        if with_random:
            rand = random_init_arm(ctx, seed)
            summary["arms"].setdefault("random", {})[str(seed)] = finetune_and_evaluate(
                ctx, f"random_s{seed}", rand["model_dir"], rand["_fingerprint"], seed)
            if ctx.heldout is not None:
                summary["intrinsic"].setdefault("random", {})[str(seed)] = detection_aucs(
                    ctx, {"random": dict(rand, steps=0)}, "random", seed)
        for arm in config.curve.arms:
            points = {}
            for step, snap_dir in pre[arm]["snapshots"].items():
                fp = fingerprint([pre[arm]["_fingerprint"], step])
                points[step] = finetune_and_evaluate(ctx, f"pre_{arm}_s{seed}_at{step}", snap_dir, fp, seed)
            points[str(pre[arm]["steps"])] = summary["arms"][arm][str(seed)]
            summary["curves"].setdefault(arm, {})[str(seed)] = {s: r["score_test"] for s, r in points.items()}
        if config.soups.enabled:
            warm = pre[config.soups.warmup_arm]
            ingredients = {name: pretrain_ingredient(ctx, name, tuple(losses), seed, warm)
                           for name, losses in config.soups.ingredients.items()}
            for name, res in ingredients.items():
                summary["probes"].setdefault(f"ing_{name}", {})[str(seed)] = res["probes"]
            visited = len(ctx.stages.ran) + len(ctx.stages.reused)
            summary["soups"][str(seed)] = soup_arms(ctx, seed, ingredients)
            soup_stages = len(ctx.stages.ran) + len(ctx.stages.reused) - visited - len(ingredients)
            ctx.stages.expect(ctx.stages.planned - (soup_stage_bound(config) - soup_stages))  # soups found equal
    summary["stages_ran"], summary["stages_reused"] = ctx.stages.ran, ctx.stages.reused
    summary["setup"] = {
        "pretrain_steps": int(config.pretrain.steps), "batch_size": int(config.pretrain.batch_size),
        "seq_len": int(config.corpus.seq_len), "seeds": seeds, "warmup_step": warmup_step(config),
        "discriminator": ctx.disc_cfg.to_dict(), "generator": ctx.gen_cfg.to_dict(),
        "corpus_docs": int(len(ctx.corpus["input_ids"])), "ingredients": config.soups.ingredients.to_dict(),
        "task_sizes": {t.name: {s: len(e) for s, e in t.examples.items()} for t in ctx.tasks},
        "objective": config.objective.to_dict(), "finetune_steps": int(config.finetune.steps),
        "segments": int(config.corpus.get("segments", 1)),
        "itd_capped_share": itd_capped_share(ctx.corpus, float(config.objective.insert_rate),
                                             (ctx.tokenizer.bos_token_id, ctx.tokenizer.eos_token_id)),
        "heldout_rows": 0 if ctx.heldout is None else int(len(ctx.heldout["input_ids"])),
    }
    summary["runtime"] = {
        "wall_s": round(time.time() - t_start, 1), "cpu_s": round(common.cpu_seconds() - cpu_start, 1),
        "load_avg_start": [round(x, 2) for x in load_start], "load_avg_end": [round(x, 2) for x in os.getloadavg()],
        "cpu_count": os.cpu_count(), "all_stages_reused": not ctx.stages.ran,
        "load_avg_sampled": {"mean": round(float(np.mean(LOAD_SAMPLES)), 2), "max": round(float(np.max(LOAD_SAMPLES)), 2),
                             "samples": len(LOAD_SAMPLES)} if LOAD_SAMPLES else None,
    }
    summary["discriminator_rows"] = rows_per_step(config, arms)
    matched = {arm: {"matches": COMPUTE_MATCHED[arm], **summary["discriminator_rows"][arm]}
               for arm in arms if arm in COMPUTE_MATCHED}
    if matched:
        summary["compute_matched"] = matched
    summary["gate"] = reference_gate(summary, ctx.tasks, with_random)
    strip_per_question(summary)
    shown = arms + (["random"] if with_random else [])
    summary["claims"] = report.claims(summary, shown)
    if jax.process_index() == 0:
        summary["figures"] = report.write_figures(summary, workdir, arms)
        text = report.render(summary, shown, ARM_LABELS)
        workdir_fs.write_text(os.path.join(workdir, "mcl_report.md"), text)
        print("\n".join(report.gate_lines(summary, ARM_LABELS)))
        print(report.render_table(summary, shown, ARM_LABELS))
    logging_utils.write_summary(workdir, summary)
    logging_utils.write_eval_scalars(workdir, {**summary["arms"], "soups": summary["soups"]})
    return summary
