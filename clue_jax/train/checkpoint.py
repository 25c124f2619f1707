"""Orbax checkpoints in the workdir: train state + JSON metadata, keep the last N.

A checkpoint holds the trainable params, the optimizer state, the step, the
RNG key and (in the metadata) the data position and the model config. On
restore the newest readable step wins: a corrupt or partial latest checkpoint
is skipped with a warning and the previous one is used. A checkpoint written
for another model config is refused with a one-line error before anything
is overwritten.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from clue_jax.errors import UserInputError

log = logging.getLogger(__name__)


class Checkpointer:
    def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "meta")
        )

    def save(self, step: int, state: Any, meta: dict, force: bool = False) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            force=force,
        )

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps(), reverse=True)

    def restore_latest(self, abstract_state: Any, expected_meta: dict) -> tuple[int, Any, dict] | None:
        """Returns (step, state, meta) of the newest readable checkpoint, or None.

        `expected_meta["model"]` must equal the saved model config, else the
        checkpoint belongs to another run: UserInputError (exit 2), nothing touched.
        """
        for step in self.steps():
            try:
                meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
            except Exception as err:  # unreadable metadata: fall back to an older step
                log.warning("checkpoint step %d in %s is unreadable (%s); trying the previous one",
                            step, self.directory, _short(err))
                continue
            for key in ("model", "trainable"):
                if key in expected_meta and meta.get(key) != expected_meta[key]:
                    raise UserInputError(
                        f"checkpoint {self.directory}/{step} was written for another {key} config "
                        f"(saved {key}={_diff(meta.get(key), expected_meta[key])}); use a new --workdir"
                    )
            try:
                restored = self.manager.restore(
                    step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
                )
            except Exception as err:
                log.warning("checkpoint step %d in %s is corrupt or partial (%s); trying the previous one",
                            step, self.directory, _short(err))
                continue
            return step, restored["state"], meta
        return None

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _short(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:200]


def _diff(saved, expected) -> str:
    if isinstance(saved, dict) and isinstance(expected, dict):
        keys = sorted(k for k in set(saved) | set(expected) if saved.get(k) != expected.get(k))
        return ", ".join(f"{k}: {saved.get(k)!r} vs now {expected.get(k)!r}" for k in keys[:4])
    return f"{saved!r} vs now {expected!r}"


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) that tell orbax where to place restored arrays."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree
    )
