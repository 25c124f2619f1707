"""MCL pre-training stages: each arm's ElectraPair, with label-share probes and snapshots along the way, and
the soup ingredients that resume from the warm-up arm's checkpoint."""
from __future__ import annotations

import json
import logging
import math
import os
import time

import jax
from flax import nnx

from clue_jax import workdir_fs
from clue_jax.data.batching import ArrayBatchSource
from clue_jax.errors import UserInputError
from clue_jax.mcl import accounting
from clue_jax.mcl import objective as mcl_objective
from clue_jax.mcl.pairs import create_pair, save_pair
from clue_jax.pipelines.mcl_context import LOAD_SAMPLES, Context, objective_config
from clue_jax.train import loop

log = logging.getLogger("clue_jax")

# arm -> (self-supervision courses, correction losses)
ARMS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "electra": (("rtd",), ()),
    "std": (("rtd", "std"), ()),
    "itd": (("rtd", "itd"), ()),
    "all3": (("rtd", "std", "itd"), ()),
    "mcl": (("rtd", "std", "itd"), mcl_objective.CORRECTIONS),
    "all3_redisc": (("rtd", "std", "itd"), ("re_rtd_disc", "re_std_disc")),
    "electra_matched": (("rtd",), ()),
}
# arm -> the arm whose discriminator rows per step it matches, by a whole multiple of pretrain.batch_size
COMPUTE_MATCHED = {"electra_matched": "mcl"}


def arm_objective(config, arm: str) -> mcl_objective.ObjectiveConfig:
    """The arm's objective settings (courses, corrections, sampling), enough for its compute accounting."""
    courses, corrections = ARMS[arm]
    return mcl_objective.ObjectiveConfig.from_dict(dict(config.objective.to_dict(), courses=tuple(courses),
                                                        corrections=tuple(corrections)))


def batch_multiplier(config, arm: str) -> int:
    """How many times pretrain.batch_size the arm trains with: 1, or for a compute-matched arm the factor that
    gives it at least the discriminator rows per step of the arm it matches."""
    target = COMPUTE_MATCHED.get(arm)
    if target is None:
        return 1
    b = int(config.pretrain.batch_size)
    return accounting.matching_multiplier(accounting.discriminator_rows(arm_objective(config, target), b),
                                          accounting.discriminator_rows(arm_objective(config, arm), b))


def rows_per_step(config, arms) -> dict[str, dict]:
    """Each arm's discriminator rows per optimizer step (mcl/accounting.py) and its batch multiplier."""
    b = int(config.pretrain.batch_size)
    return {arm: {**accounting.discriminator_rows(arm_objective(config, arm), b * batch_multiplier(config, arm)),
                  "batch_multiplier": batch_multiplier(config, arm)} for arm in arms}


def _probe_fn(cfg: mcl_objective.ObjectiveConfig):
    """Jitted per-course label-share probe; the model is an argument, so every arm reuses one compile."""
    return nnx.jit(lambda model, batch, rng: mcl_objective.probe_courses(model, batch, rng, cfg))


_PROBES: dict = {}


def probe_steps(config) -> tuple[int, list[int]]:
    """(probe interval, the snapshot steps of the score-vs-steps curve), both in optimizer steps."""
    steps = int(config.pretrain.steps)
    every = max(1, int(config.probe_every))
    snaps = sorted({min(steps, max(every, every * round(f * steps / every))) for f in config.curve.fractions})
    return every, [s for s in snaps if s < steps]


def _read_probes(stage_dir: str) -> list[dict]:
    path = os.path.join(stage_dir, "metrics.jsonl")
    out = []
    if workdir_fs.exists(path):
        for line in workdir_fs.read_text(path).splitlines():
            rec = json.loads(line)
            shares = {k[len("eval/"):]: v for k, v in rec.items() if k.startswith("eval/")}
            if shares:
                out.append({"step": rec["step"], **shares})
    dedup = {r["step"]: r for r in out}  # a resumed run may repeat a step
    return [dedup[s] for s in sorted(dedup)]


