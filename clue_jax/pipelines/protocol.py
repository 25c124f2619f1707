"""Training budgets of the clue-dropout arms: the paper's protocol, equal compute, and both long.

- paper: equal epochs over each arm's data; a dropout arm's data is 1 original
  + K fixed dropped copies per document (clues.mode = fixed_copies), so it
  trains K + 1 times plain's steps and sees every document intact as often as plain;
- equal_compute: every arm trains plain's steps, dropout drawn fresh every
  step (clues.mode = cached), a share clues.original_fraction left intact;
- long: every arm, plain included, trains the paper's dropout-arm steps (K + 1
  times plain's epochs), dropout drawn fresh as in equal_compute. Beside the
  paper's protocol it separates the effect of the dropout from that of 11x
  the steps: is plain still behind when it trains as long?
Plain is the same run under paper and equal_compute (its stage does not depend on the mode).
"""
from __future__ import annotations

import math

PROTOCOLS = ("paper", "equal_compute", "long")


def protocol_steps(protocol: str, arm: str, documents: int, epochs: float, batch_size: int, copies: int) -> int:
    """Steps of one arm: ceil(epochs * rows / batch_size), rows = documents x (K + 1 for a dropout arm under
    the paper's protocol and for every arm under long, else 1)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r} (have {PROTOCOLS})")
    long = protocol == "long" or (protocol == "paper" and arm != "plain")
    rows = documents * (copies + 1 if long else 1)
    return max(1, math.ceil(epochs * rows / batch_size))


def protocol_mode(protocol: str) -> str:
    return "fixed_copies" if protocol == "paper" else "cached"


def arm_settings(config, protocol: str, arm: str, documents: int, curve: bool = True) -> dict:
    """train_and_evaluate's `train` (steps, 10% warm-up by protocol.warmup_fraction, checkpoints, curve points)
    and `mode` for one arm."""
    p = config.protocol
    steps = protocol_steps(protocol, arm, documents, p.epochs, config.cpt.batch_size, int(config.clues.copies))
    train = {"steps": steps, "warmup_steps": max(1, round(p.warmup_fraction * steps)),
             "checkpoint_every": min(int(config.cpt.checkpoint_every), steps)}
    if curve and p.curve_points:
        train["eval_every"] = max(1, math.ceil(steps / p.curve_points))
    return {"train": train, "mode": protocol_mode(protocol) if arm != "plain" else None}
