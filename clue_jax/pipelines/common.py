"""Pieces every pipeline shares: mesh, a training stage, CPU time (summary.json: train/logging_utils)."""
from __future__ import annotations

import logging
import os
import resource
import time

from flax import nnx

from clue_jax import workdir_fs
from clue_jax.models import factory
from clue_jax.models.config import ModelConfig
from clue_jax.parallel import mesh as mesh_lib, rules as shard_lib
from clue_jax.train import loop, objectives

log = logging.getLogger("clue_jax")


def make_mesh(config):
    return mesh_lib.from_config(config)


def train_model(stage_dir: str, model: nnx.Module, model_cfg: ModelConfig, data, train_cfg, mesh, *,
                objective=objectives.causal_lm, transform=None, extras=None, stage: str = "train",
                extra_meta=None, trainable=nnx.Param, export=None, eval_fn=None, save=None) -> dict:
    """Trains in `stage_dir` (resuming from its checkpoints), saves the final weights
    to `stage_dir/model`, and returns the stage's JSON result.

    trainable: what the optimizer updates (nnx.LoRAParam for LoRA students);
    export: model -> model applied before saving (e.g. merging LoRA adapters);
    save: (model, config, directory) in place of factory.save_params (LoRA students: lora.save_adapters);
    eval_fn: (model, step) -> scalars, run every train_cfg.eval_every steps (learning curves).
    """
    t0 = time.time()
    meta = {"model": model_cfg.to_dict(), **(extra_meta or {})}
    extras_shardings = None if extras is None else shard_lib.state_shardings(extras, mesh)
    run_dir = str(workdir_fs.path(stage_dir).parent.parent)  # WORKDIR/stages/<stage>
    trainer = loop.Trainer(model, objective, train_cfg, mesh, stage_dir, transform=transform, meta=meta,
                           stage=stage, trainable=trainable, extras=extras, extras_shardings=extras_shardings,
                           log_dir=run_dir)
    result = trainer.run(data, eval_fn)
    if result.status != "done":
        log.warning("%s preempted at step %d; rerun the same command to resume", stage, result.step)
        raise SystemExit(0)
    final = export(result.model) if export is not None else result.model
    (save or factory.save_params)(final, model_cfg, os.path.join(stage_dir, "model"))
    return {"model_dir": os.path.join(stage_dir, "model"), "steps": result.step,
            "final_loss": result.metrics.get("loss"), "seconds": round(time.time() - t0, 1)}




def cpu_seconds() -> float:
    """CPU time of this process (all threads): on a loaded machine a fairer measure of the work than wall time."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