def pretrain(ctx: Context, name: str, courses, corrections, seed: int, stage_dir: str, *,
             start_from: str | None = None, keep_steps: int | None = None, multiplier: int = 1) -> dict:
    """Trains an ElectraPair with the given courses for pretrain.steps; returns the stage result.

    start_from: a checkpoint step folder to resume from (soup ingredients);
    keep_steps: also keep the full train state at this step (the warm-up arm);
    multiplier: rows per step as a multiple of pretrain.batch_size (a compute-matched arm).
    """
    config = ctx.config
    train_cfg = config.pretrain.copy_and_resolve_references()
    train_cfg.seed = seed
    train_cfg.batch_size = int(train_cfg.batch_size) * int(multiplier)
    every, snaps = probe_steps(config)
    train_cfg.eval_every = every
    if keep_steps:
        train_cfg.checkpoint_every = keep_steps
        train_cfg.keep_checkpoints = max(int(train_cfg.keep_checkpoints), math.ceil(train_cfg.steps / keep_steps) + 1)
    if start_from is not None and jax.process_index() == 0:
        target = os.path.join(stage_dir, "checkpoints", os.path.basename(start_from))
        if not workdir_fs.exists(target):
            workdir_fs.copytree(start_from, target)
    obj_cfg = objective_config(config, ctx.tokenizer, courses, corrections)
    probe_cfg = objective_config(config, ctx.tokenizer, mcl_objective.COURSES, ())
    probe = _PROBES.setdefault(probe_cfg, _probe_fn(probe_cfg))
    probe_batch = {k: jax.numpy.asarray(v) for k, v in ctx.probe_batch.items()}
    probe_key = jax.random.key(config.seed + 12345)  # the same corruptions at every probe: only G changes

    def eval_fn(model, step):
        LOAD_SAMPLES.append(os.getloadavg()[0])
        if step in snaps:
            save_pair(model, os.path.join(stage_dir, "snapshots", str(step)))
        res = jax.device_get(probe(model, probe_batch, probe_key))
        return {f"{c}/{k}": float(v) for c, stats in res.items() for k, v in stats.items()}

    t0 = time.time()
    pair = mcl_objective.attach_settings(create_pair(ctx.disc_cfg, ctx.gen_cfg, seed, ctx.mesh), obj_cfg)
    meta = {"model": {"discriminator": ctx.disc_cfg.to_dict(), "generator": ctx.gen_cfg.to_dict()}}
    # dynamic: the arm's courses/corrections are a step argument, so all arms share one compiled step
    trainer = loop.Trainer(pair, mcl_objective.make_objective(obj_cfg, dynamic=True), train_cfg, ctx.mesh,
                           stage_dir, meta=meta, stage=name)
    result = trainer.run(ArrayBatchSource(ctx.corpus, train_cfg.batch_size, seed=seed), eval_fn=eval_fn)
    if result.status != "done":
        log.warning("%s preempted at step %d; rerun the same command to resume", name, result.step)
        raise SystemExit(0)
    save_pair(result.model, os.path.join(stage_dir, "model"))
    return {"model_dir": os.path.join(stage_dir, "model"), "steps": result.step,
            "snapshots": {str(s): os.path.join(stage_dir, "snapshots", str(s)) for s in snaps
                          if workdir_fs.exists(os.path.join(stage_dir, "snapshots", str(s), "pair_config.json"))},
            "final_loss": result.metrics.get("loss"), "disc_accuracy": result.metrics.get("accuracy"),
            "probes": _read_probes(stage_dir), "seconds": round(time.time() - t0, 1),
            "objective": obj_cfg.to_dict()}


def _pretrain_inputs(ctx: Context, courses, corrections, seed: int) -> dict:
    c = ctx.config
    return {"corpus": ctx.corpus_fp, "model": c.model.to_dict(), "generator": c.generator.to_dict(),
            "objective": c.objective.to_dict(), "courses": list(courses), "corrections": list(corrections),
            "train": c.pretrain.to_dict(), "seed": seed, "probe_every": c.probe_every,
            "curve": c.curve.to_dict(), "num_probe": c.corpus.num_probe}


def warmup_step(config) -> int:
    w = int(round(config.soups.warmup_fraction * config.pretrain.steps))
    return max(1, min(int(config.pretrain.steps) - 1, w))


def pretrain_arm(ctx: Context, arm: str, seed: int) -> dict:
    courses, corrections = ARMS[arm]
    inputs = _pretrain_inputs(ctx, courses, corrections, seed)
    multiplier = batch_multiplier(ctx.config, arm)
    if multiplier != 1:
        inputs["batch_multiplier"] = multiplier
    keep = None
    if ctx.config.soups.enabled and arm == ctx.config.soups.warmup_arm:
        keep = warmup_step(ctx.config)
        inputs["keep_step"] = keep
    return ctx.stages.run(f"pre_{arm}_s{seed}", inputs,
                          lambda d: pretrain(ctx, f"pre_{arm}_s{seed}", courses, corrections, seed, d,
                                             keep_steps=keep, multiplier=multiplier))


def pretrain_ingredient(ctx: Context, name: str, corrections, seed: int, warm: dict) -> dict:
    courses = ARMS[ctx.config.soups.warmup_arm][0]
    w = warmup_step(ctx.config)
    start = os.path.join(ctx.stages.path(f"pre_{ctx.config.soups.warmup_arm}_s{seed}"), "checkpoints", str(w))
    inputs = dict(_pretrain_inputs(ctx, courses, corrections, seed), warmup=warm["_fingerprint"], warmup_step=w)

    def run(d):
        if not workdir_fs.exists(start):
            raise UserInputError(f"warm-up checkpoint {start} is missing; delete {ctx.stages.path('pre_' + ctx.config.soups.warmup_arm + f'_s{seed}')} and rerun")
        return pretrain(ctx, f"ing_{name}_s{seed}", courses, corrections, seed, d, start_from=start)

    return ctx.stages.run(f"ing_{name}_s{seed}", inputs, run)
