"""Mixture fine-tuning input: interleave two batch sources at a set ratio.

docs/methods.md, "Frequency shock", mixture fine-tuning: pre-training batches are interleaved with the
fine-tuning batches, so the ordinary training loop (and its pluggable
objective) sees one deterministic stream and no second loop is needed.

Choice: whole batches, not rows. Each step's batch comes entirely from one
source, picked by a fixed schedule: with `ratio` r secondary (pre-training)
batches per primary (fine-tuning) batch, the secondary share is f = r / (1 + r)
and step s is secondary exactly when floor((s + 1) f) > floor(s f). Why whole
batches: the objective normalises the loss by the number of counted tokens in
the batch, and a packed pre-training row counts every token while a QA row
counts only its answer; mixing rows inside a batch would let the pre-training
tokens swamp the answers. With whole batches each source keeps its own
per-token loss scale and r really is the ratio of optimizer steps.

Everything is a pure function of the step: the secondary source is asked for
its batch floor(s f) and the primary for s - floor(s f), so a resumed run sees
the same batches as an uninterrupted one. f is kept as an exact fraction, so
over any first n steps exactly floor(n f) batches are secondary.
"""
from __future__ import annotations

import fractions
import math

import numpy as np

from clue_jax.errors import UserInputError


def with_loss_mask(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Adds a `loss_mask` equal to the attention mask (every real token counts), e.g. to packed pre-training rows,
    so they have the keys of fine-tuning rows that carry an answer-only `loss_mask`."""
    out = dict(arrays)
    out["loss_mask"] = np.asarray(arrays["attention_mask"], dtype=np.int32).copy()
    return out


def _exact_ratio(ratio: float) -> fractions.Fraction:
    try:
        value = float(ratio)
    except (TypeError, ValueError):
        raise UserInputError(f"mixture ratio must be a number, got {ratio!r}") from None
    if not math.isfinite(value) or value < 0:
        raise UserInputError(f"mixture ratio must be finite and >= 0, got {ratio!r}")
    # Decimal text -> exact fraction: 0.1 becomes 1/10, not the binary float's expansion.
    return fractions.Fraction(repr(value)).limit_denominator(10**6)


class MixtureBatchSource:
    """`batch(step)` from `primary` or `secondary`, `ratio` secondary batches per primary batch (whole batches).

    Both sources must yield batches with the same keys, shapes and dtypes (one
    compiled train step); this is checked on their first batch.
    """

    def __init__(self, primary, secondary, ratio: float):
        self.primary, self.secondary = primary, secondary
        r = _exact_ratio(ratio)
        self.ratio = float(r)
        self.fraction = r / (1 + r)  # share of secondary steps, exact
        if self.fraction > 0:
            self._check_compatible(primary.batch(0), secondary.batch(0))

    @staticmethod
    def _check_compatible(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
        if set(a) != set(b):
            raise UserInputError(
                f"mixture sources have different batch keys: {sorted(a)} vs {sorted(b)} "
                "(give pre-training rows a loss_mask, see with_loss_mask)"
            )
        for key in sorted(a):
            sa, sb = np.shape(a[key]), np.shape(b[key])
            if sa != sb or np.asarray(a[key]).dtype != np.asarray(b[key]).dtype:
                raise UserInputError(
                    f"mixture sources disagree on batch[{key!r}]: {sa} {np.asarray(a[key]).dtype} vs "
                    f"{sb} {np.asarray(b[key]).dtype} (use the same batch size and seq_len for both)"
                )

    def secondary_before(self, step: int) -> int:
        """How many of the steps 0 .. step-1 drew from the secondary source."""
        f = self.fraction
        return (int(step) * f.numerator) // f.denominator

    def is_secondary(self, step: int) -> bool:
        return self.secondary_before(step + 1) > self.secondary_before(step)

    def batch(self, step: int, rows=None) -> dict[str, np.ndarray]:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        k = self.secondary_before(step)
        if self.is_secondary(step):
            return self.secondary.batch(k, rows)
        return self.primary.batch(step - k, rows)

    def steps_for_primary(self, primary_steps: int) -> int:
        """The fewest total steps that include `primary_steps` primary batches (so a mixture run
        sees as much fine-tuning data as a plain one)."""
        if primary_steps <= 0:
            return 0
        if self.fraction >= 1:
            raise UserInputError("mixture ratio leaves no primary batches")
        f = self.fraction
        # Primary steps in n steps: n - floor(n f), non-decreasing; start from the continuous bound.
        n = max(primary_steps, math.floor(primary_steps / (1 - f)) - 1)
        while n - self.secondary_before(n) < primary_steps:
            n += 1
        while n > 0 and (n - 1) - self.secondary_before(n - 1) >= primary_steps:
            n -= 1
        return n
