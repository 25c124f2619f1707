"""Knowledge extraction and frequency shock (docs/methods.md, "Frequency shock"), end to end.

Stages (each cached in workdir/stages, see stages.py):
  world -> tokenizer (foundations.py, as the knowledge pipeline builds them) -> pretrain
  (one base model on every person's rich bios, plus the QA of the
  `pretrain_qa` people, none by default; skipped when `base_models.small`
  names a checkpoint) -> eval_base (the base model k-shot on dev and test) ->
  per seed: ft_vanilla_t<steps>_s<seed> and eval_sweep_t<steps>_s<seed> (the
  steps sweep: vanilla fine-tuning on the skewed QA set for every length of
  `sweep.steps` and for the mixture arm's total, zero-shot decoding), then
  ft_mixture_s<seed> (the same QA batches with replay batches interleaved at
  `mixture.ratio`, through MixtureBatchSource and the ordinary objective) and
  eval_<kind>_s<seed> (the fine-tuned model zero-shot; model mixing with the
  base model, per decoding step and by candidate ranking, lambda chosen on
  dev).
Then the knowledge-free predictors (extraction/baselines.py) are scored as
arms, the extraction gate (extraction/gate.py) is taken on the questions
whose answer fine-tuning left out, and every arm's shock size
(extraction/shock_size.py) is measured; summary.json, extraction_report.md
and the plots are written from the stage results (cheap, always redone).

Arms: base (k-shot); vanilla (the sweep length best on dev); vanilla@matched
(as many steps as the mixture arm); best_of_base_vanilla (per seed the one
better on dev); mixing/<mode> (vanilla + base); mixture; both/<mode>
(mixture + base); each but vanilla@matched also as "rank:<arm>" when
candidate ranking is on. Per arm and seed: exact match and F1 overall, per
relation, per frequency bucket, the shock statistics against their
calibrated null, and pred/gold per pre-training stratum, on the test people.

Choices where the spec is silent (all settings):
- The fine-tuning skew is drawn at random within pre-training-frequency
  strata (finetune_data.stratified_skew), so it is independent of
  pre-training frequency; the draw uses `seed`, the same for every
  fine-tuning seed.
- With `pretrain_qa` people, the base model sees their QA in pre-training
  and the k-shot shots come from them; with none (the default) the shots
  come from the fine-tuning people, unskewed. The base arm is the same for
  every seed.
- With `base_models.small` (a clue_jax model directory or a Hugging Face
  checkpoint, the knowledge pipeline's key) the pre-training frequencies are counted over the corpus
  this config describes (the checkpoint is assumed to have been trained on
  it), and mixture fine-tuning replays that corpus.
- Mixture fine-tuning replays the pre-training corpus without the dev and
  test people's documents, and runs ft.steps QA batches (its step count
  grows by the replay batches) when `mixture.match_ft_batches`.
- Lambda grids lie strictly inside (0, 1): the endpoints are the base and
  vanilla arms, and mixing is reported against the better of the two.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import time

import jax
import numpy as np

from clue_jax import workdir_fs
from clue_jax.data import bios, lm_data
from clue_jax.data.batching import ArrayBatchSource
from clue_jax.data.mixture import MixtureBatchSource, with_loss_mask
from clue_jax.data.tokenizer import load_tokenizer
from clue_jax.errors import UserInputError
from clue_jax.extraction import finetune_data, mixing, plots, report, seed_stats, shock
from clue_jax.extraction.answers import base_prompt_texts, encode_prompts, newline_ids, padded_prompts
from clue_jax.extraction.arm_metrics import best_of, choose_steps
from clue_jax.pipelines import common
from clue_jax.pipelines.extraction_eval import (SPLITS, eval_base_stage, eval_ft_stage, eval_zero_shot_stage,
                                                knowledge_free_stage, load_model, read_predictions)
from clue_jax.pipelines.foundations import (array_fingerprint, load_people, path_fingerprint, pretrain_stage,
                                            pretraining_texts, public, world_inputs, tokenizer_stage, world_stage)
from clue_jax.pipelines.stages import Stages
from clue_jax.train import logging_utils

log = logging.getLogger("clue_jax")

KINDS = ("vanilla", "mixture")
# ------------------------------------------------------------------ data
def pretraining_corpus(people, qa_people, bios_per_person: int, seed: int) -> list[str]:
    """Rich bios of everyone (+ QA docs of `qa_people`), shuffled at document level before packing."""
    qa_names = {p.name for p in qa_people}
    others = [p for p in people if p.name not in qa_names]
    texts = pretraining_texts(list(qa_people), bios_per_person, seed, True)
    texts += pretraining_texts(others, bios_per_person, seed + 1, False)
    order = np.random.default_rng([seed, 11]).permutation(len(texts))
    return [texts[i] for i in order]


# ------------------------------------------------------------------ stages
def finetune_stage(config, kind, seed, base_dir, ft_data, mix_data, mesh, stage_dir, steps: int | None = None):
    """Fine-tunes the base model: `steps` steps (default ft.steps) on the QA set alone ("vanilla"), or ft.steps
    QA batches with replay batches interleaved ("mixture")."""
    model, cfg = load_model(base_dir, mesh, config.ft.get("precision", "checkpoint"))
    train_cfg = config.ft.copy_and_resolve_references()
    train_cfg.seed = seed
    if steps is not None:
        train_cfg.steps = int(steps)
    source = ArrayBatchSource(ft_data, train_cfg.batch_size, seed=seed)
    meta = {"kind": kind}
    if kind == "mixture":
        pt_source = ArrayBatchSource(mix_data, train_cfg.batch_size, seed=seed + 1000)
        source = MixtureBatchSource(source, pt_source, config.mixture.ratio)
        if config.mixture.match_ft_batches:
            train_cfg.steps = source.steps_for_primary(config.ft.steps)
        meta["pretrain_batches"] = source.secondary_before(train_cfg.steps)
        meta["finetune_batches"] = train_cfg.steps - meta["pretrain_batches"]
    result = common.train_model(stage_dir, model, cfg, source, train_cfg, mesh, stage=os.path.basename(stage_dir),
                                extra_meta=meta)  # the sweep's lengths log apart
    result.update({k: v for k, v in meta.items() if k != "kind"})
    return result


# ------------------------------------------------------------------ pipeline
def _check_config(config) -> None:
    if config.data.source != "bios":
        raise UserInputError(f"data.source={config.data.source!r}: the extraction pipeline runs on the "
                             "built-in world only ('bios')")
    for mode in config.mixing.modes:
        if mode not in mixing.MODES:
            raise UserInputError(f"mixing.modes contains {mode!r}; valid: {mixing.MODES}")
    for key in ("grid", "rank_grid"):
        for lam in config.mixing[key]:
            if not 0.0 < float(lam) < 1.0:
                raise UserInputError(f"mixing.{key} contains {lam}; lambdas must lie strictly between 0 and 1 "
                                     "(the endpoints are the base and the vanilla arm, compared separately)")
    if config.skew.left_out + config.skew.oversampled > 1.0:
        raise UserInputError(f"skew.left_out={config.skew.left_out} + skew.oversampled={config.skew.oversampled} "
                             "exceeds 1: they are shares of the same stratum")
    if not config.sweep.steps or any(int(n) < 1 for n in config.sweep.steps):
        raise UserInputError(f"sweep.steps={tuple(config.sweep.steps)}: give fine-tuning step counts >= 1")
    if not config.seeds:
        raise UserInputError("seeds is empty: give at least one fine-tuning seed")


def _fp(value) -> str:
    """Content hash of token arrays (a dict of arrays) or of a list of items, so changed data reruns its readers."""
    if isinstance(value, dict):
        return array_fingerprint(value)
    digest = hashlib.sha256()
    for item in value:
        digest.update(repr(item).encode())
    return digest.hexdigest()[:16]


def planned_stages(config, matched_steps: int | None = None) -> int:
    """The stages a run visits: world, tokenizer, pretrain (unless base_models.small is given), eval_base, and per
    seed the steps sweep (each length fine-tuned and evaluated), eval_vanilla, ft_mixture and eval_mixture.

    The compute-matched length is known only once the data are encoded; until then (None) it counts as a
    length of its own, so the plan can only shrink when it is known."""
    lengths = {int(n) for n in config.sweep.steps}
    sweep = len(lengths) + (matched_steps is None or matched_steps not in lengths)
    per_seed = 2 * sweep + 2 * len(KINDS) - 1  # the vanilla arm reuses a sweep model: its evaluation only
    return 2 + (not config.base_models.small) + 1 + len(config.seeds) * per_seed


def run(config, workdir: str) -> dict:
    t_start, load_start, cpu_start = time.time(), os.getloadavg(), common.cpu_seconds()
    _check_config(config)
    relations = finetune_data.check_relations(config.relations)
    mesh = common.make_mesh(config)
    stages = Stages(workdir)
    stages.expect(planned_stages(config))
    world = stages.run("world", {"world": world_inputs(config)}, lambda d: world_stage(config, d))
    world_dir = stages.path("world")
    people = load_people(world_dir, "background") + load_people(world_dir, "new")
    groups = finetune_data.split_people(people, config.splits.to_dict(), config.seed)

    # Same keys as the knowledge pipeline: tokenizer.path, else the base checkpoint's own tokenizer.
    base_path = config.base_models.small
    tok_res = stages.run("tokenizer", {"world": world["_fingerprint"], "tokenizer": config.tokenizer.to_dict(),
                                       "base_models": config.base_models.to_dict(), "seed": config.seed},
                         lambda d: tokenizer_stage(config, world_dir, d))
    tokenizer = load_tokenizer(tok_res["path"])

    # Pre-training corpus, frequencies, the skewed fine-tuning set.
    bpp = config.data.bios_per_person
    texts = pretraining_corpus(people, groups["pretrain_qa"], bpp, config.seed)
    pt_objects = finetune_data.pretraining_objects(people, groups["pretrain_qa"], bpp, relations)
    pt_freqs = shock.entity_frequencies(pt_objects, [])
    candidates = finetune_data.relation_objects(people, relations)
    s = config.skew
    ft_items, skew_info = finetune_data.skewed_finetune_items(groups["finetune"], pt_freqs, candidates, s.strata,
                                                             s.left_out, s.oversampled, s.repeat, config.seed,
                                                             relations)
    # Mixture fine-tuning replays the pre-training corpus without the dev and test people's documents.
    replay = finetune_data.replay_people(people, groups)
    replay_texts = pretraining_corpus(replay, [p for p in groups["pretrain_qa"] if p in replay], bpp, config.seed)
    freqs = shock.entity_frequencies(pt_objects, [it.answer for it in ft_items])
    items = {split: finetune_data.qa_probe_items(groups[split], relations) for split in SPLITS}
    threshold = float(np.median([freqs[shock.entity_key(a)].pretrain
                                 for a in sorted({it.answer for it in items["test"]})]))
    shot_people = groups["pretrain_qa"] or groups["finetune"]
    shots = {}
    for person in shot_people:
        for q in bios.qa_items(person):
            shots.setdefault(q.attribute, []).append((q.question, q.answer))
    ctx = {
        "tokenizer": tokenizer, "items": items, "freqs": freqs, "threshold": threshold,
        "smoothing": float(config.shock.smoothing), "candidates": candidates, "skew": skew_info,
        "null_draws": int(config.shock.null_draws), "null_seed": config.seed,
        "stops": newline_ids(tokenizer),
        "ft_seqs": {sp: encode_prompts(tokenizer, [it.question for it in items[sp]]) for sp in SPLITS},
        "base_seqs": {sp: encode_prompts(tokenizer, base_prompt_texts(items[sp], shots, config.eval.k_shot,
                                                                       config.seed, i))
                      for i, sp in enumerate(SPLITS)},
    }
    for which in ("ft", "base"):
        ctx[f"{which}_pad"] = padded_prompts(tokenizer, ctx[f"{which}_seqs"])

    # Base model: pre-trained here, or given.
    if base_path:
        base_dir = workdir_fs.absolute(base_path)  # local, or a URL (gs://...)
        base = {"model_dir": base_dir, "_fingerprint": path_fingerprint(base_dir)}
        load_model(base_dir, mesh)  # fail early on an unreadable checkpoint
    else:
        inputs = {"tokenizer": tok_res["_fingerprint"], "model": config.models.small.to_dict(),
                  "train": config.pretrain.to_dict(), "texts": _fp(texts), "seed": config.seed}
        base = stages.run("pretrain", inputs, _timed(lambda d: pretrain_stage(config, "small", texts, tokenizer, mesh, d)))

    ft_data = finetune_data.qa_examples(tokenizer, ft_items, config.ft.seq_len)
    mix_data = with_loss_mask(lm_data.pack_documents(tokenizer, replay_texts, config.ft.seq_len))
    # Compute-matched vanilla: as many steps as the mixture arm runs in all.
    matched_steps = mixture_steps(config, ft_data, mix_data)
    stages.expect(planned_stages(config, matched_steps))
    data_fp = {"ft": _fp(ft_data), "mix": _fp(mix_data)}
    eval_fp = {"eval": config.eval.to_dict(), "mixing": config.mixing.to_dict(), "shock": config.shock.to_dict(),
               "items": _fp([items[s] for s in SPLITS]), "freqs": _fp(sorted(freqs.items())),
               "base_prompts": _fp([ctx["base_seqs"][s] for s in SPLITS]), "candidates": _fp(sorted(candidates.items()))}
    base_eval = stages.run("eval_base", {"base": base["_fingerprint"], **eval_fp},
                           _timed(lambda d: eval_base_stage(config, ctx, base["model_dir"], mesh, d)))

    per_seed: dict[str, dict[str, dict]] = {}  # arm -> seed -> metrics (test)
    stage_info = {"eval_base": {k: base_eval[k] for k in ("seconds", "cpu_seconds")}}
    for arm, m in base_eval["metrics"]["test"].items():
        per_seed.setdefault(arm, {})["-"] = m
    sweeps = {}
    sweep_steps = sorted({int(n) for n in config.sweep.steps})
    steps_sweep: dict[str, dict[str, dict]] = {}  # seed -> steps -> {dev, test EM}
    for seed in config.seeds:
        def finetune(kind, steps=None, sd=seed):
            name = f"ft_{kind}_s{sd}" if steps is None else f"ft_{kind}_t{steps}_s{sd}"
            inputs = {"base": base["_fingerprint"], "kind": kind, "seed": sd, "train": config.ft.to_dict(),
                      "steps": steps, "data": data_fp,
                      "mixture": config.mixture.to_dict() if kind == "mixture" else None}
            ft = stages.run(name, inputs, _timed(lambda d: finetune_stage(
                config, kind, sd, base["model_dir"], ft_data, mix_data, mesh, d, steps)))
            stage_info[name] = public(ft)
            return ft

        # The steps sweep of vanilla fine-tuning (zero-shot decoding), the compute-matched length included; the
        # vanilla arm is the length best on dev.
        sweep = {}
        for steps in sorted(set(sweep_steps) | {matched_steps}):
            ft = finetune("vanilla", steps)
            name = f"eval_sweep_t{steps}_s{seed}"
            ev = stages.run(name, {"ft": ft["_fingerprint"], **eval_fp},
                            _timed(lambda d, f=ft: eval_zero_shot_stage(config, ctx, f["model_dir"], mesh, d)))
            stage_info[name] = {k: ev[k] for k in ("predictions", "seconds", "cpu_seconds")}
            sweep[steps] = (ft, ev)
        steps_sweep[str(seed)] = {str(n): {"dev_exact_match": ev["metrics"]["dev_exact_match"],
                                           "exact_match": ev["metrics"]["exact_match"]}
                                  for n, (_, ev) in sweep.items()}
        chosen = choose_steps({n: ev["metrics"]["dev_exact_match"] for n, (_, ev) in sweep.items()})
        per_seed.setdefault("vanilla@matched", {})[str(seed)] = {**sweep[matched_steps][1]["metrics"],
                                                                 "steps": matched_steps}
        for kind in KINDS:
            if kind == "vanilla":
                ft, zero_shot = sweep[chosen][0], sweep[chosen][1]["predictions"]
            else:
                ft, zero_shot = finetune(kind), ""
            ev = stages.run(f"eval_{kind}_s{seed}", {"ft": ft["_fingerprint"], "base_eval": base_eval["_fingerprint"],
                                                     **eval_fp},
                            _timed(lambda d, k=kind, f=ft, z=zero_shot: eval_ft_stage(
                                config, ctx, k, f["model_dir"], base["model_dir"], base_eval, mesh, d, z)))
            for arm, m in ev["metrics"].items():
                per_seed.setdefault(arm, {})[str(seed)] = {**m, "steps": int(ft["steps"])}
            sweeps.setdefault(kind, {})[str(seed)] = ev["sweeps"]
            stage_info[f"eval_{kind}_s{seed}"] = {k: ev[k] for k in ("predictions", "seconds", "cpu_seconds")}
        for prefix in ("", "rank:"):
            best = best_of(per_seed, prefix, str(seed))
            if best is not None:
                per_seed.setdefault(prefix + "best_of_base_vanilla", {})[str(seed)] = best
    if "pretrain" in stages.ran or "pretrain" in stages.reused:
        stage_info["pretrain"] = public(base)

    # No model: the knowledge-free predictors, the gate and the shock sizes (cheap, always redone).
    prior_items = finetune_data.qa_probe_items(people, relations)
    summary = {
        **knowledge_free_stage(ctx, ft_items, prior_items, config.seeds, stage_info),
        "arms": {arm: {"per_seed": runs, **seed_stats.mean_std(list(runs.values()))} for arm, runs in per_seed.items()},
        "sweeps": sweeps,
        "steps_sweep": steps_sweep,
        "matched_steps": matched_steps,
        "seeds": list(config.seeds),
        "skew": skew_info,
        "data": {
            "people": {g: len(v) for g, v in groups.items()}, "relations": list(relations),
            "finetune_examples": len(ft_items), "dev_items": len(items["dev"]), "test_items": len(items["test"]),
            "entities": len(freqs), "bucket_threshold": threshold,
            "pretrain_documents": len(texts), "pretrain_qa_people": len(groups["pretrain_qa"]),
            "replay_documents": len(replay_texts), "replay_people": len(replay),
            "k_shot": config.eval.k_shot,
        },
        "stages": stage_info,
        "stages_ran": stages.ran,
        "stages_reused": stages.reused,
        "runtime": {"seconds": round(time.time() - t_start, 1),
                    "cpu_seconds": round(common.cpu_seconds() - cpu_start, 1),
                    "cpu_count": os.cpu_count(),
                    "loadavg_start": list(load_start), "loadavg_end": list(os.getloadavg()),
                    "devices": f"{jax.device_count()} x {jax.devices()[0].platform}",
                    "stage_seconds": {k: v.get("seconds") for k, v in stage_info.items() if "seconds" in v},
                    "stage_cpu_seconds": {k: v.get("cpu_seconds") for k, v in stage_info.items() if "cpu_seconds" in v}},
    }
    if jax.process_index() == 0:
        figures = _plots(workdir, per_seed, stage_info, base_eval, items["test"], ctx["candidates"], freqs,
                         ctx["smoothing"], list(config.seeds), sweeps)
        steps_path = os.path.join(workdir, "plots", "em_vs_steps.png")
        plots.plot_steps(steps_sweep, per_seed["base"]["-"]["exact_match"], steps_path)
        figures["em_vs_steps"] = os.path.relpath(steps_path, workdir)
        summary["plots"] = figures
    logging_utils.write_summary(workdir, _json_safe(summary))
    logging_utils.write_eval_scalars(workdir, summary["arms"])
    if jax.process_index() == 0:
        text = report.render_report(summary)
        workdir_fs.write_text(os.path.join(workdir, "extraction_report.md"), text)
        print(report.render_table(summary))
    return summary


def mixture_steps(config, ft_data, mix_data) -> int:
    """Total steps of the mixture arm: ft.steps QA batches plus the replay batches interleaved at mixture.ratio."""
    if not config.mixture.match_ft_batches:
        return int(config.ft.steps)
    source = MixtureBatchSource(ArrayBatchSource(ft_data, config.ft.batch_size, seed=0),
                                ArrayBatchSource(mix_data, config.ft.batch_size, seed=1), config.mixture.ratio)
    return int(source.steps_for_primary(config.ft.steps))


def _plots(workdir, per_seed, stage_info, base_eval, test_items, objects, freqs, smoothing, seeds, sweeps) -> dict:
    """Shock scatter per arm (first seed) and the lambda sweep, as PNGs in workdir/plots."""
    out_dir = workdir_fs.join(workdir, "plots")
    golds = [it.answer for it in test_items]
    preds_by_arm = {"base": read_predictions(base_eval["predictions"])["test"]}
    first = str(seeds[0])
    for kind in KINDS:
        key = f"eval_{kind}_s{first}"
        if key in stage_info:
            preds_by_arm.update(read_predictions(stage_info[key]["predictions"]))
    paths = {}
    for arm, preds in preds_by_arm.items():
        if arm.startswith("rank:"):
            continue
        path = os.path.join(out_dir, f"shock_{arm.replace('/', '_')}.png")
        counts = shock.prediction_counts(preds, golds, [it.attribute for it in test_items], objects)
        shock.plot_shock(freqs, counts, path, smoothing,
                         title=f"{arm} (seed {first})" if arm != "base" else "base")
        paths[f"shock:{arm}"] = os.path.relpath(path, workdir)
    sweep_path = os.path.join(out_dir, "lambda_sweep.png")
    plots.plot_sweep(sweeps, sweep_path)
    paths["lambda_sweep"] = os.path.relpath(sweep_path, workdir)
    return paths


def _json_safe(value):
    """NaN (an empty bucket, an undefined rho) becomes null, so summary.json is strict JSON."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _timed(fn):
    """Wraps a stage function so its result records its wall and CPU seconds (kept when the stage is reused, so the
    cost of a whole run can be summed even when its stages ran in different invocations)."""
    def run(stage_dir):
        t0, c0 = time.time(), common.cpu_seconds()
        result = fn(stage_dir)
        result.update(seconds=round(time.time() - t0, 1), cpu_seconds=round(common.cpu_seconds() - c0, 1))
        return result

    return run

