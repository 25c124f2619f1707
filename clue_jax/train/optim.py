"""The optax optimizer every pipeline uses: AdamW, warm-up + cosine/linear decay, clipping."""
from __future__ import annotations

import jax
import optax

from clue_jax.choices import SCHEDULES
from clue_jax.errors import UserInputError


def learning_rate_schedule(lr: float, steps: int, warmup_steps: int, schedule: str) -> optax.Schedule:
    """Linear warm-up from 0, then cosine or linear decay to 0 (or constant)."""
    if schedule not in SCHEDULES:
        raise UserInputError(f"train.schedule={schedule!r} is not one of {SCHEDULES}")
    warmup_steps = max(0, min(warmup_steps, steps))
    decay_steps = max(1, steps - warmup_steps)
    warm = optax.linear_schedule(0.0, lr, max(1, warmup_steps))
    if schedule == "cosine":
        decay = optax.cosine_decay_schedule(lr, decay_steps)
    elif schedule == "linear":
        decay = optax.linear_schedule(lr, 0.0, decay_steps)
    else:
        decay = optax.constant_schedule(lr)
    if warmup_steps == 0:
        return decay
    return optax.join_schedules([warm, decay], [warmup_steps])


def _decay_mask(params):
    """Weight decay on matrices only: norms, biases and scalars are left alone."""
    return jax.tree.map(lambda p: getattr(p, "ndim", 0) >= 2, params)


def make_optimizer(cfg) -> optax.GradientTransformation:
    """cfg: the `train` ConfigDict (lr, steps, warmup_steps, schedule, weight_decay, clip_norm, b1, b2)."""
    schedule = learning_rate_schedule(cfg.lr, cfg.steps, cfg.warmup_steps, cfg.schedule)
    parts = []
    if cfg.clip_norm:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=_decay_mask))
    return optax.chain(*parts)
